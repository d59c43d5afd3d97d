"""The template process: forks hardened children on the host's request.

The host starts this process once, through ``multiprocess``'s spawn
machinery, as a clean interpreter: a scrubbed environment, no host argv, no
re-run of the host's ``__main__``, so it never imports Celery nor sees the
broker or database URLs; it then re-executes itself as a lean ``python -I
-S`` (see spawn_entry). Everything a child needs is prepared here before
the first fork (imports, the runtime and its namespaces, the seccomp
filter, the Landlock ruleset), then the heap is frozen.

The fork server loop itself is C (``sandboxhost._forkserver``, which also
documents the control messages): after every fork each page the zygote
writes costs it a copy-on-write fault, and a Python loop writes many. Its
first message, the capabilities, is a msgpack map sent from here:

    zygote -> host  {"t": "caps", ...}                once, at start
    host -> zygote  REQUEST: fork (+ the child's channel fd), or kill
    zygote -> host  REPORT: forked, fork failed, or exit

A child returns from the loop into Python already hardened, with its
channel on CHILD_FD, and only serves its run (runtime.run_and_exit).
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import socket
import struct
import sys

import msgpack

from sandboxhost import runtime
from sandboxhost.protocol import Channel

try:
    from sandboxhost import _forkserver
except ImportError as exc:   # pragma: no cover - a broken install
    raise ImportError(
        "sandboxhost._forkserver is not built: install the package with a C"
        " compiler and Python's headers (pip install -e .)") from exc

# No logger in the modules the template loads (this one, runtime, protocol,
# namespace, names, errors): nothing there has a log handler (what the host
# must know goes back as control messages), and the logging module with
# what it imports is ~1.7 MB of heap that every fork maps and every child's
# exit tears down. FORBIDDEN_MODULES holds that line.

# Where the child's channel lives; the runtime reads it from here.
CHILD_FD = _forkserver.CHILD_FD
# A child that could not apply its limits exits with this and never runs
# policy code; the reason goes to the zygote's stderr.
EXIT_SETUP_FAILED = _forkserver.EXIT_SETUP_FAILED

# The control records, as _forkserver.c lays them out.
REQUEST = struct.Struct("=IIqqqqii")   # type, flags, id, memory_bytes,
#                                             cpu_time_s, open_files, uid, gid
REPORT = struct.Struct("=Iiqiiq")           # type, pid, id, code, signal,
#                                             cpu_us or errno
assert REQUEST.size == _forkserver.REQUEST_BYTES
assert REPORT.size == _forkserver.REPORT_BYTES
REQ_FORK = _forkserver.REQ_FORK
REQ_KILL = _forkserver.REQ_KILL
REP_FORKED = _forkserver.REP_FORKED
REP_FORK_FAILED = _forkserver.REP_FORK_FAILED
REP_EXIT = _forkserver.REP_EXIT
FLAG_SECCOMP = _forkserver.FLAG_SECCOMP
FLAG_LANDLOCK = _forkserver.FLAG_LANDLOCK

# Environment passed to the zygote: nothing secret, only what an
# interpreter needs to start and read text.
ZYGOTE_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH")
# Third-party modules the lean template imports.
LEAN_THIRD_PARTY = ("msgpack",)
# Modules whose presence in the zygote breaks the trust boundary, or
# shows that it is not the lean interpreter it should be.
FORBIDDEN_MODULES = ("celery", "kombu", "sqlalchemy", "redis", "manager",
                     "multiprocess", "dill", "pyseccomp", "logging",
                     "threading")
_BPF_INSN_BYTES = 8
# The Landlock ABI that scopes signals and abstract unix sockets.
LANDLOCK_ABI_SCOPES = 6

# Denied with EPERM in every child: whatever reaches the network, other
# processes, the kernel's configuration, new privileges or a new program.
SECCOMP_DENY = (
    # network and local sockets (the channel is already connected)
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    # new programs and processes
    "execve", "execveat", "fork", "vfork", "clone", "clone3",
    # other processes' memory and state
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "process_madvise",
    "process_mrelease", "setpriority", "sched_setscheduler",
    "sched_setparam", "sched_setattr", "sched_setaffinity", "ioprio_set",
    "migrate_pages", "move_pages",
    # own limits and identity
    "setrlimit", "setuid", "setgid", "setreuid", "setregid", "setresuid",
    "setresgid", "setfsuid", "setfsgid", "setgroups", "capset",
    # namespaces, mounts, roots
    "unshare", "setns", "mount", "umount2", "chroot", "pivot_root",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "open_by_handle_at", "name_to_handle_at",
    # kernel interfaces with a history of exploits or global effects
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "personality", "init_module", "finit_module", "delete_module",
    "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "acct", "quotactl", "syslog", "sethostname", "setdomainname",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "iopl", "ioperm", "modify_ldt", "uselib", "vhangup", "lookup_dcookie",
    "fanotify_init", "mknod", "mknodat",
    # File-change notifications name files Landlock does not let it read
    "inotify_init", "inotify_init1", "inotify_add_watch",
    # System V and POSIX IPC reach other processes of the same user
    "shmget", "shmat", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl",
    "semget", "semop", "semtimedop", "semctl", "mq_open", "mq_unlink",
    "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",
    # Signals, even to itself: a filter that allows the child's own pid
    # must be built per child (+0.8 ms per run, measured), and a child
    # needs no signal; abort() still ends the process without one.
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    # File metadata: Landlock leaves modes, owners, times and extended
    # attributes alone, and a child that keeps the manager's user could
    # chmod the manager's own files.
    "chmod", "fchmod", "fchmodat", "chown", "fchown", "lchown", "fchownat",
    "utime", "utimes", "utimensat", "futimesat", "setxattr", "lsetxattr",
    "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    # Resources of the whole machine: the system-wide AIO pool, disk flushes
    "io_setup", "io_submit", "sync", "syncfs",
    # Locks on files other runs can read: a channel between concurrent runs
    "flock",
    # The channel is read and written with read() and write(); the socket
    # calls would add out-of-band data and descriptor passing, and the
    # pipe-splicing calls kernel paths Python never needs.
    "sendto", "sendmsg", "sendmmsg", "recvfrom", "recvmsg", "recvmmsg",
    "splice", "tee", "vmsplice",
)
# libseccomp's scmp_filter_attr SCMP_FLTATR_CTL_OPTIMIZE, value 2.
SCMP_FLTATR_CTL_OPTIMIZE, SCMP_OPTIMIZE_TREE = 8, 2
# Denied only for some arguments (see SeccompProgram.build).
# The kernel reads these arguments as 32-bit ints: compare the low 32 bits
# only, or a value with high bits set would pass.
LOW_32_BITS = 0xFFFF_FFFF
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_PTRACER = 1, 4, 0x59616D61
# fcntl commands that send signals (SIGIO/SIGURG to any process or group,
# lease breaks, directory notices) or take file locks.
FCNTL_DENIED = {
    "F_SETOWN": 8, "F_SETSIG": 10, "F_SETOWN_EX": 15, "F_SETLEASE": 1024,
    "F_NOTIFY": 1026, "F_SETLK": 6, "F_SETLKW": 7, "F_OFD_SETLK": 37,
    "F_OFD_SETLKW": 38,
}
# Socket ioctls (SIOC*, FIOSETOWN): the machine's interfaces and addresses,
# and signal targets.
SIOC_IOCTL_MASK, SIOC_IOCTL_TYPE = 0xFF00, 0x8900
# ioctls that change a file the child's user owns (attribute flags,
# fs-verity, which cannot be undone) without opening it for writing.
IOCTL_DENIED = {
    "FS_IOC_SETFLAGS": 0x40086602, "FS_IOC32_SETFLAGS": 0x40046602,
    "FS_IOC_FSSETXATTR": 0x401C5820, "FS_IOC_SETVERSION": 0x40087602,
    "FS_IOC32_SETVERSION": 0x40047602, "FS_IOC_ENABLE_VERITY": 0x40806685,
    "FIOSETOWN": 0x8901, "SIOCSPGRP": 0x8902, "TIOCSPGRP": 0x5410,
}
PROT_WRITE_EXEC = 0x2 | 0x4
# System calls newer than every one above (Linux 6.6 on) fail with ENOSYS,
# as on an older kernel: a second, fixed filter in _forkserver.c.


def _readable_dirs() -> list[str]:
    """The interpreter's files, this package and the third-party modules
    it imports (a virtualenv's site-packages is outside sys.prefix in the
    lean -S interpreter), nothing else."""
    here = os.path.dirname(os.path.abspath(__file__))
    dirs: list[str] = []
    roots = [sys.prefix, sys.base_prefix, here]
    for name in LEAN_THIRD_PARTY:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            roots.append(os.path.dirname(os.path.dirname(module.__file__)))
    for path in roots:
        real = os.path.realpath(path)
        if real not in dirs:
            dirs.append(real)
    return dirs


class _Kernel:
    """The hardening tools, prepared once in the zygote."""

    def __init__(self, seccomp: "SeccompProgram") -> None:
        self.missing: dict[str, str] = {}
        self.landlock_abi = 0
        self.ruleset_fd = -1
        try:
            self.ruleset_fd, self.landlock_abi = _forkserver.landlock_ruleset(
                _readable_dirs())
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            self.missing["landlock"] = f"{exc.strerror} ({name})"
        else:
            if self.landlock_abi < LANDLOCK_ABI_SCOPES:
                self.missing["landlock_scopes"] = (
                    f"Landlock ABI {self.landlock_abi} (Linux 6.12 brings 6):"
                    " signals and abstract sockets are not confined to the"
                    " child; only the seccomp filter refuses them")
        self.seccomp_unknown = list(seccomp.unknown)
        self.seccomp_program = seccomp.program
        if seccomp.program is None:
            self.missing["seccomp"] = seccomp.error or "no filter was built"
        self.root = os.geteuid() == 0
        if not self.root:
            self.missing["run_as_user"] = (
                "the manager is not root: children keep its user id")

    def caps(self, allow_test_builtins: bool) -> dict:
        return {
            "t": "caps", "pid": os.getpid(), "root": self.root,
            "landlock_abi": self.landlock_abi,
            "missing": dict(self.missing),
            "seccomp_unknown": self.seccomp_unknown,
            "forbidden_modules": sorted(m for m in FORBIDDEN_MODULES
                                        if m in sys.modules),
            "test_builtins": allow_test_builtins,
            "threads": len(os.listdir("/proc/self/task")),
        }


class SeccompProgram:
    """The children's seccomp filter as classic BPF, or why there is none."""

    def __init__(self, program: bytes | None, unknown: list[str],
                 error: str | None = None):
        self.program = program
        self.unknown = unknown
        self.error = error

    @classmethod
    def build(cls) -> "SeccompProgram":
        """Compile SECCOMP_DENY with libseccomp.

        Runs before the lean template starts (see spawn_entry): pyseccomp
        and what it imports (ctypes.util, subprocess) would add 1.4 MB to
        the template, copied into the page tables of every child.
        """
        try:
            import pyseccomp
        except (ImportError, RuntimeError, OSError) as exc:
            return cls(None, [], f"pyseccomp is not usable: {exc}")
        try:
            flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
            try:
                # A binary tree over system call numbers, not a list that
                # every call of the child walks.
                flt.set_attr(SCMP_FLTATR_CTL_OPTIMIZE, SCMP_OPTIMIZE_TREE)
            except OSError:
                pass   # libseccomp before 2.5: the list works the same
            unknown = []
            deny = pyseccomp.ERRNO(errno.EPERM)
            for name in SECCOMP_DENY:
                try:
                    flt.add_rule(deny, name)
                except (OSError, ValueError):
                    unknown.append(name)
            # Reading limits stays possible; only setting them is refused.
            flt.add_rule(deny, "prlimit64", pyseccomp.Arg(2, pyseccomp.NE, 0))
            # The death signal and non-dumpability hold for the child's
            # whole life; it names no process that may trace it.
            for option in (PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_PTRACER):
                flt.add_rule(deny, "prctl", pyseccomp.Arg(
                    0, pyseccomp.MASKED_EQ, LOW_32_BITS, option))
            for command in FCNTL_DENIED.values():
                flt.add_rule(deny, "fcntl", pyseccomp.Arg(
                    1, pyseccomp.MASKED_EQ, LOW_32_BITS, command))
            flt.add_rule(deny, "ioctl", pyseccomp.Arg(
                1, pyseccomp.MASKED_EQ, SIOC_IOCTL_MASK, SIOC_IOCTL_TYPE))
            for request in IOCTL_DENIED.values():
                flt.add_rule(deny, "ioctl", pyseccomp.Arg(
                    1, pyseccomp.MASKED_EQ, LOW_32_BITS, request))
            # Other processes' groups, sessions and priorities: a child
            # asks only about itself (0).
            for name, arg in (("getpgid", 0), ("getsid", 0),
                              ("getpriority", 1)):
                flt.add_rule(deny, name, pyseccomp.Arg(arg, pyseccomp.NE, 0))
            # No memory both writable and executable (Python needs none):
            # an escape from the interpreter gets no easy native code.
            for name in ("mmap", "mprotect", "pkey_mprotect"):
                flt.add_rule(deny, name, pyseccomp.Arg(
                    2, pyseccomp.MASKED_EQ, PROT_WRITE_EXEC, PROT_WRITE_EXEC))
            return cls(_export_bpf(flt), unknown)
        except OSError as exc:
            return cls(None, [], f"cannot build the filter: {exc}")


def _export_bpf(flt) -> bytes:
    fd = os.memfd_create("sandboxhost-seccomp", os.MFD_CLOEXEC)
    try:
        with open(fd, "w+b", closefd=False) as file:
            flt.export_bpf(file)
            file.seek(0)
            program = file.read()
    finally:
        os.close(fd)
    if not program or len(program) % _BPF_INSN_BYTES:
        raise OSError(errno.EINVAL, "libseccomp exported no usable program")
    return program


class Zygote:
    """The template process's state; its loop is _forkserver.serve."""

    def __init__(self, control: socket.socket, allow_test_builtins: bool,
                 seccomp: SeccompProgram):
        self.control = control
        self.allow_test_builtins = allow_test_builtins
        self.kernel = _Kernel(seccomp)
        if allow_test_builtins:
            # Tests of the process layer alone play an attacker who can
            # make any system call: give their children the tools (Landlock
            # lets a child map no extension module of its own).
            import ctypes  # noqa: F401
            import resource  # noqa: F401
        runtime.catch_cpu_limit()
        runtime.rehearse()
        # Built once here; each child uses its own copy-on-write copy.
        self.runtime = runtime.Runtime(Channel(CHILD_FD),
                                       allow_test_builtins=allow_test_builtins)

    def serve_forever(self) -> None:
        """Serve fork requests until the host closes the control socket;
        in a forked child, serve its run and exit instead."""
        # fork() in the loop skips Python's after-fork work (thread and lock
        # re-initialisation, at-fork hooks: ~200 copy-on-write faults per
        # child), which is safe only with a single thread.
        if not _single_threaded():
            raise RuntimeError("the template process has more than one"
                               " thread and cannot fork safely")
        self.control.send(msgpack.packb(
            self.kernel.caps(self.allow_test_builtins)))
        gc.collect()
        gc.freeze()
        # Never collect in a child: a cycle left by the zygote could close
        # a descriptor the child has renumbered (measured note D).
        gc.disable()
        in_child = _forkserver.serve(self.control.fileno(),
                                     self.kernel.ruleset_fd,
                                     self.kernel.seccomp_program)
        if in_child:
            runtime.run_and_exit(self.runtime)   # never returns


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _close_inherited_fds(keep: int) -> None:
    """Close every fd the spawn left open except stdio and ``keep``."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def serve(control: socket.socket, allow_test_builtins: bool = False,
          seccomp: SeccompProgram | None = None) -> None:
    """Run the fork server on ``control`` until the host closes it."""
    # The host manages this process's life: Ctrl-C in a terminal must not
    # end it before the host does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _close_inherited_fds(control.fileno())
    if seccomp is None:
        seccomp = SeccompProgram.build()
    code = 0
    try:
        # The loop kills and reaps every child before it returns.
        Zygote(control, allow_test_builtins, seccomp).serve_forever()
    except BaseException as exc:  # noqa: BLE001 - say why, then end
        code = 1
        # The host sees the control socket close; the reason is here, on
        # the stderr the template shares with the manager.
        sys.stderr.write(f"sandboxhost: the template process failed:"
                         f" {type(exc).__name__}: {exc}\n")
    finally:
        # No atexit handlers or interpreter teardown: nothing of that kind
        # belongs to this process.
        os._exit(code)


def clean_env() -> dict[str, str]:
    """The environment the template process gets: nothing secret."""
    return {key: os.environ[key] for key in ZYGOTE_ENV_KEYS
            if key in os.environ}


# Run by the lean interpreter: the import path comes on the command line
# because -I -S leaves out site-packages and the editable install's hook.
_LEAN_BOOT = ("import sys; sys.path[:0] = sys.argv[5:]; "
              "from sandboxhost.zygote import main; main()")


def spawn_entry(control: socket.socket, allow_test_builtins: bool) -> None:
    """The multiprocess Process target: become a lean interpreter.

    multiprocess's spawn bootstrap leaves multiprocess and dill in this
    interpreter; every one of their pages would be copied into the page
    tables of every child. Exec'ing (same pid, so the host's Process object
    still tracks it) into ``python -I -S`` that imports only the runtime
    makes each fork and each child's exit cheaper (measured: 0.9 -> 0.7 ms
    per fork and exit). The seccomp program is compiled here and handed
    over in a memfd, for the same reason.
    """
    fd = control.fileno()
    os.set_inheritable(fd, True)
    seccomp = SeccompProgram.build()
    if seccomp.program is None:
        program_fd, note = -1, seccomp.error or ""
    else:
        program_fd = os.memfd_create("sandboxhost-seccomp", 0)
        os.write(program_fd, seccomp.program)
        os.set_inheritable(program_fd, True)
        note = ",".join(seccomp.unknown)
    flags = ["-I", "-S"] + (["-B"] if sys.dont_write_bytecode else [])
    argv = [sys.executable, *flags, "-c", _LEAN_BOOT, str(fd),
            "1" if allow_test_builtins else "0", str(program_fd), note,
            *_lean_path()]
    os.execve(sys.executable, argv, clean_env())


def _lean_path() -> list[str]:
    """This package and the third-party modules it needs; the standard
    library is on the lean interpreter's own path. Not the host's path:
    that may hold a script directory such as /tmp, searched before the
    standard library."""
    import importlib.util

    paths = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    for name in LEAN_THIRD_PARTY:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        where = os.path.dirname(spec.origin)
        if spec.submodule_search_locations is not None:
            where = os.path.dirname(where)
        if where not in paths:
            paths.append(where)
    return paths


def main() -> None:
    """Entry point of the lean template interpreter (see spawn_entry)."""
    fd, allow = int(sys.argv[1]), sys.argv[2] == "1"
    program_fd, note = int(sys.argv[3]), sys.argv[4]
    del sys.argv[1:]
    if program_fd < 0:
        seccomp = SeccompProgram(None, [], note)
    else:
        size = os.fstat(program_fd).st_size
        seccomp = SeccompProgram(os.pread(program_fd, size, 0),
                                 [n for n in note.split(",") if n])
        os.close(program_fd)
    serve(socket.socket(fileno=fd), allow, seccomp)
