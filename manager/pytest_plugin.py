"""pytest fixtures for testing policies (installed with the package).

A test builds a simulated cluster in a few lines, loads a policy, runs it
through the same sandbox as production (same limits, same errors) with a
clock it controls, and asserts on what happened::

    def test_grow_on_wait(policy_cluster):
        policy_cluster.add_worker("w1@node1", subprocesses=2)
        policy_cluster.add_task("media.tasks.resize")
        policy_cluster.record("media.tasks.resize", worker="w1@node1",
                              sent="2026-12-04T09:10",
                              started="2026-12-04T09:12:30")
        run = policy_cluster.run("policies/grow-on-wait.policy",
                                 now="2026-12-04T10:00")
        assert run.applied
        assert policy_cluster.workers["w1@node1"].subprocesses == 3

Fixtures:

- ``policy_cluster``: a ``PolicyCluster`` (simulated workers, tasks,
  queues, recorded tasks and a dry-run mailer) with ``load``, ``run`` and
  ``schedule_times``.
- ``policy_sandbox``: the sandbox host shared by a test session.
- ``policy_real_cluster``: opt-in; starts a real prefork worker on a
  ``filesystem://`` broker in a temporary folder and stops it afterwards;
  the same ``run`` goes through Celery's remote control, and the stats API
  answers from the task events of its workers (``send_task`` and
  ``wait_recorded`` to produce and await them).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandboxhost.errors import PolicySyntaxError, RunError
from sandboxhost.host import Host, RunOutcome

from manager.mailer import Email, Mailer
from manager.runner import LoadedPolicy, PolicyRunner, RunReport
from manager.simcluster import SimulatedCluster
from manager.tenants import Tenant, unrestricted
from manager.workerproc import WorkerProcess

DEFAULT_NOW = "2026-01-05T12:00:00"


@dataclass
class PolicyRun:
    """What one run did, with helpers to assert on it."""

    report: RunReport
    emails: list[Email]
    changes: list[tuple[str, str, object]]

    @property
    def outcome(self) -> RunOutcome:
        return self.report.outcome

    @property
    def ok(self) -> bool:
        return self.outcome.ok

    @property
    def condition(self) -> bool | None:
        return self.outcome.condition

    @property
    def applied(self) -> bool:
        return self.outcome.applied

    @property
    def error(self) -> RunError | None:
        return self.outcome.error

    @property
    def output(self) -> list[str]:
        """Printed lines, without their line ends."""
        return "".join(self.outcome.output).splitlines()

    @property
    def calls(self) -> list[tuple[str, dict]]:
        """Every call the policy made, in order: (operation, arguments)."""
        return [(c.op, c.args) for c in self.outcome.calls]

    @property
    def results(self) -> list[object]:
        """What each call returned (or its error message), in order."""
        return [c.value if c.ok else c.error for c in self.outcome.calls]

    def assert_ok(self) -> None:
        __tracebackhide__ = True
        if not self.ok:
            pytest.fail(f"the run failed: {self.error}")

    def assert_failed(self, *, section: str | None = None,
                      line: int | None = None,
                      message: str | None = None) -> None:
        """The run failed, in ``section`` at ``line``, with ``message``
        in the error's text."""
        __tracebackhide__ = True
        if self.ok:
            pytest.fail("the run succeeded; expected a failure")
        error = self.error
        if section is not None and error.section != section:
            pytest.fail(f"failed in {error.section}, not {section}: {error}")
        if line is not None and error.line != line:
            pytest.fail(f"failed at line {error.line}, not {line}: {error}")
        if message is not None and message not in str(error):
            pytest.fail(f"{message!r} is not in the error: {error}")

    def assert_no_calls(self) -> None:
        __tracebackhide__ = True
        if self.calls:
            pytest.fail(f"the policy made calls: {self.calls}")

    def assert_no_changes(self) -> None:
        __tracebackhide__ = True
        if self.changes or self.emails:
            pytest.fail(f"the policy changed {self.changes} and sent"
                        f" {len(self.emails)} email(s)")


def _moment(value, timezone) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone)
    return value


class _Runs:
    """Loading and running shared by the simulated and the real cluster."""

    runner: PolicyRunner
    tenant: Tenant

    def load(self, path: str | Path | None = None, *,
             text: str | None = None, name: str | None = None
             ) -> LoadedPolicy:
        """Check and compile a policy from a file or a string.

        Raises ``PolicySyntaxError`` (with ``.violations``) or
        ``manager.runner.PolicyLoadError`` as production would.
        """
        if (path is None) == (text is None):
            raise TypeError("give a path or text=, not both")
        if text is not None:
            return self.runner.load(text, f"<{name or 'policy'}>",
                                    name=name or "policy", tenant=self.tenant)
        return self.runner.load(Path(path).read_bytes(), str(path),
                                name=name, tenant=self.tenant)

    def schedule_times(self, policy, start, end) -> list[dt.datetime]:
        """Every time ``policy`` would run between ``start`` and ``end``
        (in the cluster's timezone), stepping its schedule."""
        policy = self._loaded(policy)
        tz = self.runner.timezone
        start, end = _moment(start, tz), _moment(end, tz)
        times, last = [], start
        while len(times) < 10_000:
            nxt = policy.schedule.next_after(last)
            if nxt is None or nxt > end:
                break
            times.append(nxt.astimezone(tz))
            last = nxt
        return times

    def _loaded(self, policy) -> LoadedPolicy:
        if isinstance(policy, LoadedPolicy):
            return policy
        return self.load(policy)


class PolicyCluster(SimulatedCluster, _Runs):
    """A simulated cluster that runs policies through the real sandbox."""

    def __init__(self, host: Host, timezone: str = "UTC"):
        super().__init__(timezone)
        self.runner = PolicyRunner(host, timezone=self.timezone)
        self.mailer = Mailer(None)
        self.tenant = unrestricted()

    @property
    def emails(self) -> list[Email]:
        """Messages policies would have sent (dry run: nothing is sent)."""
        return self.mailer.outbox

    def run(self, policy, *, now=DEFAULT_NOW) -> PolicyRun:
        """Run a policy (a path, or what ``load`` returned) once."""
        policy = self._loaded(policy)
        changes_before = len(self.changes)
        emails_before = len(self.mailer.outbox)
        report = self.runner.run(policy, cluster=self, stats=self,
                                 mailer=self.mailer, tenant=self.tenant,
                                 now=_moment(now, self.timezone))
        return PolicyRun(report, self.mailer.outbox[emails_before:],
                         self.changes[changes_before:])


@pytest.fixture(scope="session")
def policy_sandbox():
    """The sandbox host (template process) shared by the session."""
    with Host() as host:
        yield host


@pytest.fixture
def policy_cluster(policy_sandbox) -> PolicyCluster:
    """A fresh simulated cluster; see ``PolicyCluster``."""
    return PolicyCluster(policy_sandbox)


# -- the opt-in real cluster ----------------------------------------------------------

class RealCluster(_Runs):
    """Real prefork workers on a filesystem:// broker in a temporary folder,
    with an event recorder feeding the stats API, as cmevents does."""

    def __init__(self, host: Host, state_dir: Path, app_spec: str):
        from manager.config import load_app
        from manager.control import CeleryCluster
        from manager.store import Store

        self.state_dir = state_dir
        self.app_spec = app_spec
        os.environ["CMPOLICY_STATE_DIR"] = str(state_dir)
        self.app = load_app(app_spec, None, state_dir)
        # Tasks sent from the test are matched, and wait time measured,
        # from the time they were sent.
        self.app.conf.task_send_sent_event = True
        self.control = CeleryCluster(self.app)
        self.store = Store(f"sqlite:///{state_dir / 'manager.db'}")
        self.runner = PolicyRunner(host)
        self.mailer = Mailer(None)
        self.tenant = unrestricted()
        self.workers: dict[str, WorkerProcess] = {}
        self._stopping = threading.Event()
        self._recorder: threading.Thread | None = None

    def _start_recorder(self, timeout_s: float = 30.0) -> None:
        from manager.events import RecorderThread
        self._recorder = RecorderThread(self.app, self.store.url,
                                        self._stopping)
        self._recorder.start()
        if not self._recorder.ready.wait(timeout_s):
            raise RuntimeError("the event recorder did not start")

    def send_task(self, name: str, *args, **kwargs) -> str:
        """Publish a task by name; its id."""
        return self.app.send_task(name, args=args, kwargs=kwargs).id

    def wait_recorded(self, task_ids: list[str], timeout_s: float = 30.0
                      ) -> list:
        """Wait until each task's end is recorded; their records."""
        from manager.stats import READY_STATES
        deadline = time.monotonic() + timeout_s
        while True:
            records = [self.store.task(task_id) for task_id in task_ids]
            if all(r is not None and r.state in READY_STATES
                   for r in records):
                return records
            if time.monotonic() > deadline:
                done = sum(1 for r in records
                           if r is not None and r.state in READY_STATES)
                raise TimeoutError(f"{done} of {len(task_ids)} tasks were"
                                   f" recorded as finished in {timeout_s} s")
            time.sleep(0.1)

    def start_worker(self, name: str, subprocesses: int = 1, *,
                     queues: list[str] | None = None,
                     timeout_s: float = 30.0) -> None:
        if self._recorder is None:
            self._start_recorder()
        # The worker imports the app as this test process can.
        worker = WorkerProcess(
            self.app_spec, name, log_path=self.state_dir / f"{name}.log",
            concurrency=subprocesses,
            extra=["-Q", ",".join(queues)] if queues else (),
            env={**os.environ, "CMPOLICY_STATE_DIR": str(self.state_dir),
                 "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        worker.start()
        self.workers[name] = worker
        worker.wait_ready(self.app, timeout_s)
        self.control.refresh()

    def run(self, policy, *, now=None) -> PolicyRun:
        policy = self._loaded(policy)
        emails_before = len(self.mailer.outbox)
        report = self.runner.run(
            policy, cluster=self.control, stats=self.store,
            mailer=self.mailer, tenant=self.tenant,
            now=None if now is None else _moment(now, self.runner.timezone))
        changes = [(c.op, c.args, c.value) for c in report.outcome.calls
                   if c.ok and c.op in ("tasks.set", "workers.change",
                                        "workers.queues")]
        return PolicyRun(report, self.mailer.outbox[emails_before:], changes)

    def stop(self) -> None:
        try:
            self.control.restore()
        except Exception:  # the workers may be gone already
            pass
        control_dir = None
        if (self.app.conf.broker_url or "").startswith("filesystem://"):
            control_dir = self.state_dir / "broker" / "control"
        for worker in self.workers.values():
            worker.stop(broker_dir=control_dir)
        self._stopping.set()
        if self._recorder is not None:
            self._recorder.join(10)
        self.store.close()


@pytest.fixture
def policy_real_cluster(policy_sandbox, tmp_path, request):
    """Opt-in: real workers for tests that need Celery itself.

    The Celery app comes from the ``cmpolicy_app`` ini option (a
    ``module:attribute`` the workers can import), or Celery's own
    ``CELERY_APP`` environment variable; start workers with
    ``policy_real_cluster.start_worker(name, subprocesses)``.
    """
    spec = request.config.getini("cmpolicy_app") or os.environ.get(
        "CELERY_APP")
    if not spec:
        pytest.skip("set the cmpolicy_app ini option to use a real cluster")
    saved = os.environ.get("CMPOLICY_STATE_DIR")
    cluster = RealCluster(policy_sandbox, tmp_path, spec)
    yield cluster
    cluster.stop()
    if saved is None:
        os.environ.pop("CMPOLICY_STATE_DIR", None)
    else:
        os.environ["CMPOLICY_STATE_DIR"] = saved


def pytest_addoption(parser):
    parser.addini("cmpolicy_app", "the Celery app (module:attribute) that"
                  " policy_real_cluster's workers run", default="")


__all__ = ["PolicyCluster", "PolicyRun", "RealCluster", "PolicySyntaxError"]
