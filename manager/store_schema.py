"""The store's tables and the ordered steps that create and change them.

Version 1 holds everything the manager needs: ``tasks`` (one row per task,
written by the event recorder), ``policies`` and ``runs`` (the run history).
A later change appends a step to ``MIGRATIONS``; steps already applied to a
database are never run again, and each step runs in its own transaction
with the row that records it.

Index design: every stats query filters on ``at`` (the time a task was
sent, or received when no task-sent event was seen), optionally on worker
and task name, and counts rows by state or averages wait or run time. Each
``ix_tasks_*_cover`` index holds all of those columns, so a query over a
time window is answered from one index range without touching the table,
whichever filter leads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex, CreateTable

logger = logging.getLogger(__name__)

# Lengths fit Celery's names (a task id is a 36-character UUID unless the
# publisher chose one) and stay under index key limits of both databases.
ID_CHARS = 255
NAME_CHARS = 255
STATE_CHARS = 16

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)

tasks = sa.Table(
    "tasks", metadata,
    sa.Column("task_id", sa.String(ID_CHARS), primary_key=True),
    sa.Column("name", sa.String(NAME_CHARS)),
    sa.Column("worker", sa.String(NAME_CHARS)),
    sa.Column("state", sa.String(STATE_CHARS), nullable=False),
    # The state comes from the event with the latest timestamp, ties broken
    # by lifecycle rank; both are kept so a later batch can be merged in.
    sa.Column("state_at", sa.Float, nullable=False),
    sa.Column("state_rank", sa.SmallInteger, nullable=False),
    # When the event that named the worker happened: a retried task may
    # move to another worker, and the latest one is kept.
    sa.Column("worker_at", sa.Float),
    sa.Column("sent", sa.Float),
    sa.Column("received", sa.Float),
    sa.Column("started", sa.Float),
    sa.Column("finished", sa.Float),
    # Derived at each write so queries read them from the index.
    sa.Column("at", sa.Float),
    sa.Column("waittime", sa.Float),
    sa.Column("runtime", sa.Float),
)

TASK_INDEXES = (
    sa.Index("ix_tasks_at_cover", tasks.c.at, tasks.c.state, tasks.c.name,
             tasks.c.worker, tasks.c.waittime, tasks.c.runtime),
    sa.Index("ix_tasks_name_cover", tasks.c.name, tasks.c.at, tasks.c.state,
             tasks.c.worker, tasks.c.waittime, tasks.c.runtime),
    sa.Index("ix_tasks_worker_cover", tasks.c.worker, tasks.c.at,
             tasks.c.state, tasks.c.name, tasks.c.waittime,
             tasks.c.runtime),
    # Retention deletes by the latest event's time, in small chunks.
    sa.Index("ix_tasks_state_at", tasks.c.state_at),
)

policies = sa.Table(
    "policies", metadata,
    sa.Column("name", sa.String(NAME_CHARS), primary_key=True),
    sa.Column("tenant", sa.String(NAME_CHARS), nullable=False,
              server_default="default"),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False,
              server_default=sa.true()),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("modified", sa.Float, nullable=False),
    sa.Column("last_run_at", sa.Float),
    sa.Column("last_outcome", sa.String(32)),
    sa.Column("last_error", sa.Text),
    sa.Column("schedule", sa.JSON),
)

POLICY_INDEXES = (
    sa.Index("ix_policies_tenant", policies.c.tenant),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), nullable=False, unique=True),
    sa.Column("policy", sa.String(NAME_CHARS), nullable=False),
    sa.Column("tenant", sa.String(NAME_CHARS), nullable=False),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("duration_s", sa.Float, nullable=False),
    sa.Column("condition", sa.Boolean),
    sa.Column("applied", sa.Boolean, nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("error_section", sa.String(32)),
    sa.Column("error_line", sa.Integer),
    sa.Column("error_message", sa.Text),
    sa.Column("output", sa.Text, nullable=False, server_default=""),
    sa.Column("calls", sa.Text, nullable=False, server_default="[]"),
)

RUN_INDEXES = (
    # A policy's history, newest first.
    sa.Index("ix_runs_policy_started", runs.c.policy, runs.c.started),
    sa.Index("ix_runs_started", runs.c.started),
)


@dataclass(frozen=True)
class Migration:
    """One schema step: ``apply`` runs inside the step's transaction."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _create_version_1(conn: Connection) -> None:
    # IF NOT EXISTS: two processes opening a new database at once both
    # try this step; the second one's statements then change nothing.
    for table in (tasks, policies, runs):
        conn.execute(CreateTable(table, if_not_exists=True))
    for index in TASK_INDEXES + POLICY_INDEXES + RUN_INDEXES:
        conn.execute(CreateIndex(index, if_not_exists=True))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "tasks, policies and runs", _create_version_1),
)


def current_version(conn: Connection) -> int:
    """The highest version applied to the database, 0 for a new one."""
    value = conn.execute(sa.select(sa.func.max(schema_version.c.version)))
    return value.scalar() or 0


# Any constant will do: it names the lock all manager processes take.
_PG_MIGRATION_LOCK_KEY = 0x636D5F7363686D61


def _serialise(conn: Connection) -> None:
    """Let one process at a time migrate a shared database.

    SQLite transactions are already serial (the store begins writers with
    BEGIN IMMEDIATE); PostgreSQL ones are not, and its IF NOT EXISTS is no
    guard against a concurrent CREATE.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
            _PG_MIGRATION_LOCK_KEY)))


def migrate(begin: Callable[[], object],
            steps: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply the steps a database lacks; return the versions applied.

    ``begin`` opens a write transaction (a context manager yielding a
    connection). Each step re-reads the version inside its own
    transaction, so a step that another process applied meanwhile is
    skipped rather than run twice.
    """
    with begin() as conn:
        _serialise(conn)
        conn.execute(CreateTable(schema_version, if_not_exists=True))
    applied = []
    for step in steps:
        with begin() as conn:
            _serialise(conn)
            if current_version(conn) >= step.version:
                continue
            logger.info("store: applying schema version %d (%s)",
                        step.version, step.description)
            step.apply(conn)
            conn.execute(schema_version.insert().values(
                version=step.version, description=step.description,
                applied_at=time.time()))
            applied.append(step.version)
    return applied
