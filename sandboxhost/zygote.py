"""The template process: forks hardened children on the host's request.

The host starts this process once, through ``multiprocess``'s spawn
machinery, as a clean interpreter: a scrubbed environment, no host argv, no
re-run of the host's ``__main__``, so it never imports Celery nor sees the
broker or database URLs; it then re-executes itself as a lean ``python -I
-S`` (see spawn_entry). Everything a child needs is prepared here before
the first fork (imports, ctypes functions, the seccomp filter, the Landlock
ruleset, user ids), then the heap is frozen, so that a child only pays for
its few syscalls and copy-on-write faults.

Control messages on the SOCK_SEQPACKET control socket are msgpack maps:

    host -> zygote  {"t": "fork", "id": int, "limits": {...}}  + 1 fd
                    {"t": "kill", "id": int}
    zygote -> host  {"t": "caps", ...}                once, at start
                    {"t": "forked", "id": int, "pid": int}
                    {"t": "fork_failed", "id": int, "message": str}
                    {"t": "exit", "id": int | None, "pid": int,
                     "code": int | None, "signal": int | None,
                     "cpu_s": float}

The zygote is the children's parent and reaper, so only it can signal a
child's process group without risking a recycled pid: it kills a group on
request and, before reaping a leader, kills what is left of its group.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import pwd
import resource
import select
import signal
import socket
import sys

import _signal

import msgpack

from sandboxhost import runtime
from sandboxhost.protocol import Channel

try:
    from sandboxhost import _forkhelper
except ImportError:   # not built: children are hardened in Python instead
    _forkhelper = None

# The zygote has no log handler of its own: what the host must know goes
# back as control messages (caps, fork_failed, exit).
logger = logging.getLogger(__name__)

# Where the child's channel lives; the runtime reads it from here.
CHILD_FD = 3
# A child that could not apply its limits exits with this and never runs
# policy code; the reason goes to the zygote's stderr.
EXIT_SETUP_FAILED = 121
CONTROL_MESSAGE_MAX_BYTES = 64 * 1024
# Free unreachable cycles of the zygote loop now and then; collection is
# otherwise off so that it can never run inside a child (measured note D).
GC_EVERY_FORKS = 512
# Environment passed to the zygote: nothing secret, only what an
# interpreter needs to start and read text.
ZYGOTE_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH")
# Third-party modules the lean template imports.
LEAN_THIRD_PARTY = ("msgpack",)
# Modules whose presence in the zygote breaks the trust boundary, or
# shows that it is not the lean interpreter it should be.
FORBIDDEN_MODULES = ("celery", "kombu", "sqlalchemy", "redis", "manager",
                     "multiprocess", "dill", "pyseccomp")

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
_BPF_INSN_BYTES = 8
# Plain ints: the signal module's enums are slow to touch in a child.
_SIGCHLD = int(signal.SIGCHLD)
_SIGKILL = int(signal.SIGKILL)
_SIG_DFL = int(signal.SIG_DFL)

# Landlock (linux/landlock.h); syscall numbers are the same on every arch.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LL_FS_READ_FILE = 1 << 2
LL_FS_READ_DIR = 1 << 3
LL_NET_BIND_TCP = 1 << 0
LL_NET_CONNECT_TCP = 1 << 1
LL_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
LL_SCOPE_SIGNAL = 1 << 1

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
)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64),
                ("parent_fd", ctypes.c_int32)]


def _landlock_fs_rights(abi: int) -> int:
    """Every filesystem right the given Landlock ABI knows."""
    if abi >= 5:
        return (1 << 16) - 1
    if abi >= 3:
        return (1 << 15) - 1
    if abi >= 2:
        return (1 << 14) - 1
    return (1 << 13) - 1


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
    """The hardening tools, resolved once in the zygote."""

    def __init__(self, seccomp: "SeccompProgram") -> None:
        self.missing: dict[str, str] = {}
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.prctl = self.libc.prctl
        self.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                               ctypes.c_ulong, ctypes.c_ulong)
        self.prctl.restype = ctypes.c_int
        self.syscall = self.libc.syscall
        self.syscall.restype = ctypes.c_long
        # libc's fork() called with the GIL held: the child skips Python's
        # after-fork work (thread and lock re-initialisation, at-fork hooks
        # such as random's reseed), which costs ~200 copy-on-write faults,
        # about half a millisecond per run. Safe only because the zygote
        # has exactly one thread (Zygote.raw_fork checks that).
        self.fork = ctypes.PyDLL(None, use_errno=True).fork
        self.fork.argtypes = ()
        self.fork.restype = ctypes.c_int
        self.landlock_abi = 0
        self.ruleset_fd: int | None = None
        # The address of the prebuilt sock_fprog, or None.
        self.seccomp: int | None = None
        self.seccomp_program: bytes | None = None
        self._build_landlock()
        self._load_seccomp_program(seccomp)
        self.root = os.geteuid() == 0
        if not self.root:
            self.missing["run_as_user"] = (
                "the manager is not root: children keep its user id")

    def _build_landlock(self) -> None:
        abi = self.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None,
                           ctypes.c_size_t(0),
                           ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
        if abi < 1:
            err = ctypes.get_errno()
            self.missing["landlock"] = (
                f"no Landlock in this kernel ({errno.errorcode.get(err, err)})")
            return
        attr = _RulesetAttr(_landlock_fs_rights(abi), 0, 0)
        size = ctypes.sizeof(ctypes.c_uint64)
        if abi >= 4:
            # TCP bind and connect too, with no rule allowing any port.
            attr.handled_access_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP
            size += ctypes.sizeof(ctypes.c_uint64)
        if abi >= 6:
            # Signals and abstract unix sockets stay inside the child's
            # own domain: no signal to a sibling, the zygote or the host.
            attr.scoped = LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL
            size += ctypes.sizeof(ctypes.c_uint64)
        fd = self.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
                          ctypes.byref(attr), ctypes.c_size_t(size),
                          ctypes.c_uint32(0))
        if fd < 0:
            err = ctypes.get_errno()
            self.missing["landlock"] = (
                f"cannot create a Landlock ruleset ({os.strerror(err)})")
            return
        try:
            for path in _readable_dirs():
                self._allow_read(fd, path)
        except OSError as exc:
            os.close(fd)
            self.missing["landlock"] = f"cannot build the ruleset: {exc}"
            return
        self.landlock_abi = abi
        self.ruleset_fd = fd

    def _allow_read(self, ruleset_fd: int, path: str) -> None:
        dir_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            rule = _PathBeneathAttr(LL_FS_READ_FILE | LL_FS_READ_DIR, dir_fd)
            res = self.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE),
                               ctypes.c_long(ruleset_fd),
                               ctypes.c_long(LANDLOCK_RULE_PATH_BENEATH),
                               ctypes.byref(rule), ctypes.c_uint32(0))
            if res < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"landlock_add_rule {path}: "
                                   f"{os.strerror(err)}")
        finally:
            os.close(dir_fd)

    def _load_seccomp_program(self, seccomp: "SeccompProgram") -> None:
        self.seccomp_unknown = list(seccomp.unknown)
        if seccomp.program is None:
            self.missing["seccomp"] = seccomp.error or "no filter was built"
            return
        program = seccomp.program
        self.seccomp_program = program
        self._bpf = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // _BPF_INSN_BYTES,
                                 ctypes.addressof(self._bpf))
        self.seccomp = ctypes.addressof(self._fprog)

    def caps(self, allow_test_builtins: bool, fork_helper: bool) -> dict:
        return {
            "fork_helper": fork_helper,
            "t": "caps", "pid": os.getpid(), "root": self.root,
            "landlock_abi": self.landlock_abi,
            "missing": dict(self.missing),
            "seccomp_unknown": self.seccomp_unknown,
            "forbidden_modules": sorted(m for m in FORBIDDEN_MODULES
                                        if m in sys.modules),
            "test_builtins": allow_test_builtins,
            "threads": len(os.listdir("/proc/self/task")),
        }

    # -- in the child --------------------------------------------------------

    def prctl_checked(self, option: int, value: int, arg3: int = 0) -> None:
        if self.prctl(option, value, arg3, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl({option}): {os.strerror(err)}")

    def restrict_landlock(self) -> None:
        res = self.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF),
                           ctypes.c_long(self.ruleset_fd), ctypes.c_uint32(0))
        if res != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")

    def load_seccomp(self) -> None:
        self.prctl_checked(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self.seccomp)


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
            unknown = []
            deny = pyseccomp.ERRNO(errno.EPERM)
            for name in SECCOMP_DENY:
                try:
                    flt.add_rule(deny, name)
                except (OSError, ValueError):
                    unknown.append(name)
            # Reading limits stays possible; only setting them is refused.
            flt.add_rule(deny, "prlimit64", pyseccomp.Arg(2, pyseccomp.NE, 0))
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


def _limit_summary(limits: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(limits.items()))


class Zygote:
    """The fork server loop; runs in the spawned template process."""

    def __init__(self, control: socket.socket, allow_test_builtins: bool,
                 seccomp: SeccompProgram, fork_helper: bool = True):
        self.control = control
        self.allow_test_builtins = allow_test_builtins
        self.pid = os.getpid()
        self.children: dict[int, int] = {}   # pid -> request id
        self.by_id: dict[int, int] = {}      # request id -> pid
        self.users: dict[str, tuple[int, int]] = {}
        self.forks = 0
        self.kernel = _Kernel(seccomp)
        runtime.rehearse()
        # Built once here; each child uses its own copy-on-write copy.
        self.runtime = runtime.Runtime(Channel(CHILD_FD),
                                       allow_test_builtins=allow_test_builtins)
        self.raw_fork = _single_threaded()
        # The C helper forks without Python's after-fork work too, so it
        # needs the same single thread.
        self.fork_helper = (fork_helper and _forkhelper is not None
                            and self.raw_fork)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- control -------------------------------------------------------------

    def send(self, message: dict) -> None:
        self.control.send(msgpack.packb(message))

    def serve_forever(self) -> None:
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.send(self.kernel.caps(self.allow_test_builtins, self.fork_helper))
        gc.collect()
        gc.freeze()
        gc.disable()

        poller = select.poll()
        poller.register(self.control.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            for fd, _events in poller.poll():
                if fd == self.wake_r:
                    self._drain_wakeups()
                    self.reap()
                elif not self._handle_control():
                    self.shutdown()
                    return

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _handle_control(self) -> bool:
        try:
            data, fds, flags, _addr = socket.recv_fds(
                self.control, CONTROL_MESSAGE_MAX_BYTES, 1)
        except ConnectionResetError:
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            message = msgpack.unpackb(data)
            kind = message["t"]
        except Exception:  # noqa: BLE001 - the host is trusted; drop noise
            kind = None
        if kind == "fork" and len(fds) == 1:
            self.fork(message["id"], message["limits"], fds[0])
        else:
            for fd in fds:
                os.close(fd)
            if kind == "kill":
                self.kill(message["id"])
        return True

    # -- children ------------------------------------------------------------

    def _user(self, name: str) -> tuple[int, int]:
        if name not in self.users:
            entry = pwd.getpwnam(name)
            self.users[name] = (entry.pw_uid, entry.pw_gid)
        return self.users[name]

    def fork(self, request_id: int, limits: dict, fd: int) -> None:
        try:
            user = None
            if self.kernel.root and limits.get("run_as_user"):
                user = self._user(limits["run_as_user"])
            if self.fork_helper:
                pid = self._fork_hardened(fd, limits, user)
            else:
                pid = self.kernel.fork() if self.raw_fork else os.fork()
            if pid < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"fork: {os.strerror(err)}")
        except (KeyError, OSError, ValueError) as exc:
            os.close(fd)
            self.send({"t": "fork_failed", "id": request_id,
                       "message": f"{type(exc).__name__}: {exc}"})
            return
        if pid == 0:
            self._child(fd, limits, user)   # never returns
        os.close(fd)
        self.children[pid] = request_id
        self.by_id[request_id] = pid
        self.send({"t": "forked", "id": request_id, "pid": pid})
        self.forks += 1
        if self.forks % GC_EVERY_FORKS == 0:
            gc.collect()

    def _fork_hardened(self, fd: int, limits: dict,
                       user: tuple[int, int] | None) -> int:
        """Fork through the C helper; in the child, serve and never return."""
        kernel = self.kernel
        uid, gid = user if user is not None else (-1, -1)
        ruleset_fd = -1
        if limits.get("landlock") and kernel.ruleset_fd is not None:
            ruleset_fd = kernel.ruleset_fd
        program = kernel.seccomp_program if limits.get("seccomp") else None
        pid = _forkhelper.fork_child(
            fd, self.pid, int(limits["open_files"]), int(limits["cpu_time_s"]),
            int(limits["memory_bytes"]), uid, gid, ruleset_fd, program)
        if pid == 0:
            # Hardened, channel on CHILD_FD; the wake-up fd number may now
            # name the channel.
            _signal.set_wakeup_fd(-1)
            runtime.run_and_exit(self.runtime)
        return pid

    def kill(self, request_id: int) -> None:
        pid = self.by_id.get(request_id)
        if pid is not None and pid in self.children:
            _kill_group(pid)

    def reap(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0,
                                 os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            pid = info.si_pid
            # The leader is a zombie, so its pid (the group id) cannot be
            # reused yet: whatever is left of its group dies now.
            _kill_group(pid)
            _pid, _status, usage = os.wait4(pid, 0)
            code = signo = None
            if info.si_code == os.CLD_EXITED:
                code = info.si_status
            else:
                signo = info.si_status
            request_id = self.children.pop(pid, None)
            self.by_id.pop(request_id, None)
            self.send({"t": "exit", "id": request_id, "pid": pid,
                       "code": code, "signal": signo,
                       "cpu_s": usage.ru_utime + usage.ru_stime})

    def shutdown(self) -> None:
        for pid in list(self.children):
            _kill_group(pid)
        for pid in list(self.children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

    # -- the child, between fork and policy code -----------------------------

    def _child(self, fd: int, limits: dict, user: tuple[int, int] | None) -> None:
        try:
            self._harden(fd, limits, user)
        except BaseException as exc:  # noqa: BLE001 - never run unhardened
            try:
                os.write(2, (f"sandboxhost: child {os.getpid()} could not"
                             f" apply its limits ({_limit_summary(limits)}):"
                             f" {exc}\n").encode())
            finally:
                os._exit(EXIT_SETUP_FAILED)
        runtime.run_and_exit(self.runtime)

    def _harden(self, fd: int, limits: dict, user: tuple[int, int] | None) -> None:
        # Garbage collection is already off (serve_forever): a cycle left
        # by the zygote cannot be collected here and close an fd we are
        # about to renumber (measured note D).
        kernel = self.kernel
        # _signal, not signal: the wrapper's enum conversions cost ~90
        # copy-on-write faults here.
        _signal.set_wakeup_fd(-1)
        _signal.signal(_SIGCHLD, _SIG_DFL)
        os.setsid()

        memory_bytes = int(limits["memory_bytes"])
        cpu_s = int(limits["cpu_time_s"])
        open_files = int(limits["open_files"])
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        # Soft below hard: SIGXCPU at the soft limit names the cause, the
        # kernel's SIGKILL at the hard one is the backstop.
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

        if user is not None:
            uid, gid = user
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

        kernel.prctl_checked(PR_SET_NO_NEW_PRIVS, 1)
        kernel.prctl_checked(PR_SET_DUMPABLE, 0)
        # After setuid: a change of credentials clears the death signal.
        kernel.prctl_checked(PR_SET_PDEATHSIG, _SIGKILL)
        if os.getppid() != self.pid:
            raise OSError("the zygote died before the child was ready")

        if limits.get("landlock") and kernel.ruleset_fd is not None:
            kernel.restrict_landlock()
        if limits.get("seccomp") and kernel.seccomp is not None:
            kernel.load_seccomp()

        if fd != CHILD_FD:
            os.dup2(fd, CHILD_FD)
        os.closerange(0, CHILD_FD)
        os.closerange(CHILD_FD + 1, 1 << 30)


def _kill_group(pid: int) -> None:
    # The leader first: a child killed before its setsid() has no group.
    for kill, target in ((os.kill, pid), (os.killpg, pid)):
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


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
          seccomp: SeccompProgram | None = None,
          fork_helper: bool = True) -> None:
    """Run the fork server on ``control`` until the host closes it."""
    # The host manages this process's life: Ctrl-C in a terminal must not
    # end it before the host does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _close_inherited_fds(control.fileno())
    if seccomp is None:
        seccomp = SeccompProgram.build()
    zygote = None
    try:
        zygote = Zygote(control, allow_test_builtins, seccomp, fork_helper)
        zygote.serve_forever()
    finally:
        if zygote is not None:
            zygote.shutdown()
        # No atexit handlers or interpreter teardown: nothing of that kind
        # belongs to this process.
        os._exit(0)


def clean_env() -> dict[str, str]:
    """The environment the template process gets: nothing secret."""
    return {key: os.environ[key] for key in ZYGOTE_ENV_KEYS
            if key in os.environ}


# Run by the lean interpreter: the import path comes on the command line
# because -I -S leaves out site-packages and the editable install's hook.
_LEAN_BOOT = ("import sys; sys.path[:0] = sys.argv[6:]; "
              "from sandboxhost.zygote import main; main()")


def spawn_entry(control: socket.socket, allow_test_builtins: bool,
                fork_helper: bool = True) -> None:
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
            "1" if fork_helper else "0", *_lean_path()]
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
    fork_helper = sys.argv[5] == "1"
    del sys.argv[1:]
    if program_fd < 0:
        seccomp = SeccompProgram(None, [], note)
    else:
        size = os.fstat(program_fd).st_size
        seccomp = SeccompProgram(os.pread(program_fd, size, 0),
                                 [n for n in note.split(",") if n])
        os.close(program_fd)
    serve(socket.socket(fileno=fd), allow, seccomp, fork_helper)
