"""``cmrun``: the manager loop and the event recorder, supervised together.

Both run as child processes sharing one set of options. Their log lines
are passed through prefixed with the process name; a child that dies is
restarted with a growing back-off (reset after it has run for a while).
One Ctrl-C (or SIGTERM) stops both: each gets SIGTERM, time to finish
(the manager restores task settings on the way out), then SIGKILL.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from manager.cli import EXIT_FAILED, EXIT_OK, configure_logging, shared_options

logger = logging.getLogger(__name__)

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 60.0
STOP_TIMEOUT_S = 20.0


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float = 0.0
    restarts: int = 0
    pumps: list = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, text=True,
            errors="replace", bufsize=1)
        self.started_at = time.monotonic()
        pump = threading.Thread(target=self._pump, args=(self.proc,),
                                name=f"log-{self.name}", daemon=True)
        pump.start()
        self.pumps.append(pump)
        logger.info("started %s (pid %d)", self.name, self.proc.pid)

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            sys.stdout.write(f"[{self.name}] {line}")
            sys.stdout.flush()


def child_commands(args: argparse.Namespace) -> list[Child]:
    """The two command lines, from cmrun's own options."""
    common: list[str] = []
    for option, value in (("--app", args.app), ("--broker", args.broker),
                          ("--db", args.db), ("--state-dir", args.state_dir)):
        if value:
            common += [option, str(value)]
    common += ["-v"] * args.verbose
    serve = [sys.executable, "-m", "manager.cli", "serve", *common,
             "--slots", str(args.slots)]
    if args.policies:
        serve += ["--policies", str(args.policies)]
    if args.tenants:
        serve += ["--tenants", args.tenants]
    for option in ("smtp_host", "smtp_port", "smtp_user",
                   "smtp_password_file"):
        value = getattr(args, option)
        if value:
            serve += [f"--{option.replace('_', '-')}", str(value)]
    if args.smtp_security != "none":
        serve += ["--smtp-security", args.smtp_security]
    events = [sys.executable, "-m", "manager.events", *common,
              "--retention-days", str(args.retention_days)]
    if args.enable_events:
        events.append("--enable-events")
    return [Child("policy", serve), Child("events", events)]


class Supervisor:
    def __init__(self, children: list[Child]):
        self.children = children
        self.stopping = threading.Event()

    def run(self) -> int:
        for child in self.children:
            child.start()
        while not self.stopping.wait(0.2):
            now = time.monotonic()
            for child in self.children:
                self._watch(child, now)
        return self._stop_all()

    def _watch(self, child: Child, now: float) -> None:
        if child.proc is not None:
            code = child.proc.poll()
            if code is None:
                if now - child.started_at > STABLE_AFTER_S:
                    child.backoff_s = BACKOFF_FIRST_S
                return
            logger.error("%s exited with %s; restarting in %.0f s",
                         child.name, _describe_exit(code), child.backoff_s)
            child.proc = None
            child.restart_at = now + child.backoff_s
            child.backoff_s = min(BACKOFF_MAX_S, child.backoff_s * 2)
        elif now >= child.restart_at:
            child.restarts += 1
            child.start()

    def _stop_all(self) -> int:
        running = [c for c in self.children if c.proc is not None
                   and c.proc.poll() is None]
        for child in running:
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        failed = False
        for child in running:
            try:
                code = child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("%s did not stop within %.0f s; killing it",
                             child.name, STOP_TIMEOUT_S)
                os.killpg(child.proc.pid, signal.SIGKILL)
                code = child.proc.wait()
            if code != 0:
                failed = True
                logger.error("%s stopped with %s", child.name,
                             _describe_exit(code))
        for child in self.children:
            for pump in child.pumps:
                pump.join(timeout=2)
        logger.info("cmrun: stopped")
        return EXIT_FAILED if failed else EXIT_OK


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmrun", parents=[shared_options()],
        description="Run the policy manager and the event recorder together;"
        " Ctrl-C stops both.")
    parser.add_argument("--policies", metavar="DIR",
                        help="directory of .policy files to keep in step")
    parser.add_argument("--slots", type=int, default=2,
                        help="policies run at once (default 2)")
    parser.add_argument("--retention-days", type=float, default=7.0,
                        help="keep recorded tasks this long (default 7)")
    parser.add_argument("--enable-events", action="store_true",
                        help="switch task events on in the workers")
    return parser


def cmrun_main(argv: list[str] | None = None) -> int:
    """Entry point of ``cmrun``."""
    args = _parser().parse_args(argv)
    configure_logging(args.verbose, default=logging.INFO, prefix="[cmrun] ")
    supervisor = Supervisor(child_commands(args))

    def _stop(signum, _frame) -> None:
        if not supervisor.stopping.is_set():
            logger.info("%s received: stopping both processes",
                        signal.Signals(signum).name)
        supervisor.stopping.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(cmrun_main())
