"""The SQL gives the answers of the definitions, on random data.

Two properties, each checked on many random cases, on SQLite and (when
its server and psycopg are installed) on a throwaway PostgreSQL:

- the store's ``query`` equals ``manager.stats.query_records`` on the same
  records, for every function and argument shape;
- events in any order, repeated, and split over any batches give the rows
  that the recorder's rules define, computed here directly from the events.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pytest
import sqlalchemy as sa

from manager.events import TASK_EVENTS, fold
from manager.stats import TaskRecord, query_records
from manager.store import STATS_COUNTS, Store, TaskUpdate
from manager.store_schema import tasks as tasks_table

FUNCTIONS = STATS_COUNTS + ("mean_waittime", "mean_runtime")
STATES = ("PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE", "REVOKED",
          "RETRY")
RANK = {state: rank for state, rank, _column in TASK_EVENTS.values()}
WORKERS = ("w1@a", "w2@a", "w3@b")
NAMES = ("proj.a", "proj.b", "proj.c")
TERMINAL = ("task-succeeded", "task-failed", "task-revoked")
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[
                        HealthCheck.too_slow,
                        HealthCheck.function_scoped_fixture])
PG_START_TIMEOUT_S = 60


# -- backends ------------------------------------------------------------------------

def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of our own on a free loopback port."""
    pytest.importorskip("psycopg")
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is None:
        pytest.skip("PostgreSQL's pg_ctl is not installed")
    as_user = []
    folder = tempfile.mkdtemp(prefix="cm-pg-")
    if os.geteuid() == 0:  # the server refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    data, port = os.path.join(folder, "data"), _free_port()
    subprocess.run(as_user + [pg_ctl, "init", "-s", "-D", data, "-o",
                              "--auth=trust -U postgres"], check=True,
                   stdout=subprocess.DEVNULL)
    options = f"-k {folder} -p {port} -c listen_addresses=127.0.0.1" \
              " -c fsync=off"
    subprocess.run(as_user + [pg_ctl, "start", "-s", "-w", "-t",
                              str(PG_START_TIMEOUT_S), "-D", data, "-l",
                              os.path.join(folder, "log"), "-o", options],
                   check=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [pg_ctl, "stop", "-s", "-m", "fast", "-D",
                                  data], check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request):
    """A function giving a store with no tasks, on one database."""
    if request.param == "sqlite":
        made = []

        def fresh():
            made.append(Store("sqlite://"))
            return made[-1]
        yield fresh
        for store in made:
            store.close()
        return
    store = Store(request.getfixturevalue("postgres_url"))

    def fresh_pg():
        with store._write("empty tasks") as conn:
            conn.execute(tasks_table.delete())
        return store
    yield fresh_pg
    store.close()

# A coarse grid of times makes ties and interval edges common.
times = st.integers(0, 30).map(float)
maybe_time = st.none() | times


@st.composite
def records(draw):
    count = draw(st.integers(0, 25))
    found = []
    for i in range(count):
        found.append(TaskRecord(
            task_id=f"t{i}", name=draw(st.none() | st.sampled_from(NAMES)),
            worker=draw(st.none() | st.sampled_from(WORKERS)),
            state=draw(st.sampled_from(STATES)), sent=draw(maybe_time),
            received=draw(maybe_time), started=draw(maybe_time),
            finished=draw(maybe_time),
            runtime=draw(st.none() | st.floats(0, 100))))
    return found


def subset(values):
    return st.none() | st.lists(st.sampled_from(values), unique=True,
                                max_size=len(values))


@st.composite
def queries(draw):
    fn = draw(st.sampled_from(FUNCTIONS))
    return dict(fn=fn, start=draw(maybe_time), end=draw(maybe_time),
                workers=draw(subset(WORKERS)),
                tasknames=draw(subset(NAMES)),
                states=draw(subset(STATES)) if fn == "tasks" else None)


def update_of(record):
    """The update that stores ``record`` as it is."""
    last = max([t for t in (record.sent, record.received, record.started,
                            record.finished) if t is not None], default=0.0)
    return TaskUpdate(task_id=record.task_id, state=record.state,
                      state_at=last, state_rank=RANK[record.state],
                      name=record.name, worker=record.worker,
                      worker_at=None if record.worker is None else last,
                      sent=record.sent, received=record.received,
                      started=record.started, finished=record.finished,
                      runtime=record.runtime)


@SETTINGS
@given(records(), st.lists(queries(), min_size=1, max_size=12))
def test_sql_answers_equal_the_definitions(backend, found, asked):
    store = backend()
    store.upsert_tasks([update_of(record) for record in found])
    for query in asked:
        want = query_records(found, **query)
        got = store.query(**query)
        assert got == pytest.approx(want), query
        assert type(got) is type(want)


# -- events --------------------------------------------------------------------------

@st.composite
def task_events(draw, task_id):
    """Some of one task's events; a task has one name, workers vary."""
    name = draw(st.sampled_from(NAMES))
    events = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(sorted(TASK_EVENTS)))
        event = {"type": kind, "uuid": task_id, "timestamp": draw(times)}
        if kind in ("task-sent", "task-received"):
            event["name"] = name
        event["hostname"] = "web@front" if kind == "task-sent" \
            else draw(st.sampled_from(WORKERS))
        if kind == "task-succeeded":
            event["runtime"] = draw(st.floats(0, 50))
        events.append(event)
    return events


@st.composite
def streams(draw):
    events = []
    for i in range(draw(st.integers(1, 6))):
        events.extend(draw(task_events(f"t{i}")))
    events += draw(st.lists(st.sampled_from(events), max_size=5))  # twice
    events = draw(st.permutations(events))
    cuts = sorted(draw(st.lists(st.integers(0, len(events)), max_size=4)))
    batches, start = [], 0
    for cut in cuts + [len(events)]:
        batches.append(events[start:cut])
        start = cut
    return events, batches


def by_definition(events):
    """A task's row, straight from the definitions (no merging)."""
    def first(kind):
        seen = [e["timestamp"] for e in events if e["type"] == kind]
        return min(seen, default=None)

    def key(event):
        return (event["timestamp"], TASK_EVENTS[event["type"]][1])

    latest = max(events, key=key)
    terminal = [e for e in events if e["type"] in TERMINAL]
    finished = max((e["timestamp"] for e in terminal), default=None)
    runtimes = [e["runtime"] for e in terminal
                if e["timestamp"] == finished and "runtime" in e]
    by_workers = [e for e in events if e["type"] != "task-sent"]
    worker = max(by_workers, default=None,
                 key=lambda e: (e["timestamp"], e["hostname"]))
    names = [e["name"] for e in events if "name" in e]
    return TaskRecord(
        task_id=events[0]["uuid"], name=names[0] if names else None,
        worker=None if worker is None else worker["hostname"],
        state=TASK_EVENTS[latest["type"]][0], sent=first("task-sent"),
        received=first("task-received"), started=first("task-started"),
        finished=finished, runtime=max(runtimes, default=None))


@SETTINGS
@given(streams())
def test_any_order_and_batching_gives_the_defined_rows(backend, stream):
    events, batches = stream
    store = backend()
    for batch in batches:
        store.upsert_tasks(list(fold(batch).values()))
    tasks = {}
    for event in events:
        tasks.setdefault(event["uuid"], []).append(event)
    want = sorted((by_definition(evs) for evs in tasks.values()),
                  key=lambda r: r.task_id)
    assert store.records() == want
    in_memory = fold(events)
    assert [in_memory[r.task_id].state for r in want] == \
        [r.state for r in want]


# -- PostgreSQL specifics ----------------------------------------------------------

def test_processes_opening_a_new_postgresql_database_migrate_it_once(
        postgres_url):
    with Store(postgres_url) as setup, setup._write("reset") as conn:
        for table in ("runs", "policies", "tasks", "schema_version"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
    errors, stores = [], []

    def open_store():
        try:
            stores.append(Store(postgres_url))
        except Exception as exc:  # pragma: no cover - the failure
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [s.schema_version() for s in stores] == [1] * 4
    for store in stores:
        store.close()


def test_policies_runs_and_pruning_work_on_postgresql(postgres_url):
    from manager.store import Run
    with Store(postgres_url) as store:
        store.upsert_policy("p", "policy: ...", schedule={"minute": "*/5"},
                            now=1.0)
        store.upsert_policy("p", "policy: changed", now=2.0)
        store.record_run(Run(run_id="r-pg", policy="p", tenant="default",
                             started=3.0, duration_s=0.1, applied=False,
                             outcome="ok", calls=[{"op": "x"}]))
        policy = store.get_policy("p")
        assert (policy.source, policy.created, policy.last_run_at) == \
            ("policy: changed", 1.0, 3.0)
        assert store.list_runs("p")[0].calls == [{"op": "x"}]
        store.upsert_tasks([TaskUpdate(task_id=f"old{i}", state="PENDING",
                                       state_at=1.0, state_rank=0, sent=1.0)
                            for i in range(25)])
        assert store.prune(10.0, now=100.0, chunk_rows=10) == 25
