"""Escape attempts against the process layer alone.

The language checks are off here: each attempt is ordinary Python, compiled
by the test and run with full builtins (a host made with
``unsafe_test_builtins=True``). What must hold it is the child process:
rlimits, the user switch, no-new-privs, closed fds, Landlock, seccomp, and
the host's own checks of what comes through the channel. After each
attempt the same host must still serve a normal run.
"""

import errno
import marshal
import os
import signal
import socket
import subprocess
import sys

import pytest

from sandboxhost.errors import (
    ChildDied,
    ChildTimedOut,
    LimitExceeded,
    PolicyError,
    ProtocolViolation,
)
from sandboxhost.host import Host
from sandboxhost.limits import RunLimits

FILENAME = "escape.policy"
LIMITS = RunLimits(wall_timeout_s=10.0, cpu_time_s=2,
                   memory_bytes=128 * 1024 * 1024, max_calls=50,
                   output_bytes=4096, frame_bytes=64 * 1024)

# Writes raw frames on the channel, past the runtime's own counting.
RAW_FRAMES = """\
import os, struct, msgpack
def frame(obj):
    body = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body
"""


def wire(source: str) -> dict:
    return {"filename": FILENAME,
            "schedule": marshal.dumps(compile("None", FILENAME, "eval")),
            "conditions": [],
            "apply": marshal.dumps(compile(source, FILENAME, "exec"))}


def answer_none(op: str, args: dict) -> object:
    return None


@pytest.fixture(scope="module")
def host():
    with Host(unsafe_test_builtins=True) as h:
        h.start()
        yield h


@pytest.fixture(autouse=True)
def still_serves(request):
    """After every attempt, the same host runs a normal policy."""
    yield
    if "host" in request.fixturenames:
        h = request.getfixturevalue("host")
        outcome = h.run(wire("print(call('ping'))"), handler=lambda op, a: "pong",
                        limits=LIMITS)
        assert outcome.ok, outcome.error
        assert outcome.output == ["pong\n"]


def attempt(host: Host, source: str, limits: RunLimits = LIMITS,
            handler=answer_none):
    return host.run(wire(source), handler=handler, limits=limits,
                    policy="escape")


def require(host: Host, *any_of: str) -> None:
    """Skip unless at least one of these layers applies here."""
    missing = host.missing_layers()
    if all(layer in missing for layer in any_of):
        pytest.skip("needs one of " + ", ".join(any_of) + ": "
                    + "; ".join(missing[layer] for layer in any_of))


def assert_refused(outcome, *types: str) -> None:
    assert isinstance(outcome.error, PolicyError), outcome
    assert outcome.error.type_name in types, outcome.error


# -- files --------------------------------------------------------------------

def test_writing_a_file_is_refused(host, tmp_path):
    require(host, "landlock")
    target = "/tmp/sandboxhost-escape-write"
    outcome = attempt(host, f"open({target!r}, 'w').write('owned')")
    assert_refused(outcome, "PermissionError")
    assert not os.path.exists(target)


def test_creating_an_empty_file_in_tmp_is_refused(host):
    require(host, "landlock")
    target = "/tmp/sandboxhost-escape-create"
    outcome = attempt(host, f"import os\nos.close(os.open({target!r},"
                            " os.O_CREAT | os.O_WRONLY, 0o666))")
    assert_refused(outcome, "PermissionError")
    assert not os.path.exists(target)


def test_reading_a_file_outside_the_python_prefix_is_refused(host, tmp_path):
    require(host, "landlock", "run_as_user")
    secret = tmp_path / "secret.txt"
    secret.write_text("the broker password")
    outcome = attempt(host, f"print(open({str(secret)!r}).read())")
    assert_refused(outcome, "PermissionError")
    assert outcome.output == []


def test_reading_system_files_is_refused(host):
    require(host, "landlock")
    outcome = attempt(host, "print(open('/etc/passwd').read())")
    assert_refused(outcome, "PermissionError")


# -- network ------------------------------------------------------------------

@pytest.mark.parametrize("family", ["AF_INET", "AF_INET6", "AF_UNIX",
                                    "AF_NETLINK"])
def test_opening_a_socket_is_refused(host, family):
    require(host, "seccomp")
    outcome = attempt(host, f"import socket\nsocket.socket(socket.{family})")
    assert_refused(outcome, "PermissionError")


def test_connecting_to_a_local_listener_is_refused(host):
    require(host, "seccomp")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        outcome = attempt(host, "import socket\n"
                                "s = socket.socket(socket.AF_INET)\n"
                                f"s.connect(('127.0.0.1', {port}))")
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()
    assert_refused(outcome, "PermissionError")


def test_a_socketpair_is_refused(host):
    require(host, "seccomp")
    outcome = attempt(host, "import socket\nsocket.socketpair()")
    assert_refused(outcome, "PermissionError")


# -- processes ----------------------------------------------------------------

def test_os_fork_is_refused(host):
    require(host, "seccomp", "run_as_user")
    outcome = attempt(host, "import os\npid = os.fork()\nif pid == 0:\n"
                            "    os._exit(0)")
    assert_refused(outcome, "PermissionError", "BlockingIOError")


def test_os_system_runs_nothing(host):
    require(host, "seccomp", "run_as_user")
    target = "/tmp/sandboxhost-escape-system"
    outcome = attempt(host, f"import os\nprint(os.system('touch {target}'))")
    assert not os.path.exists(target)
    if outcome.ok:
        # system() reports that no shell ran rather than raising.
        assert outcome.output != ["0\n"]
    else:
        assert_refused(outcome, "PermissionError", "BlockingIOError")


def test_subprocess_is_refused(host):
    require(host, "seccomp", "run_as_user")
    outcome = attempt(host, "import subprocess\nsubprocess.run(['true'])")
    # The lean template never imported subprocess, and a child may not be
    # able to read the standard library to import it; either way no
    # process starts.
    assert_refused(outcome, "PermissionError", "BlockingIOError",
                   "ModuleNotFoundError")


def test_posix_spawn_is_refused(host):
    require(host, "seccomp", "run_as_user")
    target = "/tmp/sandboxhost-escape-spawn"
    outcome = attempt(host, "import os\n"
                            f"os.posix_spawn('/usr/bin/touch', ['touch', {target!r}],"
                            " {})")
    assert_refused(outcome, "PermissionError", "BlockingIOError")
    assert not os.path.exists(target)


def test_execv_is_refused(host):
    require(host, "seccomp", "landlock")
    outcome = attempt(host, "import os\nos.execv('/bin/true', ['true'])")
    assert_refused(outcome, "PermissionError")


def test_signalling_another_process_is_refused(host):
    require(host, "seccomp", "landlock", "run_as_user")
    sleeper = subprocess.Popen(["sleep", "100"])
    try:
        outcome = attempt(host, "import os, signal\n"
                                f"os.kill({sleeper.pid}, signal.SIGKILL)")
        assert_refused(outcome, "PermissionError")
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_signalling_the_template_process_is_refused(host):
    require(host, "seccomp", "landlock")
    zygote = host.zygote_pid
    outcome = attempt(host, "import os, signal\n"
                            "os.kill(os.getppid(), signal.SIGKILL)")
    assert_refused(outcome, "PermissionError")
    assert host.zygote_pid == zygote


def test_ptrace_of_the_template_process_is_refused(host):
    require(host, "seccomp")
    outcome = attempt(host, "import ctypes, os\n"
                            "libc = ctypes.CDLL(None, use_errno=True)\n"
                            "PTRACE_ATTACH = 16\n"
                            "res = libc.ptrace(PTRACE_ATTACH, os.getppid(), 0, 0)\n"
                            "print(res, ctypes.get_errno())")
    assert outcome.output == [f"-1 {errno.EPERM}\n"]


@pytest.mark.parametrize("syscall, args", [
    ("unshare", (0x10000000,)),          # CLONE_NEWUSER
    ("io_uring_setup", (8, 0)),
    ("bpf", (0, 0, 0)),
    ("userfaultfd", (0,)),
    ("keyctl", (0, 0)),
])
def test_dangerous_system_calls_fail_with_eperm(host, syscall, args):
    require(host, "seccomp")
    numbers = {"unshare": 272, "io_uring_setup": 425, "bpf": 321,
               "userfaultfd": 323, "keyctl": 250}
    if os.uname().machine != "x86_64":
        pytest.skip("system call numbers below are for x86_64")
    outcome = attempt(host, "import ctypes\n"
                            "libc = ctypes.CDLL(None, use_errno=True)\n"
                            f"res = libc.syscall({numbers[syscall]}, *{args!r})\n"
                            "print(res, ctypes.get_errno())")
    assert outcome.output == [f"-1 {errno.EPERM}\n"]


def run_syscall(host: Host, number: int, *args: int) -> list[str]:
    if os.uname().machine != "x86_64":
        pytest.skip("system call numbers here are for x86_64")
    outcome = attempt(host, "import ctypes\n"
                            "libc = ctypes.CDLL(None, use_errno=True)\n"
                            f"res = libc.syscall({number}, *{args!r})\n"
                            "print(res, ctypes.get_errno())")
    return outcome.output


@pytest.mark.parametrize("name, number, args", [
    ("io_setup", 206, (65536, 0)),   # would fill the machine's AIO pool
    ("sync", 162, ()),
    ("prctl PR_SET_PDEATHSIG", 157, (1, 0)),    # outlive the template
    ("prctl PR_SET_DUMPABLE", 157, (4, 1)),     # core dumps, /proc access
    ("prctl PR_SET_PTRACER", 157, (0x59616D61, -1)),
    ("ioctl SIOCGIFCONF", 16, (3, 0x8912, 0)),  # the machine's addresses
])
def test_system_calls_with_machine_wide_or_lasting_effects_fail(host, name,
                                                                number, args):
    require(host, "seccomp")
    assert run_syscall(host, number, *args) == [f"-1 {errno.EPERM}\n"]


@pytest.mark.parametrize("name, number", [
    ("fchmodat2", 452), ("statmount", 457), ("listmount", 458),
    ("mseal", 462), ("setxattrat", 463), ("file_setattr", 469),
    ("a number no kernel has yet", 900),
])
def test_system_calls_newer_than_the_filter_fail_with_enosys(host, name,
                                                             number):
    require(host, "seccomp")
    assert run_syscall(host, number, 0, 0, 0, 0) == [f"-1 {errno.ENOSYS}\n"]


LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
# A file every child can read (the interpreter's own may sit in a folder
# the child's user cannot enter).
READABLE = "import sandboxhost\nfd = os.open(sandboxhost.__file__, os.O_RDONLY)\n"
EPERM_LINE = f"-1 {errno.EPERM}\n"


@pytest.mark.parametrize("name, source", [
    # The kernel reads prctl's option as an int: high bits must not help.
    ("PR_SET_PDEATHSIG, high bits", "r = libc.syscall(157,"
     " ctypes.c_long((1 << 32) | 1), ctypes.c_long(0))"),
    ("PR_SET_DUMPABLE, high bits", "r = libc.syscall(157,"
     " ctypes.c_long((1 << 32) | 4), ctypes.c_long(1))"),
    # SIGIO to another process: a signal without kill().
    ("F_SETOWN", "rd, wr = os.pipe()\nr = libc.fcntl(rd, 8, 1)"),
    ("F_SETSIG", "rd, wr = os.pipe()\nr = libc.fcntl(rd, 10, 9)"),
    ("F_SETOWN, high bits", "rd, wr = os.pipe()\nr = libc.syscall(72,"
     " rd, ctypes.c_long((1 << 32) | 8), 1)"),
    ("flock", READABLE + "r = libc.flock(fd, 2)"),
    ("F_SETLK", READABLE + "lock = ctypes.create_string_buffer(32)\n"
     "r = libc.fcntl(fd, 6, lock)"),
    ("FS_IOC_SETFLAGS", READABLE + "flags = ctypes.c_long(0)\n"
     "r = libc.ioctl(fd, ctypes.c_ulong(0x40086602), ctypes.byref(flags))"),
    ("sendto MSG_OOB on the channel", "r = libc.send(3, b'x', 1, 1)"),
    ("recvmsg", "r = libc.recvmsg(3, None, 0)"),
    ("splice", "r = libc.splice(3, None, 3, None, 1, 0)"),
    ("getpgid of another process", "r = libc.getpgid(1)"),
])
def test_signals_locks_and_side_channels_are_refused(host, name, source):
    require(host, "seccomp")
    outcome = attempt(host, LIBC + source
                      + "\nprint(r, ctypes.get_errno())")
    assert outcome.output == [EPERM_LINE], outcome


def test_memory_that_was_writable_cannot_become_executable(host):
    outcome = attempt(host, LIBC + (
        "libc.mmap.restype = ctypes.c_void_p\n"
        "libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t,"
        " ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)\n"
        "page = libc.mmap(None, 4096, 3, 0x22, -1, 0)\n"
        "libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t,"
        " ctypes.c_int)\n"
        "print(libc.mprotect(page, 4096, 5), ctypes.get_errno())"))
    kernel = tuple(int(p) for p in os.uname().release.split(".")[:2]
                   if p.isdigit())
    if kernel < (6, 3):
        pytest.skip("memory-deny-write-execute needs Linux 6.3")
    assert outcome.output == [f"-1 {errno.EACCES}\n"], outcome


def test_reading_its_own_settings_still_works(host):
    require(host, "seccomp")
    # PR_GET_DUMPABLE and PR_GET_PDEATHSIG are not refused.
    outcome = attempt(host, "import ctypes\n"
                            "libc = ctypes.CDLL(None, use_errno=True)\n"
                            "sig = ctypes.c_int(-1)\n"
                            "print(libc.prctl(3, 0, 0, 0, 0),"
                            " libc.prctl(2, ctypes.byref(sig), 0, 0, 0),"
                            " sig.value)")
    assert outcome.output == [f"0 0 {signal.SIGKILL}\n"]


def test_memory_both_writable_and_executable_is_refused(host):
    require(host, "seccomp")
    outcome = attempt(host, "import mmap\n"
                            "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ"
                            " | mmap.PROT_WRITE | mmap.PROT_EXEC)")
    assert_refused(outcome, "PermissionError")
    outcome = attempt(host, "import mmap\n"
                            "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ"
                            " | mmap.PROT_WRITE)\nm.write(b'ok')\n"
                            "print(m[:2])")
    assert outcome.output == ["b'ok'\n"]


def test_file_modes_owners_and_times_cannot_change(host, tmp_path_factory):
    # A file the child's user owns: only the filter stands in the way.
    require(host, "seccomp")
    if "run_as_user" in host.missing_layers():
        pytest.skip("needs children that run as nobody")
    import pwd
    import tempfile
    nobody = pwd.getpwnam("nobody")
    folder = tempfile.mkdtemp(prefix="cm-escape-")
    try:
        os.chmod(folder, 0o755)
        target = os.path.join(folder, "owned-by-child")
        with open(target, "w") as handle:
            handle.write("x")
        os.chown(target, nobody.pw_uid, nobody.pw_gid)
        os.chmod(target, 0o600)
        before = os.stat(target)
        for source in (f"import os\nos.chmod({target!r}, 0o666)",
                       f"import os\nos.chown({target!r}, -1, 0)",
                       f"import os\nos.utime({target!r}, (0, 0))",
                       f"import os\nos.setxattr({target!r}, 'user.x', b'1')"):
            outcome = attempt(host, source)
            assert_refused(outcome, "PermissionError")
            assert outcome.error.message.startswith("[Errno 1]"), source
        after = os.stat(target)
        assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime) \
            == (before.st_mode, before.st_uid, before.st_gid, before.st_mtime)
    finally:
        import shutil
        shutil.rmtree(folder)


# -- identity and limits ------------------------------------------------------

def test_raising_its_own_hard_limits_is_refused(host):
    if "seccomp" in host.missing_layers() and os.geteuid() == 0 \
            and "run_as_user" in host.missing_layers():
        pytest.skip("a root child without seccomp may raise its limits")
    outcome = attempt(host, "import resource as r\n"
                            "r.setrlimit(r.RLIMIT_AS, (r.RLIM_INFINITY,"
                            " r.RLIM_INFINITY))")
    assert_refused(outcome, "ValueError", "PermissionError")


def test_raising_its_own_soft_cpu_limit_is_refused(host):
    require(host, "seccomp")
    outcome = attempt(host, "import resource as r\n"
                            "soft, hard = r.getrlimit(r.RLIMIT_CPU)\n"
                            "r.setrlimit(r.RLIMIT_CPU, (hard, hard))")
    assert_refused(outcome, "ValueError", "PermissionError")


def test_the_child_runs_unprivileged_with_no_new_privileges(host):
    require(host, "run_as_user")
    outcome = attempt(host, "import ctypes, os\n"
                            "libc = ctypes.CDLL(None)\n"
                            "PR_GET_NO_NEW_PRIVS = 39\n"
                            "print(os.getuid(), os.geteuid(), os.getgroups(),"
                            " libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0))")
    uid, euid, groups, nnp = outcome.output[0].split(" ", 3)
    assert uid == euid != "0"
    assert (groups, nnp) == ("[]", "1\n")


def test_only_the_channel_is_open(host):
    outcome = attempt(host, "import os\nopen_fds = []\nfor fd in range(1024):\n"
                            "    try:\n        os.fstat(fd)\n"
                            "    except OSError:\n        continue\n"
                            "    open_fds.append(fd)\nprint(open_fds)")
    assert outcome.output == ["[3]\n"]


def test_the_child_sees_no_secret_of_the_host(monkeypatch):
    pytest.importorskip("celery")
    monkeypatch.setenv("CM_BROKER_URL", "redis://:hunter2@127.0.0.1:6399/0")
    with Host(unsafe_test_builtins=True) as fresh:
        outcome = fresh.run(wire(
            "import os, sys\n"
            "print(sorted(k for k in os.environ if k.startswith('CM_')),"
            " sorted(m for m in ('celery', 'kombu', 'sqlalchemy')"
            " if m in sys.modules))"), handler=answer_none, limits=LIMITS)
    assert "celery" in sys.modules
    assert outcome.output == ["[] []\n"]


# -- memory, CPU, time --------------------------------------------------------

def test_one_huge_allocation_is_a_memory_error(host):
    outcome = attempt(host, "x = 1\nblob = bytearray(10**10)")
    assert_refused(outcome, "MemoryError")
    assert (outcome.error.line, outcome.error.message) == (
        2, "out of memory (memory_bytes)")


def test_a_growing_list_is_a_memory_error(host):
    outcome = attempt(host, "hoard = []\nwhile True:\n"
                            "    hoard.append(' ' * 100_000)")
    assert_refused(outcome, "MemoryError")
    assert outcome.error.section == "apply"


def test_a_cpu_spin_in_python_is_stopped_at_its_line(host):
    # SIGXCPU at the soft limit raises in the running policy code.
    outcome = attempt(host, "x = 1\nwhile True:\n    pass",
                      limits=LIMITS.replace(cpu_time_s=1))
    assert_refused(outcome, "LimitExceeded")
    assert (outcome.error.section, outcome.error.line) == ("apply", 2)
    assert outcome.error.message == "CPU time limit reached (cpu_time_s)"


def test_a_cpu_spin_in_c_is_killed_at_the_hard_limit(host):
    # One call into C never returns to Python to take the signal.
    outcome = attempt(host, "x = sum(range(10 ** 15))",
                      limits=LIMITS.replace(cpu_time_s=1))
    assert isinstance(outcome.error, ChildDied)
    assert outcome.error.signal == signal.SIGKILL
    assert outcome.error.message == ("killed by SIGKILL: CPU time limit of"
                                     " 1 s exceeded")


def test_a_cpu_spin_that_restores_sigxcpu_dies_of_it(host):
    outcome = attempt(host, "import signal\n"
                            "signal.signal(signal.SIGXCPU, signal.SIG_DFL)\n"
                            "while True:\n    pass",
                      limits=LIMITS.replace(cpu_time_s=1))
    assert isinstance(outcome.error, ChildDied)
    assert outcome.error.signal == signal.SIGXCPU
    assert outcome.error.message == ("killed by SIGXCPU: CPU time limit of"
                                     " 1 s exceeded")


def test_a_cpu_spin_that_ignores_sigxcpu_is_killed_at_the_hard_limit(host):
    outcome = attempt(host, "import signal\n"
                            "signal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
                            "while True:\n    pass",
                      limits=LIMITS.replace(cpu_time_s=1))
    assert isinstance(outcome.error, ChildDied)
    assert outcome.error.signal == signal.SIGKILL
    assert outcome.error.message == ("killed by SIGKILL: CPU time limit of"
                                     " 1 s exceeded")


def test_sleeping_past_the_wall_clock_limit_is_killed(host):
    outcome = attempt(host, "import time\ntime.sleep(100)",
                      limits=LIMITS.replace(wall_timeout_s=0.5))
    assert isinstance(outcome.error, ChildTimedOut)
    assert outcome.error.message == ("the run went past its wall-clock limit"
                                     " of 0.5 s and was killed")
    # A run that failed returns only once its child is reaped.
    assert outcome.exit_signal == signal.SIGKILL
    assert not os.path.exists(f"/proc/{outcome.pid}")


# -- floods -------------------------------------------------------------------

def test_an_output_flood_stops_at_the_output_limit(host):
    outcome = attempt(host, "[print('x' * 100) for _ in range(10**6)]")
    assert_refused(outcome, "LimitExceeded")
    assert "(output_bytes)" in outcome.error.message
    assert sum(len(text) for text in outcome.output) <= LIMITS.output_bytes


def test_a_raw_output_flood_is_stopped_by_the_host(host):
    outcome = attempt(host, RAW_FRAMES
                      + "for _ in range(1000):\n"
                        "    os.write(3, frame({'t': 'out', 'text': 'y' * 100}))")
    assert isinstance(outcome.error, LimitExceeded)
    assert outcome.error.limit == "output_bytes"


def test_a_call_flood_stops_at_the_call_limit(host):
    outcome = attempt(host, "[call('noop') for _ in range(10**6)]")
    assert_refused(outcome, "LimitExceeded")
    assert "(max_calls)" in outcome.error.message
    assert len(outcome.calls) == LIMITS.max_calls


def test_a_raw_call_flood_is_stopped_by_the_host(host):
    outcome = attempt(host, RAW_FRAMES
                      + "for _ in range(1000):\n"
                        "    os.write(3, frame({'t': 'call', 'op': 'noop',"
                        " 'args': {}}))\n"
                        "    os.read(3, 65536)")
    assert isinstance(outcome.error, LimitExceeded)
    assert outcome.error.limit == "max_calls"
    assert len(outcome.calls) == LIMITS.max_calls


def test_a_call_flood_that_reads_no_replies_ends_at_the_deadline(host):
    outcome = attempt(host, RAW_FRAMES
                      + "while True:\n"
                        "    os.write(3, frame({'t': 'call', 'op': 'noop',"
                        " 'args': {}}))",
                      limits=LIMITS.replace(wall_timeout_s=1.0,
                                            max_calls=10**6))
    assert isinstance(outcome.error, ChildTimedOut)


# -- the channel --------------------------------------------------------------

def test_an_oversized_frame_is_a_limit_error(host):
    outcome = attempt(host, "import os, struct\n"
                            "os.write(3, struct.pack('>I', 10**8) + b'x' * 4096)")
    assert isinstance(outcome.error, LimitExceeded)
    assert outcome.error.limit == "frame_bytes"


def test_garbage_on_the_channel_is_a_protocol_violation(host):
    outcome = attempt(host, "import os\n"
                            "os.write(3, b'\\x00\\x00\\x00\\x04\\xc1\\xc1\\xc1\\xc1')")
    assert isinstance(outcome.error, ProtocolViolation)
    assert outcome.error.message.startswith(
        "the child broke the protocol: frame is not valid msgpack")


def test_a_frame_off_schema_is_a_protocol_violation(host):
    outcome = attempt(host, RAW_FRAMES
                      + "os.write(3, frame({'t': 'reply', 'ok': True,"
                        " 'value': 1}))")
    assert isinstance(outcome.error, ProtocolViolation)
    assert outcome.error.message == ("the child broke the protocol: unknown"
                                     " frame type 'reply'")


def test_a_done_frame_that_contradicts_itself_is_a_protocol_violation(host):
    outcome = attempt(host, RAW_FRAMES
                      + "os.write(3, frame({'t': 'done', 'schedule': None,"
                        " 'condition': False, 'applied': True}))\n"
                        "import time\ntime.sleep(5)")
    assert isinstance(outcome.error, ProtocolViolation)


def test_closing_the_channel_early_is_a_child_death(host):
    outcome = attempt(host, "import os\nos.close(3)")
    assert isinstance(outcome.error, ChildDied)
    assert outcome.error.exit_code is not None


def test_os_exit_is_a_child_death_with_its_code(host):
    outcome = attempt(host, "import os\nos._exit(3)")
    assert isinstance(outcome.error, ChildDied)
    assert outcome.error.exit_code == 3
    assert outcome.error.message == "exited with code 3 before reporting a result"


def test_a_segfault_is_a_child_death_with_its_signal(host):
    outcome = attempt(host, "import ctypes\nctypes.string_at(0)")
    assert isinstance(outcome.error, ChildDied)
    assert outcome.error.signal == signal.SIGSEGV
    assert outcome.error.message == "killed by SIGSEGV before reporting a result"


def test_a_child_that_reports_then_lingers_is_killed(host):
    outcome = attempt(host, RAW_FRAMES
                      + "os.write(3, frame({'t': 'done', 'schedule': None,"
                        " 'condition': True, 'applied': True}))\n"
                        "import time\ntime.sleep(100)")
    assert outcome.ok
    # run() returns without waiting for a child that reported, but the
    # template kills and reaps it at once.
    assert wait_until_gone(outcome.pid)


def wait_until_gone(pid: int, wait_s: float = 10.0) -> bool:
    """True once ``pid`` no longer exists (a bound, not a timing check)."""
    import time

    give_up = time.monotonic() + wait_s
    while time.monotonic() < give_up:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.01)
    return False


def test_a_child_that_cannot_apply_its_limits_never_runs_policy_code(host):
    # RLIMIT_NOFILE above the kernel's ceiling (past RunLimits' own check):
    # setrlimit fails in the child, which must end before any policy code
    # runs.
    limits = LIMITS.replace()
    object.__setattr__(limits, "open_files", 1 << 40)
    outcome = attempt(host, "print('ran')", limits=limits)
    assert isinstance(outcome.error, ChildDied), outcome
    assert "could not apply its limits" in outcome.error.message
    assert outcome.output == []


# -- isolation between runs ---------------------------------------------------

# Native code reaches any mapping without Python objects; here the frames of
# the runtime hand it over. Whatever a run writes into memory the template
# mapped must be gone for the next run.
WRITE_THE_RESERVE = """\
import sys
frame = sys._getframe()
while "self" not in frame.f_locals:
    frame = frame.f_back
reserve = frame.f_locals["self"]._reserve
reserve.seek(0)
print(reserve.read(16))
reserve.seek(0)
reserve.write(b"left-by-a-run")
"""


def test_memory_a_run_writes_is_not_seen_by_the_next(host):
    for _ in range(3):
        outcome = attempt(host, WRITE_THE_RESERVE)
        assert outcome.ok, outcome.error
        assert outcome.output == [repr(bytes(16)) + "\n"]


def test_the_template_maps_nothing_shared_and_writable(host):
    with open(f"/proc/{host.zygote_pid}/maps") as maps:
        shared_writable = [line for line in maps
                           if line.split()[1].startswith("rw")
                           and line.split()[1][3] == "s"]
    assert shared_writable == []


# -- errors keep their section and line -----------------------------------------

def test_an_error_message_with_a_lone_surrogate_is_reported(host):
    outcome = attempt(host, "x = 1\nraise ValueError('bad ' + chr(0xD800))")
    assert_refused(outcome, "ValueError")
    assert (outcome.error.line, outcome.error.message) == (2, "bad \\ud800")


def test_call_arguments_too_large_for_a_frame_fail_at_their_line(host):
    outcome = attempt(host, "x = 1\ncall('ping', blob='m' * 300_000)")
    assert_refused(outcome, "LimitExceeded")
    assert outcome.error.line == 2
    assert outcome.error.message.startswith(
        "the call's arguments are too large to send: 300")
    assert outcome.error.message.endswith(
        f"more than {LIMITS.frame_bytes} (frame_bytes)")
    assert outcome.calls == []


def test_what_one_run_may_send_in_all_is_bounded(host):
    # Each frame is within frame_bytes; together they would make the
    # manager hold far more than a run needs.
    outcome = attempt(host, "for i in range(40):\n"
                            "    call('ping', blob='m' * 50_000)",
                      limits=LIMITS.replace(channel_bytes=1024 * 1024))
    assert isinstance(outcome.error, LimitExceeded), outcome
    assert outcome.error.limit == "channel_bytes"
    assert 15 <= len(outcome.calls) <= 21
