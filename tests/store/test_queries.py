"""Stats over the store, through the operation a policy calls.

A fixed clock and a handful of tasks at known times: each interval form
of the policy language and each argument shape gives a known answer, and
every shape is answered from a covering index.
"""

import datetime as dt

import pytest
from sqlalchemy.dialects import postgresql

from manager.operations import Operations
from manager.simcluster import SimulatedCluster
from manager.store import STATS_COUNTS, Store, TaskUpdate, stats_statement
from sandboxhost.namespace import resolve_interval

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
T = NOW.timestamp()
MIN = 60.0
HOUR = 3600.0
W1, W2 = "w1@a", "w2@a"
RESIZE, MAIL = "proj.resize", "proj.mail"

# task id, name, worker, state, sent, received, started, finished, runtime
TASKS = [
    ("a", RESIZE, W1, "SUCCESS", T - 5 * MIN, T - 299, T - 290, T - 280,
     10.0),
    ("b", RESIZE, W2, "FAILURE", T - 30 * MIN, None, T - 1790, T - 1780,
     None),
    ("c", MAIL, W1, "SUCCESS", T - 2 * HOUR, None, T - 2 * HOUR + 30,
     T - 2 * HOUR + 32, 2.0),
    ("d", MAIL, W2, "REVOKED", T - 24 * HOUR, None, None,
     T - 24 * HOUR + 1, None),
    # no task-sent seen: matched on the time it was received
    ("e", RESIZE, W1, "STARTED", None, T - 10 * MIN, T - 10 * MIN + 4,
     None, None),
    ("f", MAIL, None, "PENDING", T - 1 * MIN, None, None, None, None),
    # only its end was seen: never matched
    ("g", RESIZE, W1, "SUCCESS", None, None, None, T - 60, 1.0),
]


def update(task_id, name, worker, state, sent, received, started, finished,
           runtime):
    last = max(t for t in (sent, received, started, finished)
               if t is not None)
    return TaskUpdate(task_id=task_id, state=state, state_at=last,
                      state_rank=0, name=name, worker=worker,
                      worker_at=last, sent=sent, received=received,
                      started=started, finished=finished, runtime=runtime)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    made = Store(state_dir=tmp_path_factory.mktemp("state"))
    made.upsert_tasks([update(*row) for row in TASKS])
    yield made
    made.close()


@pytest.fixture
def stats(store):
    ops = Operations(SimulatedCluster(), store)

    def ask(fn, interval=None, workers=None, tasknames=None, states=None):
        start, end = resolve_interval(interval, NOW)
        return ops("stats", {
            "fn": fn, "start": start and start.isoformat(),
            "end": end and end.isoformat(), "workers": workers,
            "tasknames": tasknames, "states": states})
    return ask


td = dt.timedelta


@pytest.mark.parametrize("interval, ids", [
    (None, "abcdef"),
    (td(hours=1), "abef"),
    (td(minutes=5), "af"),                       # a sits on the edge
    ((td(hours=3), td(hours=1)), "c"),
    ((td(hours=1), td(hours=3)), "c"),           # put in order
    ((td(hours=1), NOW - td(minutes=20)), "b"),
    ((NOW - td(hours=25), td(hours=2)), "d"),
    ((NOW - td(minutes=31), NOW - td(minutes=9)), "be"),
    ((NOW, NOW - td(minutes=6)), "af"),
    ((NOW - td(minutes=30), NOW - td(minutes=30)), "b"),  # both edges
    ((NOW + td(hours=1), td(hours=1)), ""),
])
def test_each_interval_form_selects_by_time_sent(stats, interval, ids):
    assert stats("tasks_sent", interval) == len(ids)


@pytest.mark.parametrize("fn, expected", [
    ("tasks", 6), ("tasks_sent", 6), ("tasks_succeeded", 2),
    ("tasks_failed", 1), ("tasks_revoked", 1), ("tasks_ready", 4),
    ("tasks_unready", 2),
])
def test_each_count(stats, fn, expected):
    assert stats(fn) == expected


def test_tasks_by_state(stats):
    assert stats("tasks", states=["SUCCESS", "REVOKED"]) == 3
    assert stats("tasks", states=["PENDING"]) == 1
    assert stats("tasks", states=["RETRY"]) == 0
    assert stats("tasks", states=[]) == 0


def test_workers_and_tasknames_narrow_the_count(stats):
    assert stats("tasks_sent", workers=[W1]) == 3
    assert stats("tasks_sent", workers=[W1, W2]) == 5
    assert stats("tasks_sent", workers=[]) == 0
    assert stats("tasks_sent", workers=["nobody@nowhere"]) == 0
    assert stats("tasks_sent", tasknames=[RESIZE]) == 3
    assert stats("tasks_ready", workers=[W2], tasknames=[MAIL]) == 1
    assert stats("tasks_unready", td(hours=1), [W1], [RESIZE]) == 1


def test_mean_waittime_is_started_minus_sent_or_received(stats):
    # a: 10 s, b: 10 s, c: 30 s, e: 4 s (from received)
    assert stats("mean_waittime") == pytest.approx(54 / 4)
    assert stats("mean_waittime", tasknames=[RESIZE]) == pytest.approx(8)
    assert stats("mean_waittime", workers=[W2]) == pytest.approx(10)


def test_mean_runtime_averages_tasks_that_report_one(stats):
    assert stats("mean_runtime") == pytest.approx(6.0)
    assert stats("mean_runtime", td(hours=1)) == pytest.approx(10.0)


def test_means_are_none_when_no_task_matches(stats):
    assert stats("mean_runtime", workers=[W2]) is None
    assert stats("mean_waittime", tasknames=["proj.none"]) is None
    assert stats("mean_waittime", (NOW + td(hours=1), td(hours=1))) is None


def test_start_or_end_alone_is_open_on_the_other_side(store):
    assert store.query("tasks_sent", T - 11 * MIN, None, None, None,
                       None) == 3
    assert store.query("tasks_sent", None, T - 11 * MIN, None, None,
                       None) == 3


def test_unknown_function_is_an_error(store):
    with pytest.raises(ValueError):
        store.query("tasks_lost", None, None, None, None, None)


def test_a_negative_wait_across_clocks_counts_as_zero():
    store = Store("sqlite://")
    store.upsert_tasks([update("x", RESIZE, W1, "STARTED", 100.0, None,
                               99.5, None, None)])
    assert store.query("mean_waittime", None, None, None, None, None) == 0
    store.close()


SHAPES = [
    dict(start=T - HOUR, end=T, workers=None, tasknames=None),
    dict(start=T - HOUR, end=T, workers=[W1], tasknames=None),
    dict(start=T - HOUR, end=T, workers=None, tasknames=[RESIZE]),
    dict(start=T - HOUR, end=T, workers=[W1, W2], tasknames=[RESIZE]),
    dict(start=None, end=None, workers=None, tasknames=None),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fn", STATS_COUNTS + ("mean_waittime",
                                               "mean_runtime"))
def test_every_query_is_answered_from_a_covering_index(store, fn, shape):
    statement = stats_statement(fn, states=["FAILURE"] if fn == "tasks"
                                else None, **shape)
    sql = str(statement.compile(compile_kwargs={"literal_binds": True}))
    with store._read() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}").all()
    steps = [row[-1] for row in plan]
    assert steps and all("USING COVERING INDEX ix_tasks_" in step
                         for step in steps), steps


@pytest.mark.parametrize("fn", STATS_COUNTS + ("mean_waittime",))
def test_queries_compile_for_postgresql(fn):
    statement = stats_statement(fn, T - HOUR, T, [W1], [RESIZE],
                                ["SUCCESS"] if fn == "tasks" else None)
    sql = str(statement.compile(dialect=postgresql.dialect()))
    assert "tasks.at >= %(at_1)s" in sql
