"""Start, await and stop a Celery prefork worker process.

For the pytest plugin's real cluster and the project's integration tests:
the worker loads ``manager.worker_ext`` (the manager's control commands),
sends task events (unless asked not to), runs in its own session and logs to a file, whose tail
goes into every error about it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from celery import Celery

from manager.fstransport import prune_bindings

logger = logging.getLogger(__name__)

LOG_TAIL_CHARS = 3000
READY_TIMEOUT_S = 30.0
# A warm shutdown waits for running tasks; past this the group is killed.
STOP_TIMEOUT_S = 20.0


class WorkerProcess:
    """One ``celery worker`` process for ``app_spec`` (module:attribute)."""

    def __init__(self, app_spec: str, name: str, *, log_path: Path,
                 concurrency: int = 1, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, extra: Sequence[str] = (),
                 loglevel: str = "WARNING", events: bool = True):
        self.app_spec = app_spec
        self.name = name
        self.log_path = Path(log_path)
        self.concurrency = concurrency
        self.env = env
        self.cwd = cwd
        self.extra = list(extra)
        self.loglevel = loglevel
        self.events = events
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", self.app_spec, "worker",
                "-n", self.name, "-c", str(self.concurrency), "-P",
                "prefork", *(["-E"] if self.events else []), "--include",
                "manager.worker_ext", "--without-mingle", "--without-gossip",
                "--loglevel", self.loglevel, *self.extra]

    def start(self) -> None:
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError as exc:
            return f"(no log: {exc.strerror})"

    def wait_ready(self, app: Celery, timeout_s: float = READY_TIMEOUT_S
                   ) -> None:
        """Until the worker answers a ping; RuntimeError with its log tail
        if it exits or stays silent."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited; the end of"
                                   f" {self.log_path}:\n{self.log_tail()}")
            if app.control.ping(destination=[self.name], timeout=0.5):
                return
        raise RuntimeError(f"worker {self.name} did not answer in"
                           f" {timeout_s} s; the end of {self.log_path}:\n"
                           f"{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM,
             timeout_s: float = STOP_TIMEOUT_S,
             broker_dir: Path | None = None) -> None:
        """Signal the worker's main process (it stops its own pool; a
        signal to the whole group makes that slower, not faster), kill the
        group if it does not end in time. ``broker_dir``: a filesystem://
        broker's folder, whose bindings for this worker are removed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.send_signal(sig)
            proc.wait(timeout_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            logger.warning("worker %s did not stop in %s s; killing it",
                           self.name, timeout_s)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        if broker_dir is not None:
            prune_bindings(broker_dir, self.name)
