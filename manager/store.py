"""The store: recorded tasks, policies and run history in one database.

SQLAlchemy Core over SQLite by default (one file in the state directory,
WAL mode so readers never wait for the recorder) or PostgreSQL, with the
same statements: upserts use each dialect's ``INSERT .. ON CONFLICT`` with
portable ``CASE`` expressions, nothing else is dialect-specific.

``Store.query`` is the stats API's ``StatsSource``; it gives the answers
that ``manager.stats.query_records`` gives over the same records.

This module is the one boundary for SQLAlchemy: every database error
leaves it as ``StoreError``, with the original chained.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from manager.errors import StoreError
from manager.stats import MEANS, READY_STATES, STATE_OF, TaskRecord
from manager.store_schema import (
    MIGRATIONS,
    current_version,
    migrate,
    policies,
    runs,
    tasks,
)

logger = logging.getLogger(__name__)

DB_FILE_NAME = "manager.db"
# How long a SQLite writer waits for another one before giving up; the
# recorder's batches and the retention chunks take milliseconds.
DEFAULT_BUSY_TIMEOUT_S = 10.0
DEFAULT_PRUNE_CHUNK_ROWS = 2000
DEFAULT_RUNS_LIMIT = 20
STATS_COUNTS = ("tasks", "tasks_failed", "tasks_succeeded", "tasks_revoked",
                "tasks_ready", "tasks_unready", "tasks_sent")
# Execution option: open the transaction as a writer at once (SQLite).
_WRITE_OPTION = "cm_write"


@dataclass
class TaskUpdate:
    """What a batch of events says about one task, ready to be merged.

    ``state_at`` is the timestamp of the latest event, ``state_rank`` its
    lifecycle rank (to order events with equal timestamps); ``worker_at``
    is the timestamp of the latest event that named a worker.
    """

    task_id: str
    state: str
    state_at: float
    state_rank: int
    name: str | None = None
    worker: str | None = None
    worker_at: float | None = None
    sent: float | None = None
    received: float | None = None
    started: float | None = None
    finished: float | None = None
    runtime: float | None = None

    def row(self) -> dict[str, Any]:
        """The row this update makes when the task is new."""
        values = dict(self.__dict__)
        at = self.sent if self.sent is not None else self.received
        values["at"] = at
        values["waittime"] = waittime(self.started, at)
        return values


def waittime(started: float | None, at: float | None) -> float | None:
    """Started minus sent (or received), never negative across clocks."""
    if started is None or at is None:
        return None
    return max(0.0, started - at)


@dataclass
class Policy:
    """A stored policy and the outcome of its last run."""

    name: str
    source: str
    tenant: str = "default"
    enabled: bool = True
    created: float = 0.0
    modified: float = 0.0
    last_run_at: float | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    schedule: Any = None


@dataclass
class Run:
    """One run of a policy, as the run history keeps it."""

    run_id: str
    policy: str
    tenant: str
    started: float
    duration_s: float
    applied: bool
    outcome: str
    condition: bool | None = None
    error_section: str | None = None
    error_line: int | None = None
    error_message: str | None = None
    output: str = ""
    calls: list = field(default_factory=list)
    id: int | None = None


def default_url(state_dir: str | Path | None = None) -> str:
    """The SQLite file in the state directory (created if missing)."""
    if state_dir is None:
        from manager.config import default_state_dir
        state_dir = default_state_dir()
    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / DB_FILE_NAME}"


class Store:
    """A handle on the database: open it once, share it between threads.

    ``url`` is any SQLAlchemy URL (``sqlite:///path``,
    ``postgresql+psycopg://...``); None means ``manager.db`` in
    ``state_dir`` (default: ``manager.config.default_state_dir()``).
    Missing schema versions are applied when the store opens.
    """

    def __init__(self, url: str | None = None, *,
                 state_dir: str | Path | None = None,
                 busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
                 migrate_schema: bool = True) -> None:
        self.url = url or default_url(state_dir)
        self._busy_timeout_s = busy_timeout_s
        with self._boundary("open the database"):
            self.dialect = sa.make_url(self.url).get_backend_name()
            self._insert = _dialect_insert(self.dialect)
            try:
                self._engine = self._create_engine(self.url)
            except ImportError as exc:
                raise StoreError(f"the database driver for {self.safe_url}"
                                 f" is not installed ({exc.name}); for"
                                 " PostgreSQL, install psycopg") from exc
            self._task_upsert = _task_upsert(self._insert)
        self._prune_lock = threading.Lock()
        if migrate_schema:
            self.migrate()

    # -- lifecycle -------------------------------------------------------------

    def _create_engine(self, url: str) -> Engine:
        parsed = sa.make_url(url)
        if self.dialect != "sqlite":
            return sa.create_engine(url, pool_pre_ping=True)
        memory = parsed.database in (None, "", ":memory:")
        options: dict[str, Any] = {}
        if memory:
            # One shared connection, or every thread sees its own empty
            # database; fine for tests, not for concurrent writers.
            options = {"poolclass": StaticPool,
                       "connect_args": {"check_same_thread": False}}
        engine = sa.create_engine(url, **options)
        busy_ms = int(self._busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:
            # Transactions are begun below, not by the sqlite3 module, so
            # that writers can take the write lock when they begin.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            if not memory:
                cursor.execute("PRAGMA journal_mode = WAL")
                # Durable against a crash of the process, which is what
                # the recorder promises; a power cut may lose the last
                # commits, not the file.
                cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # A deferred transaction that turns into a writer cannot wait
            # on busy_timeout when another writer got in first; IMMEDIATE
            # takes the lock up front, so the timeout applies.
            if conn.get_execution_options().get(_WRITE_OPTION):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.exec_driver_sql("BEGIN")

        return engine

    def migrate(self) -> list[int]:
        """Apply missing schema versions; return those applied."""
        known = MIGRATIONS[-1].version
        with self._boundary("read the schema version"):
            with self._engine.connect() as conn:
                inspector = sa.inspect(conn)
                found = (current_version(conn)
                         if inspector.has_table("schema_version") else 0)
        if found > known:
            raise StoreError(f"the database {self.safe_url} has schema"
                             f" version {found}, newer than this manager"
                             f" knows ({known}); upgrade the manager")
        with self._boundary("migrate the schema"):
            return migrate(self._write_transaction)

    def schema_version(self) -> int:
        with self._read() as conn:
            return current_version(conn)

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def safe_url(self) -> str:
        """The URL with its password hidden, for messages."""
        try:
            return sa.make_url(self.url).render_as_string(
                hide_password=True)
        except sa.exc.ArgumentError:
            return "a malformed database URL"

    # -- the SQLAlchemy boundary ---------------------------------------------

    @contextmanager
    def _boundary(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sa.exc.SQLAlchemyError as exc:
            detail = getattr(exc, "orig", None) or exc
            raise StoreError(f"cannot {doing} ({self.safe_url}):"
                             f" {detail}") from exc

    @contextmanager
    def _write_transaction(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                yield conn

    @contextmanager
    def _write(self, doing: str) -> Iterator[Connection]:
        with self._boundary(doing), self._write_transaction() as conn:
            yield conn

    @contextmanager
    def _read(self, doing: str = "read") -> Iterator[Connection]:
        with self._boundary(doing), self._engine.connect() as conn:
            yield conn

    # -- tasks -----------------------------------------------------------------

    def upsert_tasks(self, updates: Sequence[TaskUpdate]) -> int:
        """Merge each update into its task's row in one transaction.

        The merge is the recorder's (``manager.events.merge``) done in SQL,
        so a task's events may arrive in any order, twice, or split over
        several batches. Returns the number of updates written.
        """
        if not updates:
            return 0
        with self._write("record tasks") as conn:
            for round_ in _distinct_rounds(updates):
                conn.execute(self._task_upsert,
                             [update.row() for update in round_])
        return len(updates)

    def query(self, fn: str, start: float | None, end: float | None,
              workers: list[str] | None, tasknames: list[str] | None,
              states: list[str] | None) -> float | int | None:
        """One stats function (see ``manager.stats``) over the tasks table."""
        statement = stats_statement(fn, start, end, workers, tasknames,
                                    states)
        with self._read(f"answer stats.{fn}") as conn:
            value = conn.execute(statement).scalar()
        if fn in MEANS:
            return None if value is None else float(value)
        return int(value or 0)

    def task(self, task_id: str) -> TaskRecord | None:
        """The recorded row of one task."""
        with self._read("read a task") as conn:
            row = conn.execute(sa.select(tasks).where(
                tasks.c.task_id == task_id)).mappings().first()
        return None if row is None else _record(row)

    def records(self) -> list[TaskRecord]:
        """Every recorded task; for tests and small tools, not for stats."""
        with self._read("read tasks") as conn:
            rows = conn.execute(sa.select(tasks).order_by(
                tasks.c.task_id)).mappings().all()
        return [_record(row) for row in rows]

    def prune_chunk(self, cutoff: float,
                    chunk_rows: int = DEFAULT_PRUNE_CHUNK_ROWS) -> int:
        """Delete up to ``chunk_rows`` tasks whose latest event is older
        than ``cutoff`` (POSIX seconds); return how many went."""
        oldest = (sa.select(tasks.c.task_id)
                  .where(tasks.c.state_at < cutoff)
                  .limit(chunk_rows))
        with self._write("prune old tasks") as conn:
            result = conn.execute(tasks.delete().where(
                tasks.c.task_id.in_(oldest)))
        return result.rowcount or 0

    def prune(self, older_than_s: float, *, now: float | None = None,
              chunk_rows: int = DEFAULT_PRUNE_CHUNK_ROWS,
              pause_s: float = 0.0,
              should_stop: Callable[[], bool] | None = None) -> int:
        """Delete tasks not heard of for ``older_than_s`` seconds.

        Works in chunks of one short transaction each, pausing
        ``pause_s`` between them so that the recorder's batches get the
        write lock in between; returns the number of rows deleted.
        """
        cutoff = (time.time() if now is None else now) - older_than_s
        total = 0
        with self._prune_lock:
            while True:
                deleted = self.prune_chunk(cutoff, chunk_rows)
                total += deleted
                if deleted < chunk_rows or (should_stop and should_stop()):
                    break
                if pause_s:
                    time.sleep(pause_s)
        return total

    # -- policies --------------------------------------------------------------

    def upsert_policy(self, name: str, source: str, *,
                      tenant: str = "default", enabled: bool | None = None,
                      schedule: Any = None,
                      now: float | None = None) -> Policy:
        """Add a policy or replace its source; ``enabled=None`` keeps the
        current setting (a new policy is enabled)."""
        now = time.time() if now is None else now
        values = {"name": name, "source": source, "tenant": tenant,
                  "enabled": True if enabled is None else enabled,
                  "schedule": schedule, "created": now, "modified": now}
        statement = self._insert(policies).values(**values)
        changes = {"source": source, "tenant": tenant, "schedule": schedule,
                   "modified": now}
        if enabled is not None:
            changes["enabled"] = enabled
        statement = statement.on_conflict_do_update(
            index_elements=[policies.c.name], set_=changes)
        with self._write(f"save policy {name!r}") as conn:
            conn.execute(statement)
            row = conn.execute(sa.select(policies).where(
                policies.c.name == name)).mappings().one()
        return Policy(**row)

    def get_policy(self, name: str) -> Policy | None:
        with self._read(f"read policy {name!r}") as conn:
            row = conn.execute(sa.select(policies).where(
                policies.c.name == name)).mappings().first()
        return None if row is None else Policy(**row)

    def list_policies(self, tenant: str | None = None) -> list[Policy]:
        """All policies, or a tenant's, by name."""
        query = sa.select(policies).order_by(policies.c.name)
        if tenant is not None:
            query = query.where(policies.c.tenant == tenant)
        with self._read("list policies") as conn:
            rows = conn.execute(query).mappings().all()
        return [Policy(**row) for row in rows]

    def delete_policy(self, name: str) -> bool:
        """Delete a policy (its run history stays); False if unknown."""
        with self._write(f"delete policy {name!r}") as conn:
            result = conn.execute(policies.delete().where(
                policies.c.name == name))
        return bool(result.rowcount)

    def set_policy_enabled(self, name: str, enabled: bool, *,
                           now: float | None = None) -> bool:
        """Enable or disable a policy; False if unknown."""
        now = time.time() if now is None else now
        with self._write(f"enable policy {name!r}") as conn:
            result = conn.execute(policies.update().where(
                policies.c.name == name).values(enabled=enabled,
                                                modified=now))
        return bool(result.rowcount)

    def update_last_run(self, name: str, at: float, outcome: str,
                        error: str | None = None) -> bool:
        """Note a policy's latest run; False if the policy is unknown."""
        with self._write(f"note the last run of {name!r}") as conn:
            return _set_last_run(conn, name, at, outcome, error)

    # -- runs ------------------------------------------------------------------

    def record_run(self, run: Run, *, update_policy: bool = True) -> int:
        """Add a run to the history (and, by default, note it on its
        policy in the same transaction); return the run's row id."""
        values = {f.name: getattr(run, f.name) for f in fields(Run)
                  if f.name != "id"}
        values["calls"] = json.dumps(run.calls, default=str)
        with self._write(f"record run {run.run_id}") as conn:
            result = conn.execute(runs.insert().values(**values))
            if update_policy:
                _set_last_run(conn, run.policy, run.started, run.outcome,
                              run.error_message)
        return result.inserted_primary_key[0]

    def record_runs(self, batch: Sequence[Run]) -> None:
        """Add several runs, and note each on its policy, in one
        transaction (the manager loop writes what finished in a turn)."""
        if not batch:
            return
        rows = []
        for run in batch:
            values = {f.name: getattr(run, f.name) for f in fields(Run)
                      if f.name != "id"}
            values["calls"] = json.dumps(run.calls, default=str)
            rows.append(values)
        last = policies.update().where(
            policies.c.name == sa.bindparam("p_name")).values(
                last_run_at=sa.bindparam("p_at"),
                last_outcome=sa.bindparam("p_outcome"),
                last_error=sa.bindparam("p_error"))
        with self._write(f"record {len(batch)} runs") as conn:
            conn.execute(runs.insert(), rows)
            conn.execute(last, [{"p_name": r.policy, "p_at": r.started,
                                 "p_outcome": r.outcome,
                                 "p_error": r.error_message} for r in batch])

    def list_runs(self, policy: str,
                  limit: int = DEFAULT_RUNS_LIMIT) -> list[Run]:
        """A policy's runs, newest first."""
        query = (sa.select(runs).where(runs.c.policy == policy)
                 .order_by(runs.c.started.desc(), runs.c.id.desc())
                 .limit(limit))
        with self._read(f"list the runs of {policy!r}") as conn:
            rows = conn.execute(query).mappings().all()
        found = []
        for row in rows:
            values = dict(row)
            values["calls"] = json.loads(values["calls"] or "[]")
            found.append(Run(**values))
        return found


# -- statements ----------------------------------------------------------------

def _dialect_insert(dialect: str) -> Callable:
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise StoreError(f"the store supports SQLite and PostgreSQL, not"
                         f" {dialect}")
    return insert


def _earliest(new, old):
    """The smaller of two nullable values; NULL only when both are."""
    return sa.case((new.is_(None), old), (old.is_(None), new),
                   (new < old, new), else_=old)


def _latest(new, old):
    return sa.case((new.is_(None), old), (old.is_(None), new),
                   (new > old, new), else_=old)


def _runtime(new, old):
    """The run time of the latest terminal event (see ``events.merge``)."""
    return sa.case(
        (sa.and_(new.finished.is_(None), old.finished.is_(None)),
         _latest(new.runtime, old.runtime)),
        (new.finished.is_(None), old.runtime),
        (old.finished.is_(None), new.runtime),
        (new.finished > old.finished, new.runtime),
        (new.finished < old.finished, old.runtime),
        else_=_latest(new.runtime, old.runtime))


def _task_upsert(insert: Callable):
    """INSERT .. ON CONFLICT that merges an update into an existing row."""
    statement = insert(tasks)
    new, old = statement.excluded, tasks.c
    newer_state = sa.or_(
        new.state_at > old.state_at,
        sa.and_(new.state_at == old.state_at,
                new.state_rank > old.state_rank))
    # The worker of the latest event that named one; equal times keep the
    # greater name so that the result does not depend on arrival order.
    newer_worker = sa.and_(new.worker.is_not(None), sa.or_(
        old.worker.is_(None), new.worker_at > old.worker_at,
        sa.and_(new.worker_at == old.worker_at, new.worker > old.worker)))
    sent = _earliest(new.sent, old.sent)
    received = _earliest(new.received, old.received)
    started = _earliest(new.started, old.started)
    at = sa.case((sent.is_not(None), sent), else_=received)
    wait = sa.case(
        (sa.or_(started.is_(None), at.is_(None)), sa.null()),
        (started - at < 0, sa.literal(0.0)), else_=started - at)
    changes = {
        "name": sa.func.coalesce(old.name, new.name),
        "state": sa.case((newer_state, new.state), else_=old.state),
        "state_at": sa.case((newer_state, new.state_at), else_=old.state_at),
        "state_rank": sa.case((newer_state, new.state_rank),
                              else_=old.state_rank),
        "worker": sa.case((newer_worker, new.worker), else_=old.worker),
        "worker_at": sa.case((newer_worker, new.worker_at),
                             else_=old.worker_at),
        "sent": sent,
        "received": received,
        "started": started,
        "finished": _latest(new.finished, old.finished),
        "runtime": _runtime(new, old),
        "at": at,
        "waittime": wait,
    }
    return statement.on_conflict_do_update(
        index_elements=[tasks.c.task_id], set_=changes)


def stats_statement(fn: str, start: float | None, end: float | None,
                    workers: list[str] | None, tasknames: list[str] | None,
                    states: list[str] | None) -> sa.Select:
    """The SELECT that answers one stats function (see ``manager.stats``).

    Every shape filters on ``at`` first and reads only columns of the
    covering indexes.
    """
    where = []
    if start is None and end is None:
        where.append(tasks.c.at.is_not(None))
    if start is not None:
        where.append(tasks.c.at >= start)
    if end is not None:
        where.append(tasks.c.at <= end)
    if workers is not None:
        where.append(tasks.c.worker.in_(workers))
    if tasknames is not None:
        where.append(tasks.c.name.in_(tasknames))
    if fn in MEANS:
        column = tasks.c[MEANS[fn]]
        return sa.select(sa.func.avg(column)).where(*where)
    if fn == "tasks":
        if states is not None:
            where.append(tasks.c.state.in_(states))
    elif fn == "tasks_unready":
        where.append(tasks.c.state.not_in(READY_STATES))
    elif fn in STATE_OF:
        where.append(tasks.c.state.in_(STATE_OF[fn]))
    elif fn != "tasks_sent":
        raise ValueError(f"unknown stats function {fn!r}")
    return sa.select(sa.func.count()).select_from(tasks).where(*where)


def _distinct_rounds(updates: Sequence[TaskUpdate]
                     ) -> Iterator[list[TaskUpdate]]:
    """Split updates so no task appears twice in one statement.

    A multi-row upsert may not touch one row twice (PostgreSQL refuses
    it); order is kept, so later updates merge over earlier ones.
    """
    pending = list(updates)
    while pending:
        seen: set[str] = set()
        this_round, later = [], []
        for update in pending:
            if update.task_id in seen:
                later.append(update)
            else:
                seen.add(update.task_id)
                this_round.append(update)
        yield this_round
        pending = later


def _set_last_run(conn: Connection, name: str, at: float, outcome: str,
                  error: str | None) -> bool:
    result = conn.execute(policies.update().where(
        policies.c.name == name).values(
            last_run_at=at, last_outcome=outcome, last_error=error))
    return bool(result.rowcount)


def _record(row) -> TaskRecord:
    return TaskRecord(task_id=row["task_id"], name=row["name"],
                      worker=row["worker"], state=row["state"],
                      sent=row["sent"], received=row["received"],
                      started=row["started"], finished=row["finished"],
                      runtime=row["runtime"])
