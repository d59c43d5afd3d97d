"""The whitelisted calls a policy child may make, and their validation.

A child may be hostile, so nothing it sends is trusted: every call is
checked here against the vocabulary (``OPS``), each argument's type and
bounds, before the cluster, the stats store or the mailer sees it. The
checks are the same whether the cluster is real or simulated, so a policy
behaves the same under ``cmpolicy try``, the pytest plugin and production.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from sandboxhost.errors import OperationError
from sandboxhost.namespace import (
    MAX_NAME_CHARS,
    MAX_NAMES,
    OPS,
    RATE_LIMIT_RE,
    STATES,
    STATS_FUNCTIONS,
    TASK_SETTINGS,
)

from manager.errors import (
    ManagerError,
    OperationRefused,
    PermissionDenied,
    UnknownName,
)
from manager.mailer import Mailer, check_email
from manager.tenants import Tenant, unrestricted

logger = logging.getLogger(__name__)

WORKER_COUNTERS = ("prefetch", "subprocesses")
WORKER_READINGS = WORKER_COUNTERS + ("queues",)
QUEUE_ACTIONS = ("add", "remove")
MAX_STEP = 64
# Routing keys and exchange names: a queue name, or a topic pattern.
ROUTE_RE = re.compile(r"\A[A-Za-z0-9_.:#*-]{1,255}\Z")
# The strictest transport's rule (kombu's filesystem transport names a file
# after the queue), so a name accepted here works on every broker.
QUEUE_NAME_RE = re.compile(r"\A(?!\.+\Z)[A-Za-z0-9_.-]{1,200}\Z")


class Cluster(Protocol):
    """What the operations need from a cluster, real or simulated.

    ``workers`` and ``tasks`` arguments are lists of names, or None for
    all. Changes return ``{worker: new value}`` for every worker that
    applied them; a worker that did not is an error naming it.
    """

    def worker_names(self) -> list[str]: ...

    def live_workers(self, *, fresh: bool = False) -> list[str]: ...

    def task_names(self) -> list[str]: ...

    def get_task_setting(self, task: str, setting: str) -> Any: ...

    def set_task_setting(self, tasks: list[str] | None, setting: str,
                         value: Any) -> dict[str, Any]: ...

    def get_worker(self, worker: str, what: str) -> Any: ...

    def change_worker(self, workers: list[str] | None, what: str,
                      by: int) -> dict[str, int]: ...

    def change_queues(self, workers: list[str] | None, action: str,
                      queue: str) -> dict[str, list[str]]: ...

    def queue_length(self, queue: str) -> int: ...


class StatsSource(Protocol):
    """Counts and means over recorded tasks (see ``manager.stats``)."""

    def query(self, fn: str, start: float | None, end: float | None,
              workers: list[str] | None, tasknames: list[str] | None,
              states: list[str] | None) -> float | int | None: ...


@dataclass
class Operations:
    """Serves a child's calls: validate, then perform. One per run."""

    cluster: Cluster
    stats: StatsSource
    mailer: Mailer | None = None
    timezone: dt.tzinfo = field(default_factory=lambda: ZoneInfo("UTC"))
    policy: str = ""
    tenant: Tenant = field(default_factory=unrestricted)
    emails_sent: int = 0

    def __call__(self, op: str, args: dict) -> Any:
        """The host's call handler: returns a value or raises OperationError."""
        try:
            return self.perform(op, args)
        except ManagerError as exc:
            raise OperationError(str(exc), type_name=type(exc).__name__) \
                from exc

    def perform(self, op: str, args: dict) -> Any:
        if not isinstance(op, str) or op not in OPS:
            raise OperationRefused(f"unknown operation {op!r:.60}")
        if not isinstance(args, dict) or set(args) != set(OPS[op]):
            raise OperationRefused(f"{op}: arguments must be exactly"
                                   f" {', '.join(OPS[op]) or 'none'}")
        handler = getattr(self, "_" + op.replace(".", "_"))
        return handler(**args)

    # -- the tenant's scope -------------------------------------------------

    def _allow(self, kind: str, names: list[str]) -> list[str]:
        """Refuse any name outside the tenant's scope of ``kind``."""
        scope = self.tenant.scope(kind)
        for name in names:
            if not scope.allows(name):
                raise PermissionDenied(f"{_SINGULAR[kind]} {name!r} is outside"
                                       f" tenant {self.tenant.name!r}")
        return names

    def _scoped(self, kind: str, names: list[str] | None) -> list[str] | None:
        """Names checked against the scope; None ("all") narrowed to it."""
        if names is not None:
            return self._allow(kind, names)
        scope = self.tenant.scope(kind)
        if scope.everything:
            return None
        known = (self.cluster.worker_names() if kind == "workers"
                 else self.cluster.task_names())
        mine = scope.keep(known)
        if not mine:
            raise PermissionDenied(f"tenant {self.tenant.name!r} has no"
                                   f" {kind} that answer now")
        return mine

    def _cluster(self, method, *args):
        """Call the cluster; an unknown name lists only the tenant's names."""
        try:
            return method(*args)
        except UnknownName as exc:
            text = str(exc)
            if "; known: " not in text or self.tenant.workers.everything:
                raise
            mine = self.tenant.workers.keep(self.cluster.worker_names())
            raise UnknownName(f"{text.split('; known: ')[0]}; known:"
                              f" {', '.join(mine) or 'none'}") from None

    def _own_workers(self, result):
        """Keep other tenants' worker names out of what a call returns."""
        if not isinstance(result, dict) or self.tenant.workers.everything:
            return result
        return {k: v for k, v in result.items()
                if self.tenant.workers.allows(k)}

    # -- tasks --------------------------------------------------------------

    def _tasks_get(self, task, setting):
        task = self._allow("tasks", [_name("task", task)])[0]
        setting = _setting(setting)
        return self.cluster.get_task_setting(task, setting)

    def _tasks_set(self, tasks, setting, value):
        tasks = _names("tasks", tasks)
        setting = _setting(setting)
        value = check_task_value(setting, value)
        if setting in ("routing_key", "exchange") and value is not None:
            # Where the workers' own messages go: within the tenant's queues.
            self._allow("queues", [value])
        result = self._cluster(self.cluster.set_task_setting,
                               self._scoped("tasks", tasks), setting, value)
        return self._own_workers(result)

    # -- workers ------------------------------------------------------------

    def _workers_names(self):
        return sorted(self.tenant.workers.keep(self.cluster.worker_names()))

    def _workers_get(self, worker, what):
        worker = self._allow("workers", [_name("worker", worker)])[0]
        _choice("what", what, WORKER_READINGS)
        return self._cluster(self.cluster.get_worker, worker, what)

    def _workers_change(self, workers, what, by):
        workers = _names("workers", workers)
        _choice("what", what, WORKER_COUNTERS)
        if not isinstance(by, int) or isinstance(by, bool) or by == 0 \
                or abs(by) > MAX_STEP:
            raise OperationRefused(f"the step must be a whole number from 1"
                                   f" to {MAX_STEP}, not {by!r:.40}")
        return self._cluster(self.cluster.change_worker,
                             self._scoped("workers", workers), what, by)

    def _workers_queues(self, workers, action, queue):
        workers = _names("workers", workers)
        _choice("action", action, QUEUE_ACTIONS)
        queue = self._allow("queues", [_queue(queue)])[0]
        return self._cluster(self.cluster.change_queues,
                             self._scoped("workers", workers), action, queue)

    def _queues_length(self, queue):
        queue = self._allow("queues", [_queue(queue)])[0]
        return self.cluster.queue_length(queue)

    # -- stats and mail -------------------------------------------------------

    def _stats(self, fn, start, end, workers, tasknames, states):
        _choice("stats function", fn, STATS_FUNCTIONS)
        if states is not None and fn != "tasks":
            raise OperationRefused(f"stats.{fn} takes no states")
        states = _names("states", states)
        for state in states or ():
            _choice("state", state, STATES)
        start_ts = to_timestamp(start, self.timezone)
        end_ts = to_timestamp(end, self.timezone)
        if start_ts is not None and end_ts is not None and start_ts > end_ts:
            start_ts, end_ts = end_ts, start_ts
        return self.stats.query(fn, start_ts, end_ts,
                                self._scoped_stats("workers", workers),
                                self._scoped_stats("tasks", tasknames),
                                states)

    def _scoped_stats(self, kind: str, names) -> list[str] | None:
        """Stats count only the tenant's tasks: narrow "all" to its names."""
        names = _names(kind, names)
        if names is not None:
            return self._allow(kind, names)
        scope = self.tenant.scope(kind)
        if scope.everything:
            return None
        known = set(self.cluster.worker_names() if kind == "workers"
                    else self.cluster.task_names())
        recorded = getattr(self.stats, "recorded_names", None)
        if recorded is not None:
            known.update(recorded(kind))
        return scope.keep(sorted(known))

    def _send_email(self, subject, message, from_email, recipient_list,
                    auth_user, auth_password):
        if self.mailer is None:
            raise OperationRefused("send_email: no mail server is configured")
        email = check_email(subject, message, from_email, recipient_list,
                            auth_user, auth_password)
        # The sender is an address the tenant writes as: same scope.
        self._allow("recipients", [email.from_email,
                                   *email.recipient_list])
        limit = self.tenant.emails_per_run
        if self.emails_sent >= limit:
            raise OperationRefused(f"send_email: this run has sent {limit}"
                                   " emails, the most one run may send;"
                                   " nothing was sent")
        self.emails_sent += 1
        return self.mailer.send(email, policy=self.policy,
                                tenant=self.tenant.name,
                                tenant_per_hour=self.tenant.emails_per_hour)


# -- argument checks -----------------------------------------------------------

_SINGULAR = {"workers": "worker", "tasks": "task", "queues": "queue",
             "recipients": "recipient"}


def _name(what: str, value) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        raise OperationRefused(f"{what} must be a name of 1 to"
                               f" {MAX_NAME_CHARS} characters, not"
                               f" {value!r:.60}")
    return value


def _names(what: str, value) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_NAMES:
        raise OperationRefused(f"{what} must be a list of at most"
                               f" {MAX_NAMES} names")
    return [_name(what, item) for item in value]


def _choice(what: str, value, choices) -> str:
    if value not in choices or not isinstance(value, str):
        raise OperationRefused(f"unknown {what} {value!r:.60}; known:"
                               f" {', '.join(choices)}")
    return value


def _setting(value) -> str:
    return _choice("task setting", value, tuple(TASK_SETTINGS))


def _queue(value) -> str:
    if not isinstance(value, str) or not QUEUE_NAME_RE.match(value):
        raise OperationRefused(f"{value!r:.60} is not a valid queue name")
    return value


def check_task_value(setting: str, value):
    """Check a task setting's value against its type; return it."""
    kinds = TASK_SETTINGS[setting]
    if isinstance(value, bool):
        ok = bool in kinds
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join("None" if k is type(None) else k.__name__
                            for k in kinds)
        raise OperationRefused(f"{setting} must be {names}, not"
                               f" {type(value).__name__} ({value!r:.60})")
    if setting in ("routing_key", "exchange") and value is not None \
            and not ROUTE_RE.match(value):
        raise OperationRefused(f"{setting} {value!r:.60} is not a valid name"
                               " (letters, digits and _ . : # * -, at most"
                               " 255)")
    if setting == "rate_limit" and value is not None \
            and not RATE_LIMIT_RE.match(value):
        raise OperationRefused(f"rate_limit {value!r:.60} is not in Celery's"
                               ' form, such as "10/s", "100/m" or "5/h"')
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and (not math.isfinite(value) or value < 0):
        raise OperationRefused(f"{setting} must be a positive number")
    return value


def to_timestamp(value, timezone: dt.tzinfo) -> float | None:
    """An ISO datetime from a child as a POSIX timestamp.

    Naive datetimes are the manager's local time (its Celery app's
    timezone), resolved with the zone's rules on that date.
    """
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise OperationRefused(f"interval bound {value!r:.60} is not a"
                               " datetime")
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise OperationRefused(f"interval bound {value!r:.60} is not a"
                               " datetime") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone)
    return moment.timestamp()
