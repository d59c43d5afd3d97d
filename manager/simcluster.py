"""A simulated cluster: workers, tasks, queues and recorded tasks in memory.

It answers the same operations as the real cluster with the same rules
(a pool never shrinks below one process, growing a pool raises its
prefetch by the prefetch multiplier as Celery does, prefetch 0 means
unlimited and is left alone, unknown names are errors that name them), so
that ``cmpolicy try`` and the pytest plugin show what production would do.
Emails go to a dry-run ``manager.mailer.Mailer``, which records them.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sandboxhost.namespace import TASK_SETTINGS

from manager.errors import ConfigurationError, OperationRefused, UnknownName
from manager.stats import TaskRecord, query_records

logger = logging.getLogger(__name__)

# Celery's defaults for a task that sets nothing.
TASK_DEFAULTS = {
    "ignore_result": False,
    "routing_key": None,
    "exchange": None,
    "default_retry_delay": 180,
    "rate_limit": None,
    "store_errors_even_if_ignored": False,
    "acks_late": False,
    "expires": None,
    "time_limit": None,
    "soft_time_limit": None,
}


@dataclass
class SimWorker:
    """One simulated worker with a prefork pool."""

    name: str
    subprocesses: int = 2
    prefetch_multiplier: int = 4
    prefetch: int | None = None
    queues: list[str] = field(default_factory=lambda: ["celery"])

    def __post_init__(self):
        if self.prefetch is None:
            self.prefetch = self.subprocesses * self.prefetch_multiplier


def _check_fixture(data: dict) -> None:
    """Refuse a fixture whose values have the wrong types, naming them."""
    def fail(where: str, expected: str):
        raise ConfigurationError(f"bad cluster fixture: {where} must be"
                                 f" {expected}")

    for key in ("workers", "tasks", "queues"):
        if not isinstance(data.get(key, {}), dict):
            fail(key, "an object")
    for name, spec in data.get("workers", {}).items():
        if not isinstance(spec, dict):
            fail(f"workers.{name}", "an object")
        for field_name in ("subprocesses", "prefetch", "prefetch_multiplier"):
            value = spec.get(field_name, 1)
            if not isinstance(value, int) or isinstance(value, bool) \
                    or value < 0:
                fail(f"workers.{name}.{field_name}", "a whole number")
        if not isinstance(spec.get("queues", []), list):
            fail(f"workers.{name}.queues", "a list of queue names")
    for name, length in data.get("queues", {}).items():
        if not isinstance(length, int) or isinstance(length, bool) \
                or length < 0:
            fail(f"queues.{name}", "a whole number")
    if not isinstance(data.get("records", []), list):
        fail("records", "a list")
    for index, spec in enumerate(data.get("records", [])):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"),
                                                        str):
            fail(f"records[{index}]", "an object with a task name")


class SimulatedCluster:
    """In-memory stand-in for a Celery cluster, its event store and mailer."""

    def __init__(self, timezone: str = "UTC"):
        self.timezone = ZoneInfo(timezone)
        self.workers: dict[str, SimWorker] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.queue_lengths: dict[str, int] = {}
        self.records: list[TaskRecord] = []
        self.changes: list[tuple[str, str, Any]] = []

    # -- building ------------------------------------------------------------

    def add_worker(self, name: str, subprocesses: int = 2, *,
                   prefetch_multiplier: int = 4, prefetch: int | None = None,
                   queues: list[str] | None = None) -> SimWorker:
        worker = SimWorker(name, subprocesses, prefetch_multiplier, prefetch,
                           list(queues) if queues is not None else ["celery"])
        self.workers[name] = worker
        return worker

    def add_task(self, name: str, **settings) -> dict[str, Any]:
        unknown = set(settings) - set(TASK_DEFAULTS)
        if unknown:
            raise ConfigurationError(f"task {name}: unknown settings"
                                     f" {', '.join(sorted(unknown))}")
        self.tasks[name] = {**TASK_DEFAULTS, **settings}
        return self.tasks[name]

    def set_queue_length(self, queue: str, length: int) -> None:
        self.queue_lengths[queue] = length

    def record(self, name: str, state: str = "SUCCESS", *,
               worker: str | None = None, sent=None, received=None,
               started=None, finished=None, runtime: float | None = None,
               task_id: str | None = None) -> TaskRecord:
        """Add one recorded task; times are datetimes, ISO text or seconds."""
        times = [self._timestamp(t) for t in (sent, received, started,
                                               finished)]
        if runtime is None and times[2] is not None and times[3] is not None:
            runtime = times[3] - times[2]
        record = TaskRecord(task_id or f"sim-{len(self.records) + 1}", name,
                            worker, state, *times, runtime=runtime)
        self.records.append(record)
        return record

    def _timestamp(self, value) -> float | None:
        if value is None or isinstance(value, (int, float)):
            return value
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        if value.tzinfo is None:
            value = value.replace(tzinfo=self.timezone)
        return value.timestamp()

    @classmethod
    def from_dict(cls, data: dict) -> "SimulatedCluster":
        """Build from a fixture: workers, tasks, queues, records, timezone."""
        known = {"workers", "tasks", "queues", "records", "timezone"}
        if not isinstance(data, dict) or set(data) - known:
            raise ConfigurationError("a cluster fixture is an object with"
                                     f" keys among {', '.join(sorted(known))}")
        _check_fixture(data)
        cluster = cls(data.get("timezone", "UTC"))
        try:
            for name, spec in data.get("workers", {}).items():
                cluster.add_worker(name, **spec)
            for name, spec in data.get("tasks", {}).items():
                cluster.add_task(name, **spec)
            for name, length in data.get("queues", {}).items():
                cluster.set_queue_length(name, length)
            for spec in data.get("records", []):
                cluster.record(**spec)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigurationError(f"bad cluster fixture: {exc}") from exc
        return cluster

    @classmethod
    def from_file(cls, path: str | Path) -> "SimulatedCluster":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read cluster fixture {path}:"
                                     f" {exc}") from exc
        return cls.from_dict(data)

    def snapshot(self) -> dict:
        """Workers and task settings as plain data, to compare or print."""
        return {
            "workers": {n: {"subprocesses": w.subprocesses,
                            "prefetch": w.prefetch, "queues": list(w.queues)}
                        for n, w in sorted(self.workers.items())},
            "tasks": copy.deepcopy(dict(sorted(self.tasks.items()))),
        }

    # -- the Cluster protocol -------------------------------------------------

    def worker_names(self) -> list[str]:
        return sorted(self.workers)

    def live_workers(self, *, fresh: bool = False) -> list[str]:
        return sorted(self.workers)

    def task_names(self) -> list[str]:
        return sorted(self.tasks)

    def _worker(self, name: str) -> SimWorker:
        try:
            return self.workers[name]
        except KeyError:
            raise UnknownName(f"unknown worker {name!r}; known:"
                              f" {', '.join(sorted(self.workers)) or 'none'}"
                              ) from None

    def _selected(self, names: list[str] | None) -> list[SimWorker]:
        if names is None:
            return [self.workers[n] for n in sorted(self.workers)]
        return [self._worker(n) for n in names]

    def _task(self, name: str) -> dict[str, Any]:
        try:
            return self.tasks[name]
        except KeyError:
            raise UnknownName(f"unknown task {name!r}") from None

    def get_task_setting(self, task: str, setting: str) -> Any:
        return self._task(task)[setting]

    def set_task_setting(self, tasks: list[str] | None, setting: str,
                         value: Any) -> dict[str, Any]:
        names = sorted(self.tasks) if tasks is None else tasks
        selected = [self._task(n) for n in names]
        if setting not in TASK_SETTINGS:
            raise OperationRefused(f"unknown task setting {setting!r}")
        for name, settings in zip(names, selected):
            settings[setting] = value
            self.changes.append((f"task {name}", setting, value))
        return {w: value for w in sorted(self.workers)}

    def get_worker(self, worker: str, what: str) -> Any:
        found = self._worker(worker)
        return list(found.queues) if what == "queues" else getattr(found, what)

    def change_worker(self, workers: list[str] | None, what: str,
                      by: int) -> dict[str, int]:
        applied: dict[str, int] = {}
        refused = []
        for worker in self._selected(workers):
            if what == "subprocesses":
                if worker.subprocesses + by < 1:
                    refused.append(f"{worker.name}: the pool has"
                                   f" {worker.subprocesses} process(es) and"
                                   " cannot go below 1")
                    continue
                worker.subprocesses += by
                if worker.prefetch:
                    worker.prefetch = max(
                        1, worker.prefetch + by * worker.prefetch_multiplier)
            elif worker.prefetch:
                worker.prefetch = max(1, worker.prefetch + by)
            applied[worker.name] = getattr(worker, what)
            self.changes.append((f"worker {worker.name}", what,
                                 applied[worker.name]))
        if refused:
            done = ", ".join(applied) or "none"
            raise OperationRefused(f"{'; '.join(refused)} (applied on:"
                                   f" {done})")
        return applied

    def change_queues(self, workers: list[str] | None, action: str,
                      queue: str) -> dict[str, list[str]]:
        result = {}
        for worker in self._selected(workers):
            if action == "add" and queue not in worker.queues:
                worker.queues.append(queue)
            elif action == "remove" and queue in worker.queues:
                worker.queues.remove(queue)
            result[worker.name] = list(worker.queues)
            self.changes.append((f"worker {worker.name}", "queues",
                                 list(worker.queues)))
        return result

    def queue_length(self, queue: str) -> int:
        return self.queue_lengths.get(queue, 0)

    # -- StatsSource -----------------------------------------------------------

    def query(self, fn, start, end, workers, tasknames, states):
        return query_records(self.records, fn, start, end, workers, tasknames,
                             states)

    def recorded_names(self, kind: str) -> list[str]:
        """Task names ("tasks") or workers ("workers") seen in records."""
        field = "name" if kind == "tasks" else "worker"
        return sorted({getattr(r, field) for r in self.records
                       if getattr(r, field)})
