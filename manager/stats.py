"""The stats API's meaning, once: which tasks each function counts.

The store answers these with SQL and the simulated cluster with
``query_records``; both follow the definitions here, and the tests run the
same scenarios on both.

- A task is matched on the time it was sent (received when no
  ``task-sent`` event was seen), inclusive at both ends of the interval.
- ``tasks_ready`` counts finished tasks (succeeded, failed or revoked),
  ``tasks_unready`` the others, ``tasks_sent`` all of them.
- ``mean_waittime`` (started minus sent) and ``mean_runtime`` average over
  the matched tasks that have the value; None when none has.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")

STATE_OF = {
    "tasks_failed": ("FAILURE",),
    "tasks_succeeded": ("SUCCESS",),
    "tasks_revoked": ("REVOKED",),
    "tasks_ready": READY_STATES,
}

MEANS = {"mean_waittime": "waittime", "mean_runtime": "runtime"}


@dataclass
class TaskRecord:
    """One task as recorded from its events; times are POSIX seconds."""

    task_id: str
    name: str | None = None
    worker: str | None = None
    state: str = "PENDING"
    sent: float | None = None
    received: float | None = None
    started: float | None = None
    finished: float | None = None
    runtime: float | None = None

    @property
    def matched_at(self) -> float | None:
        return self.sent if self.sent is not None else self.received

    @property
    def waittime(self) -> float | None:
        if self.started is None:
            return None
        origin = self.matched_at
        return None if origin is None else max(0.0, self.started - origin)


def query_records(records: Iterable[TaskRecord], fn: str,
                  start: float | None, end: float | None,
                  workers: list[str] | None, tasknames: list[str] | None,
                  states: list[str] | None) -> int | float | None:
    """Answer one stats function over in-memory records."""
    chosen = []
    for record in records:
        at = record.matched_at
        if at is None:
            continue
        if (start is not None and at < start) or (end is not None and at > end):
            continue
        if workers is not None and record.worker not in workers:
            continue
        if tasknames is not None and record.name not in tasknames:
            continue
        chosen.append(record)
    if fn in MEANS:
        values = [getattr(r, MEANS[fn]) for r in chosen]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None
    if fn == "tasks":
        wanted = states
    elif fn == "tasks_unready":
        return sum(1 for r in chosen if r.state not in READY_STATES)
    else:
        wanted = STATE_OF.get(fn)
    if wanted is None:
        return len(chosen)
    return sum(1 for r in chosen if r.state in wanted)
