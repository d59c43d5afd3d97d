"""Frames between the host and a child: 4-byte length, then msgpack.

Nothing a child sends is unpickled or evaluated: a frame is a length (big
endian, unsigned 32 bits) and a msgpack map, decoded with every size bounded
by the frame's own size and no extension types (no timestamps, no custom
objects). ``check_child_frame`` then holds each child->host frame to its
schema: exact key set, types, sizes.

Frames, host -> child:
    {"t": "start", "mode": "run" | "schedule", "policy": str,
     "code": {"filename": str, "schedule": bytes, "conditions": [bytes],
              "apply": bytes},
     "now": ISO naive datetime, "fixed_clock": bool, "max_calls": int,
     "output_bytes": int, "test_builtins": bool}
    {"t": "reply", "ok": True, "value": any}
    {"t": "reply", "ok": False, "type": str, "message": str}

Frames, child -> host:
    {"t": "call", "op": str, "args": {str: plain data}}
    {"t": "out", "text": str}
    {"t": "done", "schedule": map | None, "condition": bool | None,
     "applied": bool}
    {"t": "error", "section": str, "line": int | None, "type": str,
     "message": str}
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time

import msgpack

from sandboxhost.errors import SandboxError

# No logger: the template and its children load this module (see zygote).

HEADER = struct.Struct(">I")
HEADER_BYTES = HEADER.size

# Host -> child frames carry compiled code and call results; the child
# accepts up to this much per frame (the host is trusted, this only stops
# a runaway reply from exhausting the child's small address space).
HOST_FRAME_MAX_BYTES = 4 * 1024 * 1024
# Default bound on child -> host frames when a caller gives none; the host
# passes the run's RunLimits.frame_bytes.
CHILD_FRAME_MAX_BYTES = 256 * 1024

# Bounds inside child frames.
OP_MAX_CHARS = 64
ARGS_MAX_KEYS = 32
ARG_KEY_MAX_CHARS = 64
PLAIN_MAX_DEPTH = 8
PLAIN_MAX_ITEMS = 10_000
TYPE_NAME_MAX_CHARS = 100
ERROR_MESSAGE_MAX_CHARS = 2000
LINE_MAX = 10_000_000
SCHEDULE_MAX_KEYS = 16

SECTIONS = ("schedule", "condition", "apply")
# "runtime" names failures of the child runtime itself (a bad start frame,
# code that does not load), outside any policy section.
ERROR_SECTIONS = SECTIONS + ("runtime",)
MODES = ("run", "schedule")

_OP_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_RECV_CHUNK_BYTES = 64 * 1024


# -- errors -----------------------------------------------------------------

class FrameError(SandboxError):
    """Raised when the channel cannot deliver a valid frame."""


class ChannelClosed(FrameError):
    """Raised when the peer closed the channel at a frame boundary."""


class ChannelTimeout(FrameError):
    """Raised when no complete frame arrived before the deadline."""


class FrameTooLarge(FrameError):
    """Raised when a frame header announces more than the allowed bytes."""

    def __init__(self, size: int, max_bytes: int):
        self.size = size
        self.max_bytes = max_bytes
        super().__init__(f"frame of {size} bytes is over the limit of"
                         f" {max_bytes} bytes")


class FrameTruncated(FrameError):
    """Raised when the peer closed the channel in the middle of a frame."""


class FrameGarbage(FrameError):
    """Raised when a frame's body is not a single valid msgpack value."""


class FrameSchemaError(FrameError):
    """Raised when a decoded frame does not match its message schema."""


# -- encoding ---------------------------------------------------------------

def encode_frame(obj: object, max_bytes: int | None = None) -> bytes:
    """Header plus msgpack body; FrameTooLarge when over ``max_bytes``."""
    try:
        body = msgpack.packb(obj, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameSchemaError(f"cannot encode frame: {exc}") from exc
    if max_bytes is not None and len(body) > max_bytes:
        raise FrameTooLarge(len(body), max_bytes)
    if len(body) > 0xFFFFFFFF:
        raise FrameTooLarge(len(body), 0xFFFFFFFF)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> object:
    """Decode one frame body with every length bounded by its size."""
    size = len(body)
    try:
        return msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True,
            max_str_len=size, max_bin_len=size, max_array_len=size,
            max_map_len=size // 2, max_ext_len=0)
    # msgpack reports bad input through several exception types (FormatError,
    # StackError, ExtraData, ValueError, UnicodeDecodeError, TypeError for a
    # non-str map key); all of them mean the same thing here.
    except Exception as exc:  # noqa: BLE001
        raise FrameGarbage(f"frame is not valid msgpack: {type(exc).__name__}:"
                           f" {str(exc)[:200]}") from exc


class Channel:
    """Frames over a connected stream socket; one reader, one writer.

    ``conn`` is a socket object (the host: deadlines work) or a raw file
    descriptor (the child: blocking, no deadlines, and no socket object to
    build, which costs ~0.1 ms of copy-on-write faults in a fresh child).
    """

    def __init__(self, conn: socket.socket | int):
        self._fd = conn if isinstance(conn, int) else None
        self.sock = None if isinstance(conn, int) else conn
        self._buf = bytearray()
        self._eof = False
        # Bytes read so far (the host caps what one run may send).
        self.received_bytes = 0

    def fileno(self) -> int:
        return self._fd if self.sock is None else self.sock.fileno()

    def close(self) -> None:
        if self.sock is None:
            os.close(self._fd)
        else:
            self.sock.close()

    def send(self, obj: object, *, max_bytes: int | None = None,
             deadline: float | None = None) -> None:
        """Send one frame; ChannelTimeout if the peer stops reading."""
        self.send_raw(encode_frame(obj, max_bytes), deadline=deadline)

    def send_raw(self, data: bytes, *, deadline: float | None = None) -> None:
        if self.sock is None:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            return
        self._set_timeout(deadline)
        try:
            self.sock.sendall(data)
        except socket.timeout as exc:
            raise ChannelTimeout("the peer stopped reading") from exc

    def recv(self, max_bytes: int, *, deadline: float | None = None) -> object:
        """Receive one frame of at most ``max_bytes`` body bytes.

        ``deadline`` is a time.monotonic() value; None waits forever.
        """
        header = self._read(HEADER_BYTES, deadline, at_boundary=True)
        (size,) = HEADER.unpack(header)
        if size > max_bytes:
            raise FrameTooLarge(size, max_bytes)
        body = self._read(size, deadline, at_boundary=False)
        return decode_body(body)

    def _set_timeout(self, deadline: float | None) -> None:
        if deadline is None:
            self.sock.settimeout(None)
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ChannelTimeout("deadline passed")
        self.sock.settimeout(remaining)

    def _recv_some(self, size: int, deadline: float | None) -> bytes:
        want = max(_RECV_CHUNK_BYTES, size)
        if self.sock is None:
            if deadline is not None:
                raise ValueError("a raw-fd channel has no deadlines")
            return os.read(self._fd, want)
        self._set_timeout(deadline)
        try:
            return self.sock.recv(want)
        except socket.timeout as exc:
            raise ChannelTimeout("no complete frame before the"
                                 " deadline") from exc

    def _read(self, size: int, deadline: float | None, *,
              at_boundary: bool) -> bytes:
        while len(self._buf) < size:
            if self._eof:
                if at_boundary and not self._buf:
                    raise ChannelClosed("the peer closed the channel")
                raise FrameTruncated(
                    f"the peer closed the channel inside a frame"
                    f" ({len(self._buf)} of {size} bytes received)")
            try:
                chunk = self._recv_some(size - len(self._buf), deadline)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self._eof = True
            self.received_bytes += len(chunk)
            self._buf += chunk
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data


# -- schemas ----------------------------------------------------------------

def _fail(message: str) -> None:
    raise FrameSchemaError(message)


def _check_str(what: str, value: object, max_chars: int) -> None:
    if type(value) is not str:
        _fail(f"{what} must be a string, not {type(value).__name__}")
    if len(value) > max_chars:
        _fail(f"{what} is longer than {max_chars} characters")


def _check_plain(what: str, value: object, depth: int = 0,
                 budget: list[int] | None = None) -> None:
    """Plain data only: None, bool, int, float, str, bytes, list, str map."""
    if budget is None:
        budget = [PLAIN_MAX_ITEMS]
    budget[0] -= 1
    if budget[0] < 0:
        _fail(f"{what} has more than {PLAIN_MAX_ITEMS} items")
    kind = type(value)
    if value is None or kind in (bool, int, float, str, bytes):
        return
    if depth >= PLAIN_MAX_DEPTH:
        _fail(f"{what} is nested deeper than {PLAIN_MAX_DEPTH} levels")
    if kind is list:
        for item in value:
            _check_plain(what, item, depth + 1, budget)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                _fail(f"{what} has a map key that is not a string")
            _check_plain(what, item, depth + 1, budget)
        return
    _fail(f"{what} holds a {kind.__name__}, which is not plain data")


def _check_keys(frame: dict, expected: frozenset) -> None:
    keys = set(frame)
    if keys != expected:
        extra = sorted(map(str, keys - expected))
        missing = sorted(expected - keys)
        parts = []
        if extra:
            parts.append(f"unexpected keys {extra}")
        if missing:
            parts.append(f"missing keys {missing}")
        _fail(f"{frame.get('t')!r} frame has " + " and ".join(parts))


def _check_call(frame: dict) -> None:
    op = frame["op"]
    _check_str("call op", op, OP_MAX_CHARS)
    if not _OP_RE.match(op):
        _fail(f"call op {op!r} is not a dotted name")
    args = frame["args"]
    if type(args) is not dict:
        _fail(f"call args must be a map, not {type(args).__name__}")
    if len(args) > ARGS_MAX_KEYS:
        _fail(f"call args have more than {ARGS_MAX_KEYS} keys")
    for key in args:
        _check_str("call argument name", key, ARG_KEY_MAX_CHARS)
    _check_plain("call args", args)


def _check_out(frame: dict) -> None:
    if type(frame["text"]) is not str:
        _fail("out text must be a string")


def _check_done(frame: dict) -> None:
    schedule = frame["schedule"]
    if schedule is not None:
        if type(schedule) is not dict:
            _fail("done schedule must be a map or None")
        if len(schedule) > SCHEDULE_MAX_KEYS:
            _fail(f"done schedule has more than {SCHEDULE_MAX_KEYS} keys")
        _check_plain("done schedule", schedule)
    if frame["condition"] is not None and type(frame["condition"]) is not bool:
        _fail("done condition must be a bool or None")
    if type(frame["applied"]) is not bool:
        _fail("done applied must be a bool")


def _check_error(frame: dict) -> None:
    section = frame["section"]
    _check_str("error section", section, 20)
    if section not in ERROR_SECTIONS:
        _fail(f"error section {section!r} is not one of {ERROR_SECTIONS}")
    line = frame["line"]
    if line is not None and (type(line) is not int or not 0 <= line <= LINE_MAX):
        _fail("error line must be None or an integer from 0 to"
              f" {LINE_MAX}")
    _check_str("error type", frame["type"], TYPE_NAME_MAX_CHARS)
    _check_str("error message", frame["message"], ERROR_MESSAGE_MAX_CHARS)


_CHILD_SCHEMAS = {
    "call": (frozenset({"t", "op", "args"}), _check_call),
    "out": (frozenset({"t", "text"}), _check_out),
    "done": (frozenset({"t", "schedule", "condition", "applied"}), _check_done),
    "error": (frozenset({"t", "section", "line", "type", "message"}),
              _check_error),
}


def check_child_frame(frame: object) -> dict:
    """Return ``frame`` if it is a valid child->host frame; else raise.

    Raises FrameSchemaError naming the first problem found.
    """
    if type(frame) is not dict:
        _fail(f"a frame must be a map, not {type(frame).__name__}")
    kind = frame.get("t")
    if type(kind) is not str or kind not in _CHILD_SCHEMAS:
        _fail(f"unknown frame type {str(kind)[:40]!r}")
    keys, check = _CHILD_SCHEMAS[kind]
    _check_keys(frame, keys)
    check(frame)
    return frame


_START_KEYS = frozenset({"t", "mode", "policy", "code", "now", "fixed_clock",
                         "max_calls", "output_bytes", "frame_bytes",
                         "test_builtins"})
_CODE_KEYS = frozenset({"filename", "schedule", "conditions", "apply"})


def check_start_frame(frame: object) -> dict:
    """Check the host's start frame in the child (trusted, but be exact)."""
    if type(frame) is not dict or frame.get("t") != "start":
        _fail("expected a start frame")
    _check_keys(frame, _START_KEYS)
    if frame["mode"] not in MODES:
        _fail(f"start mode must be one of {MODES}")
    _check_str("start policy", frame["policy"], 1000)
    _check_str("start now", frame["now"], 40)
    for key in ("fixed_clock", "test_builtins"):
        if type(frame[key]) is not bool:
            _fail(f"start {key} must be a bool")
    for key in ("max_calls", "output_bytes", "frame_bytes"):
        if type(frame[key]) is not int or frame[key] < 0:
            _fail(f"start {key} must be a non-negative integer")
    code = frame["code"]
    if type(code) is not dict:
        _fail("start code must be a map")
    _check_keys(code, _CODE_KEYS)
    _check_str("code filename", code["filename"], 1000)
    if type(code["schedule"]) is not bytes or type(code["apply"]) is not bytes:
        _fail("code schedule and apply must be bytes")
    conditions = code["conditions"]
    if type(conditions) is not list or any(type(c) is not bytes
                                           for c in conditions):
        _fail("code conditions must be a list of bytes")
    return frame


def check_reply_frame(frame: object) -> dict:
    """Check a reply frame in the child."""
    if type(frame) is not dict or frame.get("t") != "reply":
        _fail("expected a reply frame")
    if frame.get("ok") is True:
        _check_keys(frame, frozenset({"t", "ok", "value"}))
    elif frame.get("ok") is False:
        _check_keys(frame, frozenset({"t", "ok", "type", "message"}))
        _check_str("reply type", frame["type"], TYPE_NAME_MAX_CHARS)
        _check_str("reply message", frame["message"], ERROR_MESSAGE_MAX_CHARS)
    else:
        _fail("reply ok must be a bool")
    return frame
