"""Frames and schemas: what the host accepts from a child, and what not."""

import socket
import struct
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxhost import protocol
from sandboxhost.protocol import (
    Channel,
    ChannelClosed,
    ChannelTimeout,
    FrameError,
    FrameGarbage,
    FrameSchemaError,
    FrameTooLarge,
    FrameTruncated,
    check_child_frame,
    check_reply_frame,
    check_start_frame,
    decode_body,
    encode_frame,
)

CALL = {"t": "call", "op": "workers.change",
        "args": {"workers": ["w1@host"], "what": "prefetch", "by": 2}}
OUT = {"t": "out", "text": "hello\n"}
DONE_RUN = {"t": "done", "schedule": None, "condition": True, "applied": True}
DONE_SCHEDULE = {"t": "done", "schedule": {"type": "crontab", "minute": "*/5"},
                 "condition": None, "applied": False}
ERROR = {"t": "error", "section": "apply", "line": 7, "type": "ValueError",
         "message": "bad value"}
VALID_FRAMES = [CALL, OUT, DONE_RUN, DONE_SCHEDULE, ERROR]


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    yield Channel(ours), theirs
    ours.close()
    theirs.close()


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# -- framing ----------------------------------------------------------------

@pytest.mark.parametrize("frame", VALID_FRAMES)
def test_valid_frames_round_trip_through_a_channel(pair, frame):
    chan, theirs = pair
    theirs.sendall(encode_frame(frame))
    assert check_child_frame(chan.recv(1024)) == frame


def test_frames_split_across_writes_are_reassembled(pair):
    chan, theirs = pair
    data = encode_frame(CALL) + encode_frame(OUT)
    for i in range(len(data)):
        theirs.sendall(data[i:i + 1])
    assert chan.recv(1024) == CALL
    assert chan.recv(1024) == OUT


def test_a_raw_fd_channel_reads_and_writes_frames():
    ours, theirs = socket.socketpair()
    try:
        chan = Channel(ours.fileno())
        chan.send(OUT)
        assert Channel(theirs).recv(1024) == OUT
        theirs.sendall(encode_frame(CALL))
        assert chan.recv(1024) == CALL
    finally:
        ours.close()
        theirs.close()


def test_an_oversized_header_is_refused_before_reading_the_body(pair):
    chan, theirs = pair
    theirs.sendall(struct.pack(">I", 10**8) + b"x" * 10)
    with pytest.raises(FrameTooLarge) as info:
        chan.recv(1024)
    assert str(info.value) == ("frame of 100000000 bytes is over the limit of"
                               " 1024 bytes")


def test_encoding_over_the_limit_is_refused():
    with pytest.raises(FrameTooLarge):
        encode_frame({"t": "out", "text": "x" * 2000}, 1000)


def test_a_frame_cut_short_is_truncated(pair):
    chan, theirs = pair
    theirs.sendall(encode_frame(OUT)[:-2])
    theirs.close()
    with pytest.raises(FrameTruncated):
        chan.recv(1024)


def test_a_header_cut_short_is_truncated(pair):
    chan, theirs = pair
    theirs.sendall(b"\x00\x00")
    theirs.close()
    with pytest.raises(FrameTruncated):
        chan.recv(1024)


def test_a_close_between_frames_is_a_clean_close(pair):
    chan, theirs = pair
    theirs.sendall(encode_frame(OUT))
    theirs.close()
    assert chan.recv(1024) == OUT
    with pytest.raises(ChannelClosed):
        chan.recv(1024)


def test_no_frame_before_the_deadline_times_out(pair):
    chan, _theirs = pair
    with pytest.raises(ChannelTimeout):
        chan.recv(1024, deadline=time.monotonic() + 0.05)


@pytest.mark.parametrize("body", [
    b"\xc1",                                  # never-used msgpack byte
    b"\x92\x01",                              # array of 2 with 1 item
    msgpack.packb({"t": "out"}) + b"\x00",    # trailing bytes
    msgpack.packb(msgpack.ExtType(5, b"abc")),  # extension type
    msgpack.packb(msgpack.Timestamp(1, 0)),   # timestamps are extensions
    b"\xda\xff\xff" + b"x" * 10,              # str longer than the frame
    b"\x91" * 5000 + b"\x00",                 # nested too deep
    msgpack.packb({1: "int key"}),            # non-string map key
    b"\xa2\xff\xfe",                          # invalid UTF-8 string
])
def test_garbage_bodies_are_refused(pair, body):
    chan, theirs = pair
    theirs.sendall(raw_frame(body))
    with pytest.raises(FrameGarbage):
        chan.recv(100_000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_frame_errors(body):
    try:
        check_child_frame(decode_body(body))
    except FrameError:
        pass


# -- child frame schemas ----------------------------------------------------

@pytest.mark.parametrize("frame, message", [
    (["t", "out"], "a frame must be a map, not list"),
    ({"t": "reply", "ok": True, "value": 1}, "unknown frame type 'reply'"),
    ({"t": "start"}, "unknown frame type 'start'"),
    ({"text": "x"}, "unknown frame type 'None'"),
    ({"t": "out", "text": "x", "extra": 1},
     "'out' frame has unexpected keys ['extra']"),
    ({"t": "call", "op": "x"}, "'call' frame has missing keys ['args']"),
    ({"t": "out", "text": b"bytes"}, "out text must be a string"),
    ({"t": "call", "op": 5, "args": {}},
     "call op must be a string, not int"),
    ({"t": "call", "op": "rm -rf", "args": {}},
     "call op 'rm -rf' is not a dotted name"),
    ({"t": "call", "op": "x" * 65, "args": {}},
     "call op is longer than 64 characters"),
    ({"t": "call", "op": "x", "args": [1]},
     "call args must be a map, not list"),
    ({"t": "call", "op": "x", "args": {b"k": 1}},
     "call argument name must be a string, not bytes"),
    ({"t": "call", "op": "x", "args": {"k": {b"k": 1}}},
     "call args has a map key that is not a string"),
    ({"t": "call", "op": "x", "args": {"k": [[[[[[[[[1]]]]]]]]]}},
     "call args is nested deeper than 8 levels"),
    ({"t": "call", "op": "x", "args": {"k": list(range(10_001))}},
     "call args has more than 10000 items"),
    ({"t": "done", "schedule": [], "condition": None, "applied": False},
     "done schedule must be a map or None"),
    ({"t": "done", "schedule": None, "condition": 1, "applied": True},
     "done condition must be a bool or None"),
    ({"t": "done", "schedule": None, "condition": True, "applied": 1},
     "done applied must be a bool"),
    ({"t": "error", "section": "teardown", "line": 1, "type": "E",
      "message": "m"},
     "error section 'teardown' is not one of ('schedule', 'condition',"
     " 'apply', 'runtime')"),
    ({"t": "error", "section": "apply", "line": True, "type": "E",
      "message": "m"},
     "error line must be None or an integer from 0 to 10000000"),
    ({"t": "error", "section": "apply", "line": -1, "type": "E",
      "message": "m"},
     "error line must be None or an integer from 0 to 10000000"),
    ({"t": "error", "section": "apply", "line": 1, "type": "E" * 101,
      "message": "m"},
     "error type is longer than 100 characters"),
    ({"t": "error", "section": "apply", "line": None, "type": "E",
      "message": "m" * 2001},
     "error message is longer than 2000 characters"),
])
def test_frames_off_schema_are_refused_with_the_reason(frame, message):
    with pytest.raises(FrameSchemaError) as info:
        check_child_frame(frame)
    assert str(info.value) == message


def test_plain_data_of_every_kind_is_accepted_in_call_args():
    frame = {"t": "call", "op": "stats", "args": {
        "a": None, "b": True, "c": -3, "d": 1.5, "e": "s", "f": b"b",
        "g": [1, [2, {"h": "i"}]]}}
    assert check_child_frame(frame) is frame


# -- host frames, as the child checks them ----------------------------------

def start_frame(**changes):
    frame = {"t": "start", "mode": "run", "policy": "p",
             "code": {"filename": "p.policy", "schedule": b"", "conditions": [],
                      "apply": b""},
             "now": "2026-01-01T00:00:00", "fixed_clock": False,
             "max_calls": 10, "output_bytes": 100, "frame_bytes": 65536,
             "test_builtins": False}
    frame.update(changes)
    return frame


def test_a_start_frame_is_checked_exactly():
    assert check_start_frame(start_frame())["mode"] == "run"
    with pytest.raises(FrameSchemaError):
        check_start_frame(start_frame(mode="exec"))
    with pytest.raises(FrameSchemaError):
        check_start_frame(start_frame(extra=1))
    with pytest.raises(FrameSchemaError):
        check_start_frame(start_frame(code={"filename": "f", "schedule": b"",
                                            "conditions": ["str"],
                                            "apply": b""}))


def test_reply_frames_are_checked():
    assert check_reply_frame({"t": "reply", "ok": True, "value": [1]})
    assert check_reply_frame({"t": "reply", "ok": False, "type": "E",
                              "message": "m"})
    with pytest.raises(FrameSchemaError):
        check_reply_frame({"t": "reply", "ok": 1, "value": 1})
    with pytest.raises(FrameSchemaError):
        check_reply_frame({"t": "reply", "ok": False, "value": 1})


def test_frame_limits_are_those_the_module_documents():
    assert protocol.HEADER_BYTES == 4
    assert protocol.ERROR_SECTIONS == ("schedule", "condition", "apply",
                                       "runtime")
