"""The parent side of a run: fork a child, serve its calls, enforce limits.

``Host.run`` asks the template process (``zygote``) for a child, hands it
one end of a fresh socketpair, sends the start frame and then serves the
child's frames until ``done`` or ``error``: each ``call`` goes to the
caller's handler, each ``out`` is kept. The host holds the wall-clock
deadline, counts calls, output and frame sizes on its own (the child's
runtime counts too, but the child is not trusted), and checks every frame
against its schema. Whatever happens, the run ends with the child's process
group killed and its exit status collected.

Runs may come from several threads at once (one per slot); a reader thread
takes the template's control messages (fork results, exit statuses) and
hands each to the run that waits for it.
"""

from __future__ import annotations

import datetime
import io
import itertools
import logging
import os
import pwd
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
from multiprocess import context as mp_context
from multiprocess import popen_spawn_posix, reduction, spawn, util

from sandboxhost import protocol, zygote
from sandboxhost.errors import (
    ChildDied,
    ChildTimedOut,
    HostError,
    LimitExceeded,
    OperationError,
    PolicyError,
    ProtocolViolation,
    RunError,
)
from sandboxhost.limits import DEFAULT_LIMITS, RunLimits
from sandboxhost.protocol import Channel

logger = logging.getLogger(__name__)

MODES = protocol.MODES
ZYGOTE_START_TIMEOUT_S = 30.0
ZYGOTE_STOP_TIMEOUT_S = 5.0
# How long a killed child may take to be reported reaped.
REAP_TIMEOUT_S = 5.0
CONTROL_MESSAGE_MAX_BYTES = 64 * 1024
INTERNAL_ERROR_TYPE = "InternalError"

Handler = Callable[[str, dict], object]


@dataclass
class CallRecord:
    """One call a child made and what it got back."""

    op: str
    args: dict
    ok: bool
    value: object = None
    error: str | None = None


@dataclass
class RunOutcome:
    """What one run did; ``error`` is None when it succeeded."""

    ok: bool
    mode: str
    schedule: dict | None = None
    condition: bool | None = None
    applied: bool = False
    output: list[str] = field(default_factory=list)
    calls: list[CallRecord] = field(default_factory=list)
    error: RunError | None = None
    duration_s: float = 0.0
    pid: int | None = None
    # Known when the run ended without a report (the host waited for the
    # child's end); a child that reported is reaped after run() returns.
    exit_code: int | None = None
    exit_signal: int | None = None


class _CleanSpawnPopen(popen_spawn_posix.Popen):
    """multiprocess's spawn launch, minus what a template must not see.

    The stock launcher passes the host's argv, environment and authkey and
    makes the new interpreter re-run the host's ``__main__`` (for the
    manager, that imports Celery). Here the preparation data carries only
    the import path, the environment is scrubbed, the process gets its own
    session, and no resource tracker is started.
    """

    def _launch(self, process_obj) -> None:
        # The host's authkey would open its multiprocess connections.
        process_obj.authkey = os.urandom(32)
        prep = {"name": process_obj.name,
                "sys_path": [os.path.abspath(p) for p in sys.path],
                "dir": "/"}
        payload = io.BytesIO()
        mp_context.set_spawning_popen(self)
        try:
            reduction.dump(prep, payload)
            reduction.dump(process_obj, payload)
        finally:
            mp_context.set_spawning_popen(None)

        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        try:
            self._fds.extend([child_r, child_w])
            argv = spawn.get_command_line(pipe_handle=child_r)
            # dup2 onto itself clears close-on-exec: only these fds pass.
            actions = [(os.POSIX_SPAWN_DUP2, fd, fd) for fd in self._fds]
            self.pid = os.posix_spawn(argv[0], argv, zygote.clean_env(),
                                      file_actions=actions, setsid=True)
            self.sentinel = parent_r
            with open(parent_w, "wb", closefd=False) as pipe:
                pipe.write(payload.getbuffer())
        finally:
            self.finalizer = util.Finalize(self, util.close_fds,
                                           (parent_r, parent_w))
            os.close(child_r)
            os.close(child_w)


class ZygoteProcess(mp_context.SpawnProcess):
    """A spawn-context Process launched by ``_CleanSpawnPopen``."""

    @staticmethod
    def _Popen(process_obj):  # noqa: N802 - multiprocess's hook name
        return _CleanSpawnPopen(process_obj)


class _Job:
    """A child as the reader thread sees it: its pid, then its exit."""

    def __init__(self, request_id: int):
        self.id = request_id
        self.pid: int | None = None
        self.fork_error: str | None = None
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self.cpu_s = 0.0
        self.zygote_died = False
        self.exited = threading.Event()


class _Zygote:
    """One template process and the host's end of its control socket."""

    def __init__(self, allow_test_builtins: bool):
        self._ids = itertools.count(1)
        self._jobs: dict[int, _Job] = {}
        self._lock = threading.Lock()
        self.dead = False
        self.control, theirs = socket.socketpair(socket.AF_UNIX,
                                                 socket.SOCK_SEQPACKET)
        self.process = ZygoteProcess(
            target=zygote.spawn_entry, args=(theirs, allow_test_builtins),
            name="sandboxhost-zygote", daemon=True)
        try:
            self.process.start()
        finally:
            theirs.close()
        self.pid = self.process.pid
        self.caps = self._read_caps()
        self._reader = threading.Thread(
            target=self._read_loop, name=f"sandboxhost-zygote-{self.pid}",
            daemon=True)
        self._reader.start()

    def _read_caps(self) -> dict:
        self.control.settimeout(ZYGOTE_START_TIMEOUT_S)
        try:
            data = self.control.recv(CONTROL_MESSAGE_MAX_BYTES)
        except (socket.timeout, OSError) as exc:
            self.stop()
            raise HostError(f"the template process (pid {self.pid}) did not"
                            f" start: {exc}") from exc
        finally:
            self.control.settimeout(None)
        if not data:
            self.stop()
            raise HostError(f"the template process (pid {self.pid}) exited"
                            " during start-up; see its stderr")
        caps = msgpack.unpackb(data)
        if caps.get("t") != "caps":
            self.stop()
            raise HostError(f"unexpected first message from the template"
                            f" process: {caps!r:.200}")
        return caps

    # -- control messages ----------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while True:
                data = self.control.recv(CONTROL_MESSAGE_MAX_BYTES)
                if not data:
                    break
                self._dispatch(data)
        except OSError:
            pass
        except Exception:  # noqa: BLE001 - a bug here must be seen
            logger.exception("template process %s: bad control message",
                             self.pid)
        finally:
            self._mark_dead()

    def _dispatch(self, data: bytes) -> None:
        if len(data) != zygote.REPORT.size:
            logger.error("template process %s: a control message of %d bytes"
                         " is not a report", self.pid, len(data))
            return
        kind, pid, job_id, code, signo, value = zygote.REPORT.unpack(data)
        with self._lock:
            job = self._jobs.get(job_id)
            if kind != zygote.REP_FORKED:
                self._jobs.pop(job_id, None)
        if job is None:
            logger.warning("template process %s: report %s for no known run"
                           " (id %s, pid %s)", self.pid, kind, job_id, pid)
            return
        if kind == zygote.REP_FORKED:
            job.pid = pid
        elif kind == zygote.REP_FORK_FAILED:
            job.fork_error = f"fork: {os.strerror(value)}"
            job.exited.set()
        elif kind == zygote.REP_EXIT:
            if code > 0:
                logger.debug("child %s exited with code %s", pid, code)
            job.pid = pid
            job.exit_code = code if code >= 0 else None
            job.exit_signal = signo or None
            job.cpu_s = value / 1e6
            job.exited.set()

    def _mark_dead(self) -> None:
        with self._lock:
            self.dead = True
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for job in jobs:
            job.zygote_died = True
            job.exited.set()

    # -- requests ------------------------------------------------------------

    def fork(self, child_sock: socket.socket, limits: RunLimits,
             user: tuple[int, int] | None) -> _Job:
        job = _Job(next(self._ids))
        uid, gid = user if user is not None else (-1, -1)
        flags = ((zygote.FLAG_SECCOMP if limits.seccomp else 0)
                 | (zygote.FLAG_LANDLOCK if limits.landlock else 0))
        request = zygote.REQUEST.pack(
            zygote.REQ_FORK, flags, job.id, limits.memory_bytes,
            limits.cpu_time_s, limits.open_files, uid, gid)
        with self._lock:
            if self.dead:
                raise OSError("the template process is gone")
            self._jobs[job.id] = job
        try:
            socket.send_fds(self.control, [request], [child_sock.fileno()])
        except OSError:
            with self._lock:
                self._jobs.pop(job.id, None)
                # Its control socket is broken: never ask it again, even
                # while the process is still on its way out (not yet a
                # zombie, so it still looks alive).
                self.dead = True
            raise
        return job

    def kill(self, job: _Job) -> None:
        """Have the zygote kill the job's group (it alone knows the pid
        has not been recycled)."""
        if job.exited.is_set():
            return
        try:
            self.control.send(zygote.REQUEST.pack(
                zygote.REQ_KILL, 0, job.id, 0, 0, 0, -1, -1))
        except OSError:
            pass   # the zygote is gone; its death signal kills the child

    def alive(self) -> bool:
        return not self.dead and self.process.is_alive()

    def stop(self) -> None:
        try:
            self.control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.process.join(ZYGOTE_STOP_TIMEOUT_S)
        if self.process.is_alive():
            logger.warning("template process %s did not stop; killing it",
                           self.pid)
            self.process.kill()
            self.process.join(ZYGOTE_STOP_TIMEOUT_S)
        self.control.close()


def _signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


def _naive_local(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now()
    if now.tzinfo is not None:
        return now.astimezone().replace(tzinfo=None)
    return now


class _Run:
    """The state of one run while its frames are served."""

    def __init__(self, zyg: _Zygote, job: _Job, chan: Channel,
                 handler: Handler, limits: RunLimits, policy: str,
                 mode: str, deadline: float):
        self.zyg = zyg
        self.job = job
        self.chan = chan
        self.handler = handler
        self.limits = limits
        self.policy = policy
        self.mode = mode
        self.deadline = deadline
        self.outcome = RunOutcome(ok=False, mode=mode)
        self.output_bytes = 0
        self.frames = 0
        self.killed = False

    def kill(self) -> None:
        self.killed = True
        self.zyg.kill(self.job)

    def converse(self, start: bytes) -> RunError | None:
        """Serve the child until its final frame; the run's error or None."""
        try:
            self.chan.send_raw(start, deadline=self.deadline)
        except protocol.ChannelTimeout:
            return self._timed_out()
        except OSError:
            pass   # the child is gone already; reading tells how
        while True:
            try:
                frame = protocol.check_child_frame(self.chan.recv(
                    self.limits.frame_bytes, deadline=self.deadline))
            except protocol.ChannelTimeout:
                return self._timed_out()
            except protocol.ChannelClosed:
                return self._died()
            except protocol.FrameTooLarge as exc:
                self.kill()
                return LimitExceeded(f"the child sent a {exc}",
                                     limit="frame_bytes")
            except protocol.FrameTruncated as exc:
                died = self._died()
                if isinstance(died, ChildDied) and died.signal is not None:
                    return died
                return ProtocolViolation(str(exc))
            except protocol.FrameError as exc:
                self.kill()
                return ProtocolViolation(f"the child broke the protocol: {exc}")
            except OSError as exc:
                self.kill()
                return ProtocolViolation(f"the channel failed: {exc}")
            self.frames += 1
            if self.chan.received_bytes > self.limits.channel_bytes:
                self.kill()
                return LimitExceeded(
                    f"the child sent more than {self.limits.channel_bytes}"
                    " bytes in one run", limit="channel_bytes")
            kind = frame["t"]
            if kind == "call":
                error = self._call(frame)
                if error is not None:
                    return error
            elif kind == "out":
                error = self._out(frame)
                if error is not None:
                    return error
            elif kind == "done":
                return self._done(frame)
            else:
                return PolicyError(frame["message"], section=frame["section"],
                                   line=frame["line"], type_name=frame["type"])

    def _call(self, frame: dict) -> RunError | None:
        calls = self.outcome.calls
        if len(calls) >= self.limits.max_calls:
            self.kill()
            return LimitExceeded(
                f"the child made more than {self.limits.max_calls} calls",
                limit="max_calls")
        op, args = frame["op"], frame["args"]
        record = CallRecord(op=op, args=args, ok=True)
        try:
            value = self.handler(op, args)
            reply = protocol.encode_frame(
                {"t": "reply", "ok": True, "value": value},
                protocol.HOST_FRAME_MAX_BYTES)
            record.value = value
        except OperationError as exc:
            reply = self._error_reply(record, exc.type_name, exc.message)
        except protocol.FrameTooLarge as exc:
            logger.error("policy %s: the reply to %s is too large: %s",
                         self.policy, op, exc)
            reply = self._error_reply(record, INTERNAL_ERROR_TYPE,
                                      "internal error: reply too large")
        except Exception:  # noqa: BLE001 - a handler bug fails one call only
            logger.exception("policy %s: the handler for %s failed",
                             self.policy, op)
            reply = self._error_reply(record, INTERNAL_ERROR_TYPE,
                                      "internal error")
        calls.append(record)
        try:
            self.chan.send_raw(reply, deadline=self.deadline)
        except protocol.ChannelTimeout:
            return self._timed_out()
        except OSError:
            pass   # the child is gone; the next read says how
        return None

    @staticmethod
    def _error_reply(record: CallRecord, type_name: str, message: str) -> bytes:
        record.ok = False
        record.error = message
        return protocol.encode_frame({
            "t": "reply", "ok": False,
            "type": str(type_name)[:protocol.TYPE_NAME_MAX_CHARS],
            "message": str(message)[:protocol.ERROR_MESSAGE_MAX_CHARS]})

    def _out(self, frame: dict) -> RunError | None:
        text = frame["text"]
        # At least a byte per frame: empty frames are not free to serve.
        self.output_bytes += max(1, len(text.encode("utf-8",
                                                    "surrogatepass")))
        if self.output_bytes > self.limits.output_bytes:
            self.kill()
            return LimitExceeded(
                f"the child printed more than {self.limits.output_bytes}"
                " bytes", limit="output_bytes")
        self.outcome.output.append(text)
        return None

    def _done(self, frame: dict) -> RunError | None:
        schedule, condition, applied = (frame["schedule"], frame["condition"],
                                        frame["applied"])
        if self.mode == "schedule":
            consistent = (schedule is not None and condition is None
                          and not applied)
        else:
            consistent = (schedule is None and condition is not None
                          and (condition or not applied))
        if not consistent:
            self.kill()
            return ProtocolViolation(
                f"the child's done frame does not fit a {self.mode!r} run")
        self.outcome.schedule = schedule
        self.outcome.condition = condition
        self.outcome.applied = applied
        return None

    def _timed_out(self) -> RunError:
        self.kill()
        return ChildTimedOut(
            f"the run went past its wall-clock limit of"
            f" {self.limits.wall_timeout_s} s and was killed")

    def _died(self) -> RunError:
        """The child closed its channel without a final frame: why?"""
        job = self.job
        if not job.exited.wait(max(0.0, self.deadline - time.monotonic())):
            return self._timed_out()
        if job.fork_error is not None:
            raise HostError(f"the template process could not fork a child:"
                            f" {job.fork_error}")
        if job.zygote_died:
            return ChildDied("the template process died during the run")
        if job.exit_signal is not None:
            name = _signal_name(job.exit_signal)
            cpu_limit_s = self.limits.cpu_time_s
            if job.exit_signal == signal.SIGXCPU or (
                    job.exit_signal == signal.SIGKILL and not self.killed
                    and job.cpu_s >= cpu_limit_s):
                message = (f"killed by {name}: CPU time limit of"
                           f" {cpu_limit_s} s exceeded")
            else:
                message = f"killed by {name} before reporting a result"
            return ChildDied(message, signal=job.exit_signal)
        if job.exit_code == zygote.EXIT_SETUP_FAILED:
            return ChildDied("the child could not apply its limits (the"
                             " reason is on the manager's stderr)",
                             exit_code=job.exit_code)
        return ChildDied(f"exited with code {job.exit_code} before reporting"
                         " a result", exit_code=job.exit_code)

    def collect(self, clean: bool) -> None:
        """Make sure the child's group dies; wait for its status if needed.

        A child that reported is already in os._exit: the zygote kills
        what may linger of its group and reaps it while the caller goes
        on (waiting here would add the kernel's exit teardown, about
        0.7 ms, to every run). Any other ending waits for the status.
        """
        job = self.job
        if clean:
            self.zyg.kill(job)
            return
        if not job.exited.is_set():
            self.kill()
            if not job.exited.wait(REAP_TIMEOUT_S):
                logger.error("policy %s: child %s was not reported reaped"
                             " within %s s", self.policy, job.pid,
                             REAP_TIMEOUT_S)


class Host:
    """Runs compiled policy sections in hardened children; thread-safe."""

    def __init__(self, *, unsafe_test_builtins: bool = False):
        self._unsafe = unsafe_test_builtins
        self._users: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._zygote: _Zygote | None = None
        self._zygotes_started = 0
        self._reported_caps: tuple | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the template process now (run() does it when needed)."""
        with self._lock:
            self._ensure_zygote()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            zyg, self._zygote = self._zygote, None
        if zyg is not None:
            zyg.stop()

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def missing_layers(self) -> dict[str, str]:
        """Kernel layers children run without here, each with the reason.

        Keys: "seccomp", "landlock", "landlock_scopes" (no signal scoping
        in this kernel's Landlock), "run_as_user". Starts the template
        process if needed.
        """
        with self._lock:
            return dict(self._ensure_zygote().caps.get("missing", {}))

    @property
    def zygote_pid(self) -> int | None:
        zyg = self._zygote
        return zyg.pid if zyg is not None else None

    def _ensure_zygote(self) -> _Zygote:
        if self._closed:
            raise HostError("the host is closed")
        zyg = self._zygote
        if zyg is not None and zyg.alive():
            return zyg
        if zyg is not None:
            logger.warning("template process %s died; starting a new one",
                           zyg.pid)
            zyg.stop()
            self._zygote = None
        try:
            zyg = _Zygote(self._unsafe)
        except HostError:
            raise
        except Exception as exc:
            raise HostError(f"cannot start the template process: {exc}") from exc
        self._zygote = zyg
        self._zygotes_started += 1
        self._report_caps(zyg.caps)
        logger.info("template process %s started", zyg.pid)
        return zyg

    def _report_caps(self, caps: dict) -> None:
        if caps.get("forbidden_modules"):
            logger.error("the template process imported %s; children are"
                         " not clean", ", ".join(caps["forbidden_modules"]))
        if caps.get("test_builtins"):
            logger.warning("UNSAFE: policy children get full Python builtins"
                           " (test mode)")
        missing = caps.get("missing", {})
        key = tuple(sorted(missing.items()))
        if key == self._reported_caps:
            return
        self._reported_caps = key
        for layer, reason in sorted(missing.items()):
            logger.warning("policy children run without %s: %s", layer, reason)
        if caps.get("seccomp_unknown"):
            logger.warning("seccomp: system calls unknown here, not filtered:"
                           " %s", ", ".join(caps["seccomp_unknown"]))

    def _user(self, zyg: _Zygote, limits: RunLimits) -> tuple[int, int] | None:
        """The uid and gid children switch to, when the host is root."""
        name = limits.run_as_user
        if not zyg.caps.get("root"):
            return None
        if not name:
            # Fail closed: a root child is held by the filters alone.
            raise HostError("the manager runs as root, so policy children"
                            " must run as another user: run_as_user is"
                            " empty")
        user = self._users.get(name)
        if user is None:
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                raise HostError(f"cannot run policy children as user"
                                f" {name!r}: no such user") from None
            if entry.pw_uid == 0 or entry.pw_gid == 0:
                raise HostError(f"cannot run policy children as user"
                                f" {name!r}: it is root or in group root")
            user = self._users[name] = (entry.pw_uid, entry.pw_gid)
        return user

    def _fork(self, child_sock: socket.socket, limits: RunLimits
              ) -> tuple[_Zygote, _Job]:
        with self._lock:
            zyg = self._ensure_zygote()
        try:
            return zyg, zyg.fork(child_sock, limits, self._user(zyg, limits))
        except OSError:
            pass
        # The template died between runs; one restart, then give up.
        with self._lock:
            zyg = self._ensure_zygote()
        try:
            return zyg, zyg.fork(child_sock, limits, self._user(zyg, limits))
        except OSError as exc:
            raise HostError(f"cannot reach the template process: {exc}") from exc

    # -- runs ----------------------------------------------------------------

    def _attempt(self, start: bytes, handler: Handler, limits: RunLimits,
                 policy: str, mode: str, deadline: float
                 ) -> tuple["_Run", RunError | None]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                zyg, job = self._fork(theirs, limits)
            finally:
                theirs.close()
            run = _Run(zyg, job, Channel(ours), handler, limits, policy, mode,
                       deadline)
            error = None
            finished = False
            try:
                error = run.converse(start)
                finished = True
            finally:
                # A child that reported (done or error) exits by itself;
                # any other ending kills it at once.
                run.collect(clean=finished and (
                    error is None or isinstance(error, PolicyError)))
        finally:
            ours.close()
        return run, error

    def run(self, code_wire: dict, *, handler: Handler, mode: str = "run",
            limits: RunLimits = DEFAULT_LIMITS, policy: str = "",
            now: datetime.datetime | None = None,
            fixed_clock: bool = False) -> RunOutcome:
        """Run one policy in a fresh child and return what it did.

        Raises HostError only when no child can be started; every failure
        of the child or of policy code is in ``RunOutcome.error``.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        started = time.monotonic()
        deadline = started + limits.wall_timeout_s
        start = protocol.encode_frame({
            "t": "start", "mode": mode, "policy": policy, "code": code_wire,
            "now": _naive_local(now).isoformat(), "fixed_clock": fixed_clock,
            "max_calls": limits.max_calls, "output_bytes": limits.output_bytes,
            "frame_bytes": limits.frame_bytes,
            "test_builtins": self._unsafe}, protocol.HOST_FRAME_MAX_BYTES)

        for attempt in range(2):
            run, error = self._attempt(start, handler, limits, policy, mode,
                                       deadline)
            # A template that died before forking ran nothing: start a new
            # one and try again, once.
            if not (attempt == 0 and run.job.zygote_died
                    and run.job.pid is None and run.frames == 0):
                break
            logger.warning("policy %s: the template process died before"
                           " forking; retrying", policy)

        job = run.job
        outcome = run.outcome
        outcome.error = error
        outcome.ok = error is None
        outcome.pid = job.pid
        outcome.exit_code = job.exit_code
        outcome.exit_signal = job.exit_signal
        outcome.duration_s = time.monotonic() - started
        logger.debug("policy %s: run in pid %s %s in %.2f ms", policy, job.pid,
                     "succeeded" if error is None else f"failed: {error}",
                     outcome.duration_s * 1000)
        return outcome
