"""The child side of a run, after the zygote has hardened the process.

``Runtime.serve()`` reads the start frame, loads the code objects it
carries (marshal, only from that frame), evaluates the sections and reports
``done`` or ``error``; then the process ends with os._exit. Every API use in
policy code goes through ``Bridge``, which turns it into a ``call`` frame
and waits for the reply.

The zygote builds one ``Runtime`` before it forks: the channel object, the
bridge and one namespace per section. Each child gets its own copy-on-write
copy, so every run still starts from a pristine namespace that no other
run has seen, and a child is spared ~0.3 ms of building (measured: the
copy-on-write faults of touching the builtins and API objects).
"""

from __future__ import annotations

import builtins
import datetime
import marshal
import mmap
import os
import signal
import socket
import time
import types

from sandboxhost import namespace, protocol
from sandboxhost.protocol import Channel

# No logger: this module runs in the template and its children (see zygote).

# Exit codes of a child, read by the host when no final frame arrived.
EXIT_OK = 0
EXIT_REPORT_FAILED = 70

# Address space unmapped when policy code runs out of memory, so that the
# error can still be encoded and sent; RLIMIT_AS counts it, so keep it
# small. Mapped once in the zygote and never touched: a child inherits it
# without a page fault (a bytearray per child cost 64 of them).
MEMORY_RESERVE_BYTES = 256 * 1024

# Runs of a fixed policy of ours that the zygote serves to itself before it
# freezes its heap (see rehearse).
REHEARSAL_ROUNDS = 12

LIMIT_ERROR_TYPE = "LimitExceeded"
MEMORY_ERROR_MESSAGE = "out of memory (memory_bytes)"


class RunBudgetExceeded(Exception):
    """Raised in policy code when the run used up a budget (calls, output)."""


class _TestScheduleSpec:
    """A schedule value for unsafe test runs."""

    __slots__ = ("data",)

    def __init__(self, data: dict):
        self.data = data


class Bridge:
    """What the namespace's API objects use to reach the manager."""

    def __init__(self, channel: Channel):
        self._channel = channel
        self.configure(max_calls=0, output_bytes=0,
                       frame_bytes=protocol.HOST_FRAME_MAX_BYTES,
                       start=datetime.datetime(2000, 1, 1), fixed_clock=True)

    def configure(self, *, max_calls: int, output_bytes: int,
                  frame_bytes: int,
                  start: datetime.datetime, fixed_clock: bool) -> None:
        """Set the run's budgets and clock (from its start frame)."""
        self._max_calls = max_calls
        self._calls = 0
        self._output_bytes = output_bytes
        self._output_left = output_bytes
        self._frame_bytes = frame_bytes
        self._start = start
        self._start_mono = time.monotonic()
        self._fixed = fixed_clock

    def call(self, op: str, args: dict) -> object:
        """Send a call frame and return the value of the host's reply."""
        if self._calls >= self._max_calls:
            raise RunBudgetExceeded(
                f"call limit reached: a run may make at most"
                f" {self._max_calls} calls (max_calls)")
        self._calls += 1
        self._send({"t": "call", "op": op, "args": args}, "the call's"
                   " arguments")
        reply = protocol.check_reply_frame(
            self._channel.recv(protocol.HOST_FRAME_MAX_BYTES))
        if reply["ok"]:
            return reply["value"]
        raise namespace.CallFailed(reply["message"], reply["type"])

    def print(self, text: str) -> None:
        """Send policy output to the host, within the run's output budget."""
        # An empty print still costs a byte, or a flood of them would
        # cost the host a frame each for nothing.
        size = max(1, len(text.encode("utf-8", "surrogatepass")))
        if size > self._output_left:
            self._output_left = 0
            raise RunBudgetExceeded(
                f"output limit reached: a run may print at most"
                f" {self._output_bytes} bytes (output_bytes)")
        self._output_left -= size
        self._send({"t": "out", "text": text}, "the printed text")

    def _send(self, frame: dict, what: str) -> None:
        """Send a frame, or raise in policy code if the host would refuse
        it as too large (so the error names the policy's line)."""
        try:
            data = protocol.encode_frame(frame, self._frame_bytes)
        except protocol.FrameTooLarge as exc:
            raise RunBudgetExceeded(
                f"{what} are too large to send: {exc.size} bytes, more than"
                f" {self._frame_bytes} (frame_bytes)") from None
        self._channel.send_raw(data)

    def now(self) -> datetime.datetime:
        """The run's clock: fixed, or the start time plus elapsed time."""
        if self._fixed:
            return self._start
        elapsed_s = time.monotonic() - self._start_mono
        return self._start + datetime.timedelta(seconds=elapsed_s)


def _test_namespace(section: str, bridge: Bridge) -> dict:
    """Full Python builtins: only for tests of the process layer alone."""

    def call(op: str, **args: object) -> object:
        return bridge.call(op, args)

    def print_(*values: object, sep: str = " ", end: str = "\n",
               **_ignored: object) -> None:
        bridge.print(sep.join(str(v) for v in values) + end)

    def schedule(**data: object) -> _TestScheduleSpec:
        return _TestScheduleSpec(dict(data))

    return {"__builtins__": builtins, "__name__": "__policy__",
            "call": call, "print": print_, "now": bridge.now,
            "schedule": schedule, "section": section}


# -- reporting --------------------------------------------------------------

def _policy_line(exc: BaseException, filename: str) -> int | None:
    """The innermost traceback line that lies in the policy file."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _exc_text(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return MEMORY_ERROR_MESSAGE
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - str() of a hostile object
        text = "<unprintable exception>"
    if len(text) > protocol.ERROR_MESSAGE_MAX_CHARS:
        text = text[:protocol.ERROR_MESSAGE_MAX_CHARS - 3] + "..."
    # A lone surrogate cannot be sent as UTF-8: escape it, or the report
    # itself fails and the run looks like a crash without a line.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _type_name(exc: BaseException) -> str:
    if isinstance(exc, namespace.CallFailed):
        name = exc.type_name
    elif isinstance(exc, RunBudgetExceeded):
        name = LIMIT_ERROR_TYPE
    else:
        name = type(exc).__name__
    return str(name)[:protocol.TYPE_NAME_MAX_CHARS]


def _error_frame(section: str, exc: BaseException, filename: str) -> dict:
    return {"t": "error", "section": section,
            "line": _policy_line(exc, filename), "type": _type_name(exc),
            "message": _exc_text(exc)}


# Error frames for MemoryError, encoded at import (in the zygote): when
# even the freed reserve is not enough, these bytes still go out.
_MEMORY_ERROR_FRAMES = {
    section: protocol.encode_frame({
        "t": "error", "section": section, "line": None, "type": "MemoryError",
        "message": MEMORY_ERROR_MESSAGE})
    for section in protocol.ERROR_SECTIONS}


def _load_code(data: bytes, what: str) -> types.CodeType:
    code = marshal.loads(data)
    if not isinstance(code, types.CodeType):
        raise TypeError(f"{what} is not a code object")
    return code


# -- running ----------------------------------------------------------------

class Runtime:
    """One child's run: prepared in the zygote, served in the child."""

    def __init__(self, channel: Channel, *, allow_test_builtins: bool = False):
        self.channel = channel
        self.bridge = Bridge(channel)
        self.allow_test_builtins = allow_test_builtins
        self.namespaces = {False: {s: namespace.build_namespace(s, self.bridge)
                                   for s in protocol.SECTIONS}}
        if allow_test_builtins:
            self.namespaces[True] = {s: _test_namespace(s, self.bridge)
                                     for s in protocol.SECTIONS}
        self._where = "runtime"
        # Private: a shared mapping made in the zygote would be one set of
        # pages for every child, a channel between runs.
        self._reserve = mmap.mmap(-1, MEMORY_RESERVE_BYTES,
                                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def close(self) -> None:
        """Unmap the memory reserve (a Runtime that will serve no more)."""
        self._reserve.close()

    def serve(self) -> int:
        """Run one start frame's policy and report; returns the exit code.

        The caller ends the process with os._exit(code): nothing of the
        zygote's state (atexit handlers, buffers) may run in a child.
        """
        filename = "<policy>"
        try:
            start = protocol.check_start_frame(
                self.channel.recv(protocol.HOST_FRAME_MAX_BYTES))
            filename = start["code"]["filename"]
            frame = self._run(start)
            exc = None
        # Policy code may raise anything, SystemExit included; all of it is
        # reported as the run's error.
        except BaseException as exc_:  # noqa: BLE001
            exc = exc_
        section = self._where

        try:
            if exc is not None:
                if isinstance(exc, MemoryError):
                    # Give back what policy code holds so that reporting
                    # can allocate; the namespaces are not used again.
                    self._reserve.close()
                    for namespaces in self.namespaces.values():
                        for ns in namespaces.values():
                            ns.clear()
                frame = _error_frame(section, exc, filename)
            self.channel.send(frame)
        except MemoryError:
            try:
                self.channel.send_raw(_MEMORY_ERROR_FRAMES[section])
            except BaseException:  # noqa: BLE001 - nothing left to report with
                return EXIT_REPORT_FAILED
        except BaseException:  # noqa: BLE001 - the channel is gone
            return EXIT_REPORT_FAILED
        return EXIT_OK

    def _run(self, start: dict) -> dict:
        """Evaluate the sections for the start frame's mode; the done frame.

        ``self._where`` names the section being evaluated, so that whatever
        escapes (MemoryError included) is reported against it.
        """
        test_builtins = start["test_builtins"]
        if test_builtins and not self.allow_test_builtins:
            raise PermissionError("test builtins were asked for, but this"
                                  " zygote was not started for tests")
        namespaces = self.namespaces[test_builtins]
        self.bridge.configure(
            max_calls=start["max_calls"], output_bytes=start["output_bytes"],
            frame_bytes=start["frame_bytes"],
            start=datetime.datetime.fromisoformat(start["now"]),
            fixed_clock=start["fixed_clock"])
        code = start["code"]

        if start["mode"] == "schedule":
            schedule = _load_code(code["schedule"], "schedule")
            self._where = "schedule"
            value = eval(schedule, namespaces["schedule"])  # noqa: S307
            spec_types: tuple[type, ...] = (namespace.ScheduleSpec,)
            if test_builtins:
                spec_types += (_TestScheduleSpec,)
            if not isinstance(value, spec_types) or type(value.data) is not dict:
                raise TypeError(
                    "the schedule section must give a schedule such as"
                    f" crontab(...) or every(...), not {type(value).__name__}")
            return {"t": "done", "schedule": value.data, "condition": None,
                    "applied": False}

        conditions = [_load_code(c, "condition") for c in code["conditions"]]
        apply = _load_code(code["apply"], "apply")
        # Sections are ORed, stopping at the first that holds; none at all
        # means "always".
        holds = not conditions
        for condition in conditions:
            self._where = "condition"
            holds = bool(eval(condition, namespaces["condition"]))  # noqa: S307
            if holds:
                break
        if holds:
            self._where = "apply"
            exec(apply, namespaces["apply"])  # noqa: S102
        self._where = "runtime"
        return {"t": "done", "schedule": None, "condition": holds,
                "applied": holds}


def serve(channel: Channel, *, allow_test_builtins: bool = False) -> int:
    """Build a Runtime on ``channel`` and serve one run (tests, tools)."""
    return Runtime(channel, allow_test_builtins=allow_test_builtins).serve()


def _cpu_time_exceeded(signum: int, frame: object) -> None:
    raise RunBudgetExceeded("CPU time limit reached (cpu_time_s)")


def catch_cpu_limit() -> None:
    """For the zygote: SIGXCPU, sent at a child's soft CPU limit, raises in
    the policy code that is running, so the error names its section and
    line. Code that runs in C until then (a huge sum()) cannot be
    interrupted: the hard limit a second later kills it."""
    signal.signal(signal.SIGXCPU, _cpu_time_exceeded)


def rehearse(rounds: int = REHEARSAL_ROUNDS) -> None:
    """Serve a fixed policy of ours a few times, in this process.

    For the zygote, before it freezes its heap: CPython 3.11 writes into a
    code object on each of its first calls (a warm-up counter, then the
    specialised bytecode), so every function that a child is the first to
    run costs that child copy-on-write faults. Run here, the child's code
    paths are already specialised when the zygote forks. The Runtime used
    is thrown away: the children's namespaces are built afterwards and have
    seen no run.
    """
    schedule = marshal.dumps(compile("crontab(minute='*/5')", "<rehearsal>",
                                     "eval"))
    condition = marshal.dumps(compile("now().minute >= 0 and len(workers.names())",
                                      "<rehearsal>", "eval"))
    apply = marshal.dumps(compile("x = 1 + 1\nprint('rehearsal', x)",
                                  "<rehearsal>", "exec"))
    code = {"filename": "<rehearsal>", "schedule": schedule,
            "conditions": [condition], "apply": apply}
    reply = protocol.encode_frame({"t": "reply", "ok": True, "value": ["w"]})
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    rehearsal = Runtime(Channel(theirs.fileno()))
    try:
        for i in range(rounds):
            mode = "schedule" if i % 2 else "run"
            ours.sendall(protocol.encode_frame({
                "t": "start", "mode": mode, "policy": "rehearsal",
                "code": code, "now": "2000-01-01T00:00:00",
                "fixed_clock": bool(i % 3), "max_calls": 4,
                "output_bytes": 1024, "frame_bytes": 65536,
                "test_builtins": False}))
            if mode == "run":
                ours.sendall(reply)
            rehearsal._where = "runtime"
            if rehearsal.serve() != EXIT_OK:
                raise RuntimeError("the rehearsal run could not report")
            # Drain what it sent (out and done frames).
            ours.setblocking(False)
            try:
                while ours.recv(1 << 16):
                    pass
            except BlockingIOError:
                pass
            ours.setblocking(True)
    finally:
        rehearsal.close()
        ours.close()
        theirs.close()


def run_and_exit(runtime: Runtime) -> None:
    """Serve, then end the process without running any Python teardown."""
    code = EXIT_REPORT_FAILED
    try:
        code = runtime.serve()
    finally:
        os._exit(code)
