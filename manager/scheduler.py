"""The manager's loop: run due policies, at most N at once, fairly.

Each turn of the loop:

1. refreshes the registry (directory and store changes);
2. skips running anything while no worker answers (said once, not every
   turn);
3. starts due policies in free slots, taking tenants in turn and keeping
   each under its ``runs_in_parallel``, so one tenant's runaway policies
   cannot starve another's;
4. records each finished run (history, last run time) and schedules the
   policy's next run;
5. sleeps until the next due time, a finished run, or the next look for
   changes, whichever comes first.

A failing or hanging policy affects only its own run: the sandbox ends it
at its wall-clock limit and the loop goes on. Stopping lets running
children finish within a bound, then kills them, and restores the task
settings policies changed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from manager.errors import ManagerError, StoreError
from manager.mailer import Mailer
from manager.operations import Cluster, StatsSource
from manager.registry import Entry, Registry
from manager.runner import PolicyRunner, RunReport, outcome_word
from manager.store import Run, Store
from manager.tenants import Tenants

logger = logging.getLogger(__name__)

UTC = dt.timezone.utc
CHANGE_POLL_S = 2.0
STOP_GRACE_S = 5.0


def utc_now() -> dt.datetime:
    return dt.datetime.now(UTC)


class Scheduler:
    """Runs the registry's due policies through the sandbox."""

    def __init__(self, runner: PolicyRunner, registry: Registry, *,
                 cluster: Cluster, stats: StatsSource, mailer: Mailer | None,
                 store: Store, tenants: Tenants, slots: int = 2,
                 clock: Callable[[], dt.datetime] = utc_now,
                 require_workers: bool = True):
        self.runner = runner
        self.registry = registry
        self.cluster = cluster
        self.stats = stats
        self.mailer = mailer
        self.store = store
        self.tenants = tenants
        self.slots = slots
        self.clock = clock
        self.require_workers = require_workers
        self._pool = ThreadPoolExecutor(max_workers=slots,
                                        thread_name_prefix="policy-run")
        self._running: dict[Future, Entry] = {}
        self._per_tenant: dict[str, int] = defaultdict(int)
        self._turn: deque[str] = deque()
        self._queues: dict[str, deque[Entry]] = defaultdict(deque)
        self._queued: set[str] = set()
        self._refresh_at = float("-inf")
        self._scan_at: dt.datetime | None = None
        self._stop = threading.Event()
        self._workers_known: bool | None = None
        self.reports: list[RunReport] = []
        self.keep_reports = False

    # -- the loop ----------------------------------------------------------------

    def run_forever(self) -> None:
        logger.info("manager loop started: %d slot(s)", self.slots)
        while not self._stop.is_set():
            try:
                timeout = self.step()
            except (ManagerError, OSError) as exc:
                logger.error("manager loop: %s; trying again shortly", exc)
                timeout = CHANGE_POLL_S
            except Exception:  # a bug: log it with its cause, keep serving
                logger.exception("manager loop: unexpected error")
                timeout = CHANGE_POLL_S
            self._wait(timeout)
        self._drain()

    def stop(self) -> None:
        self._stop.set()

    def step(self) -> float:
        """One turn; returns how long to wait before the next."""
        self._collect()
        now = self.clock()
        tick = time.monotonic()
        changed = False
        if tick >= self._refresh_at:
            changed = self.registry.refresh(now)
            self._refresh_at = tick + CHANGE_POLL_S
        if changed or self._scan_at is None or now >= self._scan_at:
            self._queue_due(now)
        if any(self._queues.values()) and self._workers_ready():
            self._dispatch(now)
        return self._sleep_for(self.clock())

    def _queue_due(self, now: dt.datetime) -> None:
        """Queue what is due, per tenant; note when to look again."""
        busy = {entry.name for entry in self._running.values()}
        busy |= self._queued
        for entry in self.registry.due(now, busy):
            self._queues[entry.tenant].append(entry)
            self._queued.add(entry.name)
            if entry.tenant not in self._turn:
                self._turn.append(entry.tenant)
        nxt = self.registry.next_due(busy | self._queued)
        # Nothing else scheduled: look again after a while, not every turn.
        self._scan_at = nxt or now + dt.timedelta(seconds=CHANGE_POLL_S)

    def _look_again_at(self, when: dt.datetime | None) -> None:
        """Scan for due policies no later than ``when``: the next scan was
        set from the policies that were neither queued nor running."""
        if when is not None and (self._scan_at is None
                                 or when < self._scan_at):
            self._scan_at = when

    def run_due_once(self) -> list[RunReport]:
        """Run everything due now and wait for it (tests, benchmarks)."""
        self.keep_reports = True
        self._refresh_at = float("-inf")
        self.step()
        while self._running:
            wait(list(self._running), return_when=FIRST_COMPLETED)
            self._collect()
            self.step()
        reports, self.reports = self.reports, []
        return reports

    def _wait(self, timeout: float) -> None:
        if self._running:
            wait(list(self._running), timeout=timeout,
                 return_when=FIRST_COMPLETED)
        else:
            self._stop.wait(timeout)

    def _sleep_for(self, now: dt.datetime) -> float:
        # Policies may change in the store (cmpolicy add, enable) or in the
        # directory at any time, so never sleep longer than CHANGE_POLL_S.
        # Queued policies are due already and wait for a slot: a finished
        # run wakes the loop for them.
        nxt = self._scan_at
        if nxt is None:
            return CHANGE_POLL_S
        return max(0.0, min(CHANGE_POLL_S, (nxt - now).total_seconds()))

    # -- workers ----------------------------------------------------------------

    def _workers_ready(self) -> bool:
        if not self.require_workers:
            return True
        try:
            live = self.cluster.live_workers()
        except ManagerError as exc:
            live = []
            reason = str(exc)
        else:
            reason = "no worker answers"
        if live and self._workers_known is not True:
            if self._workers_known is False:
                logger.info("workers answer again (%s); policies run",
                            ", ".join(live))
            self._workers_known = True
        elif not live and self._workers_known is not False:
            logger.warning("%s; policies wait until a worker answers", reason)
            self._workers_known = False
        return bool(live)

    # -- dispatch ---------------------------------------------------------------

    def _dispatch(self, now: dt.datetime) -> None:
        """Fill free slots from the queues, taking tenants in turn."""
        idle_rounds = 0
        while len(self._running) < self.slots and idle_rounds < len(
                self._turn):
            tenant = self._turn[0]
            self._turn.rotate(-1)
            queue = self._queues[tenant]
            limit = self._tenant(tenant).runs_in_parallel
            if queue and self._per_tenant[tenant] < limit:
                entry = queue.popleft()
                self._queued.discard(entry.name)
                current = self.registry.entries.get(entry.name)
                if current is entry and entry.enabled and entry.loaded:
                    self._start(entry, now)
                idle_rounds = 0
            else:
                idle_rounds += 1

    def _tenant(self, name: str):
        try:
            return self.tenants.get(name)
        except ManagerError:
            return self.tenants.default

    def _start(self, entry: Entry, now: dt.datetime) -> None:
        tenant = self._tenant(entry.tenant)
        # The next run counts from this one, so a late start does not
        # bring the one after forward.
        entry.last_run_at = now
        entry.schedule_next(now)
        self._look_again_at(entry.next_due)
        self._per_tenant[entry.tenant] += 1
        future = self._pool.submit(
            self.runner.run, entry.loaded, cluster=self.cluster,
            stats=self.stats, mailer=self.mailer, tenant=tenant, now=now,
            fixed_clock=False)
        self._running[future] = entry

    def _collect(self) -> None:
        finished = []
        for future in [f for f in self._running if f.done()]:
            entry = self._running.pop(future)
            self._per_tenant[entry.tenant] -= 1
            # A scan while it ran passed it over as busy.
            self._look_again_at(entry.next_due)
            try:
                finished.append(future.result())
            except Exception:  # the runner itself failed: a bug
                logger.exception("policy %s: the run could not be made",
                                 entry.name)
        if not finished:
            return
        # One transaction for everything that finished in this turn.
        try:
            self.store.record_runs([run_record(r) for r in finished])
        except StoreError as exc:
            logger.error("%d run(s) could not be recorded (%s): %s",
                         len(finished),
                         ", ".join(r.run_id for r in finished), exc)
        if self.keep_reports:
            self.reports.extend(finished)

    def _drain(self) -> None:
        """Let running children finish within a bound, then record them."""
        if self._running:
            logger.info("waiting up to %.0f s for %d running policies",
                        STOP_GRACE_S, len(self._running))
            wait(list(self._running), timeout=STOP_GRACE_S)
        self._collect()
        for entry in self._running.values():
            logger.warning("policy %s: still running at stop; its child is"
                           " killed", entry.name)
        self._pool.shutdown(wait=False, cancel_futures=True)


MAX_RECORDED_VALUE_CHARS = 2000


def _bounded(value):
    """A value as recorded: itself, or its start when it is too large."""
    text = json.dumps(value, default=str)
    if len(text) <= MAX_RECORDED_VALUE_CHARS:
        return value
    return {"truncated": text[:MAX_RECORDED_VALUE_CHARS],
            "chars": len(text)}


def bounded_call(call) -> dict:
    """One call for the history, each part bounded in size."""
    return {"op": call.op, "args": _bounded(call.args), "ok": call.ok,
            "value": _bounded(call.value),
            "error": None if call.error is None
            else call.error[:MAX_RECORDED_VALUE_CHARS]}


def run_record(report: RunReport) -> Run:
    """A run as the history keeps it."""
    out = report.outcome
    error = out.error
    return Run(
        run_id=report.run_id, policy=report.policy, tenant=report.tenant,
        started=report.started.timestamp(), duration_s=out.duration_s,
        applied=out.applied, outcome=outcome_word(out),
        condition=out.condition,
        error_section=getattr(error, "section", None),
        error_line=getattr(error, "line", None),
        error_message=None if error is None else report.describe_error(),
        output="".join(out.output),
        calls=[bounded_call(c) for c in out.calls])


def record_report(store: Store, report: RunReport) -> None:
    """Write a run to the history and note it on its policy."""
    try:
        store.record_run(run_record(report))
    except StoreError as exc:
        logger.error("policy %s: run %s could not be recorded: %s",
                     report.policy, report.run_id, exc)
