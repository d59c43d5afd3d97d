"""The host runs compiled sections in children: results, calls, errors."""

import datetime
import errno
import logging
import marshal
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from sandboxhost import protocol, runtime
from sandboxhost.errors import HostError, OperationError, PolicyError
from sandboxhost.host import CallRecord, Host
from sandboxhost.limits import RunLimits

FILENAME = "sample.policy"

# Sections compiled by the tests themselves, run with full builtins: this
# file tests the host and the runtime, not the language.
APPLY_CALLS = """\
n = call("workers.get", worker="w1", what="prefetch")
print("prefetch is", n)
call("workers.change", workers=["w1"], what="prefetch", by=n + 1)
"""
APPLY_FAILS_ON_LINE_3 = """\
a = 1
b = 0
c = a / b
"""
APPLY_REFUSED_CALL = """\
x = 1
call("tasks.set", tasks=["t"], setting="rate_limit", value="fast")
"""
APPLY_PRINTS = 'print("one")\nprint("two", 2, sep="-")\n'
APPLY_NOTHING = "x = 1\n"


def wire(apply: str = APPLY_NOTHING, conditions: tuple[str, ...] = (),
         schedule: str = "schedule(type='every', seconds=60)") -> dict:
    return {
        "filename": FILENAME,
        "schedule": marshal.dumps(compile(schedule, FILENAME, "eval")),
        "conditions": [marshal.dumps(compile(c, FILENAME, "eval"))
                       for c in conditions],
        "apply": marshal.dumps(compile(apply, FILENAME, "exec")),
    }


def no_calls(op: str, args: dict) -> object:
    raise AssertionError(f"unexpected call {op} {args}")


class Recorder:
    """A handler that answers from a table and remembers the calls."""

    def __init__(self, answers: dict | None = None):
        self.answers = answers or {}
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, op: str, args: dict) -> object:
        self.calls.append((op, args))
        return self.answers.get(op)


@pytest.fixture(scope="module")
def host():
    with Host(unsafe_test_builtins=True) as h:
        h.start()
        yield h


# -- results ----------------------------------------------------------------

def test_a_run_with_no_condition_applies(host):
    outcome = host.run(wire(), handler=no_calls, policy="p")
    assert outcome.ok and outcome.error is None
    assert (outcome.condition, outcome.applied) == (True, True)
    assert outcome.mode == "run" and outcome.schedule is None
    assert outcome.pid and outcome.pid != os.getpid()


def test_conditions_are_ored_and_stop_at_the_first_true(host):
    outcome = host.run(wire("print('applied')",
                            conditions=("call('c1') > 1", "call('c2') > 1",
                                        "call('c3') > 1")),
                       handler=Recorder({"c1": 0, "c2": 5, "c3": 5}))
    assert [c.op for c in outcome.calls] == ["c1", "c2"]
    assert (outcome.condition, outcome.applied) == (True, True)
    assert outcome.output == ["applied\n"]


def test_when_no_condition_holds_apply_does_not_run(host):
    outcome = host.run(wire("print('applied')", conditions=("0", "[]", "None")),
                       handler=no_calls)
    assert outcome.ok
    assert (outcome.condition, outcome.applied) == (False, False)
    assert outcome.output == []


def test_schedule_mode_returns_the_schedule_as_data(host):
    outcome = host.run(wire(schedule="schedule(type='crontab', minute='*/5')"),
                       handler=no_calls, mode="schedule")
    assert outcome.ok
    assert outcome.schedule == {"type": "crontab", "minute": "*/5"}
    assert (outcome.condition, outcome.applied) == (None, False)


def test_a_schedule_that_is_not_a_schedule_is_a_policy_error(host):
    outcome = host.run(wire(schedule="42"), handler=no_calls, mode="schedule")
    assert isinstance(outcome.error, PolicyError)
    assert outcome.error.section == "schedule"
    assert outcome.error.type_name == "TypeError"
    assert outcome.error.message.endswith("not int")


def test_calls_are_served_by_the_handler_in_order(host):
    handler = Recorder({"workers.get": 4})
    outcome = host.run(wire(APPLY_CALLS), handler=handler, policy="p")
    assert outcome.ok, outcome.error
    assert handler.calls == [
        ("workers.get", {"worker": "w1", "what": "prefetch"}),
        ("workers.change", {"workers": ["w1"], "what": "prefetch", "by": 5}),
    ]
    assert outcome.calls == [
        CallRecord("workers.get", {"worker": "w1", "what": "prefetch"}, True, 4),
        CallRecord("workers.change",
                   {"workers": ["w1"], "what": "prefetch", "by": 5}, True, None),
    ]
    assert outcome.output == ["prefetch is 4\n"]


def test_output_is_kept_per_print(host):
    outcome = host.run(wire(APPLY_PRINTS), handler=no_calls)
    assert outcome.output == ["one\n", "two-2\n"]


# -- errors -----------------------------------------------------------------

def test_an_exception_names_its_section_line_and_type(host):
    outcome = host.run(wire(APPLY_FAILS_ON_LINE_3), handler=no_calls)
    assert not outcome.ok
    error = outcome.error
    assert isinstance(error, PolicyError)
    assert (error.section, error.line, error.type_name) == (
        "apply", 3, "ZeroDivisionError")
    assert str(error) == ("in apply at line 3: division by zero"
                          " (ZeroDivisionError)")


def test_an_exception_in_a_condition_names_the_condition(host):
    outcome = host.run(wire(conditions=("1", "\n\n{}['missing']")),
                       handler=no_calls)
    # The first condition holds, so the failing one never runs.
    assert outcome.ok
    outcome = host.run(wire(conditions=("0", "\n\n{}['missing']")),
                       handler=no_calls)
    assert (outcome.error.section, outcome.error.line) == ("condition", 3)
    assert outcome.error.type_name == "KeyError"


def test_a_refused_call_raises_in_policy_code_at_its_line(host):
    def refuse(op: str, args: dict) -> object:
        raise OperationError("rate_limit must look like '10/s', not 'fast'",
                             type_name="ValueError")

    outcome = host.run(wire(APPLY_REFUSED_CALL), handler=refuse)
    error = outcome.error
    assert (error.section, error.line, error.type_name) == (
        "apply", 2, "ValueError")
    assert error.message == "rate_limit must look like '10/s', not 'fast'"
    assert outcome.calls[0].ok is False
    assert outcome.calls[0].error == error.message


def test_a_handler_bug_is_an_internal_error_and_is_logged(host, caplog):
    def broken(op: str, args: dict) -> object:
        raise KeyError("oops")

    caplog.set_level(logging.ERROR, logger="sandboxhost.host")
    outcome = host.run(wire("call('x')"), handler=broken, policy="buggy")
    assert outcome.error.message == "internal error"
    assert outcome.error.type_name == "InternalError"
    [record] = caplog.records
    assert record.getMessage() == "policy buggy: the handler for x failed"
    assert record.exc_info[0] is KeyError


def test_a_value_msgpack_cannot_send_is_an_internal_error(host, caplog):
    caplog.set_level(logging.ERROR, logger="sandboxhost.host")
    outcome = host.run(wire("print(call('x'))"), handler=lambda op, a: object())
    assert outcome.error.message == "internal error"
    assert outcome.calls[0].ok is False


def test_the_run_goes_on_after_a_failed_call(host):
    def handler(op: str, args: dict) -> object:
        if op == "bad":
            raise RuntimeError("handler bug")
        return 7

    # Only test code can catch the error; policies cannot spell try.
    source = ("try:\n    call('bad')\nexcept Exception as e:\n"
              "    print(type(e).__name__, e.type_name, e)\n"
              "print(call('good'))\n")
    outcome = host.run(wire(source), handler=handler)
    assert outcome.ok
    assert outcome.output == ["CallFailed InternalError internal error\n",
                              "7\n"]
    assert [(c.op, c.ok) for c in outcome.calls] == [("bad", False),
                                                     ("good", True)]


# -- the clock --------------------------------------------------------------

def test_a_fixed_clock_gives_the_run_its_time(host):
    when = datetime.datetime(2026, 3, 4, 5, 6, 7)
    outcome = host.run(wire("print(now().isoformat())"), handler=no_calls,
                       now=when, fixed_clock=True)
    assert outcome.output == ["2026-03-04T05:06:07\n"]


def test_a_running_clock_starts_at_the_given_time(host):
    when = datetime.datetime(2026, 3, 4, 5, 6, 7)
    source = ("import datetime\n"
              "start = datetime.datetime(2026, 3, 4, 5, 6, 7)\n"
              "print(start <= now() < start + datetime.timedelta(minutes=1))")
    outcome = host.run(wire(source), handler=no_calls, now=when)
    assert outcome.output == ["True\n"]


# -- the host ---------------------------------------------------------------

def test_runs_from_several_threads_at_once(host):
    results = {}

    def slot(n: int) -> None:
        outs = []
        for i in range(20):
            outcome = host.run(wire(f"print(call('id'), {n}, {i})"),
                               handler=lambda op, a, n=n: n)
            outs.append(outcome.output)
        results[n] = outs

    threads = [threading.Thread(target=slot, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n in range(3):
        assert results[n] == [[f"{n} {n} {i}\n"] for i in range(20)]


def test_a_dead_template_process_is_restarted_and_logged(caplog):
    caplog.set_level(logging.WARNING, logger="sandboxhost.host")
    with Host(unsafe_test_builtins=True) as host:
        assert host.run(wire(), handler=no_calls).ok
        old = host.zygote_pid
        os.kill(old, signal.SIGKILL)
        assert host.run(wire(), handler=no_calls).ok
        assert host.zygote_pid != old
    assert f"template process {old} died; starting a new one" in [
        r.getMessage() for r in caplog.records]


def test_children_get_the_real_namespace_unless_the_host_is_for_tests():
    with Host() as host:
        outcome = host.run(wire("open('/etc/hostname')"), handler=no_calls)
    assert outcome.error.type_name == "NameError"
    assert outcome.error.message == "name 'open' is not defined"


def test_children_see_nothing_of_the_templates_rehearsal():
    # The template serves itself a policy that sets x and prints before it
    # freezes its heap; a child's namespaces must be the pristine ones.
    with Host() as host:
        outcome = host.run(wire("print(x)"), handler=no_calls)
        reported = host.run(wire("print(1)"), handler=no_calls)
    assert outcome.error.type_name == "NameError"
    assert outcome.error.message == "name 'x' is not defined"
    assert reported.ok and reported.output == ["1\n"]


def test_a_rehearsal_runs_every_mode_and_leaves_no_open_descriptor():
    before = sorted(os.listdir("/proc/self/fd"))
    runtime.rehearse(rounds=4)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_the_runtime_refuses_test_builtins_it_was_not_started_for():
    ours, theirs = socket.socketpair()
    frame = {"t": "start", "mode": "run", "policy": "p", "code": wire(),
             "now": "2026-01-01T00:00:00", "fixed_clock": True,
             "max_calls": 1, "output_bytes": 10, "frame_bytes": 65536,
             "test_builtins": True}
    try:
        ours.sendall(protocol.encode_frame(frame))
        code = runtime.serve(protocol.Channel(theirs),
                             allow_test_builtins=False)
        reply = protocol.Channel(ours).recv(10_000)
    finally:
        ours.close()
        theirs.close()
    assert code == runtime.EXIT_OK
    assert reply == {"t": "error", "section": "runtime", "line": None,
                     "type": "PermissionError",
                     "message": "test builtins were asked for, but this"
                                " zygote was not started for tests"}


def test_an_unknown_user_to_run_as_is_a_host_error(host):
    if os.geteuid() != 0:
        pytest.skip("children switch user only when the host is root")
    with pytest.raises(HostError) as info:
        host.run(wire(), handler=no_calls,
                 limits=RunLimits(run_as_user="no-such-user-here"))
    assert "no-such-user-here" in str(info.value)
    assert host.run(wire(), handler=no_calls).ok


@pytest.mark.parametrize("field, value", [
    ("cpu_time_s", 0), ("cpu_time_s", 0.5), ("memory_bytes", 1 << 63),
    ("memory_bytes", 1024), ("open_files", 3), ("max_calls", -1),
    ("wall_timeout_s", 0), ("wall_timeout_s", float("nan")),
    ("frame_bytes", True), ("run_as_user", None), ("landlock", None),
    ("seccomp", 0),
])
def test_limits_out_of_range_are_refused_when_made(field, value):
    with pytest.raises(ValueError) as info:
        RunLimits().replace(**{field: value})
    assert str(info.value).startswith(field)


def test_a_root_host_refuses_to_run_children_as_root(host):
    if os.geteuid() != 0:
        pytest.skip("children switch user only when the host is root")
    for user in ("", "root"):
        with pytest.raises(HostError) as info:
            host.run(wire(), handler=no_calls,
                     limits=RunLimits(run_as_user=user))
        assert "root" in str(info.value)
    assert host.run(wire(), handler=no_calls).ok


def test_missing_kernel_layers_are_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="sandboxhost.host")
    host = Host()
    caps = {"missing": {"landlock": "no Landlock in this kernel (ENOSYS)"}}
    host._report_caps(caps)
    host._report_caps(caps)
    assert [r.getMessage() for r in caplog.records] == [
        "policy children run without landlock: no Landlock in this kernel"
        " (ENOSYS)"]


def test_an_unknown_mode_is_refused_before_anything_runs(host):
    with pytest.raises(ValueError):
        host.run(wire(), handler=no_calls, mode="exec")


def test_a_closed_host_starts_no_more_children():
    host = Host()
    host.close()
    with pytest.raises(HostError):
        host.run(wire(), handler=no_calls)


def test_runs_log_their_policy_and_pid(host, caplog):
    caplog.set_level(logging.DEBUG, logger="sandboxhost.host")
    outcome = host.run(wire(), handler=no_calls, policy="logged")
    assert any(r.getMessage().startswith(f"policy logged: run in pid"
                                         f" {outcome.pid} succeeded")
               for r in caplog.records)


def test_the_limits_given_reach_the_child(host):
    limits = RunLimits(open_files=6, memory_bytes=200 * 1024 * 1024,
                       cpu_time_s=3)
    source = ("import resource as r\n"
              "print([r.getrlimit(x) for x in (r.RLIMIT_NOFILE, r.RLIMIT_AS,"
              " r.RLIMIT_CPU, r.RLIMIT_FSIZE, r.RLIMIT_NPROC,"
              " r.RLIMIT_CORE)])")
    outcome = host.run(wire(source), handler=no_calls, limits=limits)
    assert outcome.output == [
        f"[(6, 6), ({200 * 1024 * 1024}, {200 * 1024 * 1024}), (3, 4),"
        " (0, 0), (0, 0), (0, 0)]\n"]


def test_a_compiled_policy_from_the_language_runs():
    language = pytest.importorskip("sandboxhost.language")
    compiled = language.check_and_compile(
        "policy:\n"
        "    schedule:\n"
        "        crontab(minute='*/5')\n"
        "    condition:\n"
        "        stats.tasks_failed(interval=datetime.timedelta(minutes=5))"
        " > 3\n"
        "    apply:\n"
        "        print('throttling')\n"
        "        tasks['proj.add'].rate_limit = '10/m'\n",
        "throttle.policy")
    handler = Recorder({"stats": 5})
    with Host() as host:
        schedule = host.run(compiled.wire(), handler=handler, mode="schedule")
        outcome = host.run(compiled.wire(), handler=handler)
    assert schedule.schedule["type"] == "crontab"
    assert schedule.schedule["minute"] == "*/5"
    assert outcome.ok, outcome.error
    assert outcome.output == ["throttling\n"]
    assert [op for op, _args in handler.calls] == ["stats", "tasks.set"]


def test_a_template_that_cannot_serve_says_why_and_exits(tmp_path):
    # A second thread makes the fork server refuse to start: fork() there
    # skips Python's after-fork work, which only one thread makes safe.
    script = tmp_path / "two_threads.py"
    script.write_text(
        "import socket, threading, time\n"
        "from sandboxhost import zygote\n"
        "ours, theirs = socket.socketpair(socket.AF_UNIX,"
        " socket.SOCK_SEQPACKET)\n"
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "zygote.serve(theirs)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert ("sandboxhost: the template process failed: RuntimeError: the"
            " template process has more than one thread") in done.stderr


def test_the_template_answers_a_fork_request_without_a_channel():
    # A request the host got wrong ends its run at once, not at its
    # deadline.
    from sandboxhost import zygote
    from sandboxhost.host import _Job
    with Host() as host:
        host.start()
        zyg = host._zygote
        job = _Job(10_000)
        with zyg._lock:
            zyg._jobs[job.id] = job
        zyg.control.send(zygote.REQUEST.pack(
            zygote.REQ_FORK, 0, job.id, 64 << 20, 1, 8, -1, -1))
        assert job.exited.wait(5)
        assert job.fork_error == f"fork: {os.strerror(errno.EBADF)}"
        assert host.run(wire(), handler=no_calls).ok


def test_a_template_whose_control_socket_broke_is_replaced():
    # Sends fail while the process may still look alive: the next run
    # must get a new template, not a second try at the broken one.
    with Host() as host:
        assert host.run(wire(), handler=no_calls).ok
        old = host.zygote_pid
        host._zygote.control.shutdown(socket.SHUT_WR)
        assert host.run(wire(), handler=no_calls).ok
        assert host.zygote_pid != old
