"""The operation whitelist alone: every call checked before it is performed."""

import datetime as dt

import pytest

from sandboxhost.errors import OperationError
from manager.operations import Operations
from manager.mailer import Mailer
from manager.simcluster import SimulatedCluster


@pytest.fixture
def cluster():
    sim = SimulatedCluster()
    sim.add_worker("w1@node1", 2)
    sim.add_worker("w2@node1", 1)
    sim.add_task("media.tasks.resize")
    sim.set_queue_length("celery", 7)
    return sim


@pytest.fixture
def ops(cluster):
    return Operations(cluster, cluster, Mailer(dry_run=True))


def refused(ops, op, args):
    with pytest.raises(OperationError) as info:
        ops(op, args)
    return info.value.message


def test_unknown_operation_is_refused(ops):
    assert refused(ops, "os.system", {}) == "unknown operation 'os.system'"


@pytest.mark.parametrize("op", [None, 3, b"tasks.get", ["tasks.get"]])
def test_operation_must_be_a_known_string(ops, op):
    assert refused(ops, op, {}).startswith("unknown operation")


def test_extra_or_missing_arguments_are_refused(ops):
    assert refused(ops, "tasks.get", {"task": "t"}) == (
        "tasks.get: arguments must be exactly task, setting")
    assert refused(ops, "tasks.get", {"task": "t", "setting": "acks_late",
                                      "x": 1}).startswith("tasks.get:")


@pytest.mark.parametrize("setting, value", [
    ("acks_late", 1), ("acks_late", "yes"), ("default_retry_delay", True),
    ("default_retry_delay", 1.5), ("rate_limit", 10), ("expires", "soon"),
    ("time_limit", -1), ("time_limit", float("nan")), ("routing_key", 5),
])
def test_wrong_value_types_are_refused(ops, setting, value):
    message = refused(ops, "tasks.set", {"tasks": None, "setting": setting,
                                         "value": value})
    assert setting in message


@pytest.mark.parametrize("rate", ["fast", "10/d", "/s", "10 /s", ""])
def test_malformed_rate_limits_are_refused(ops, rate):
    assert "is not in Celery's form" in refused(
        ops, "tasks.set", {"tasks": None, "setting": "rate_limit",
                           "value": rate})


def test_unknown_setting_is_refused(ops):
    assert refused(ops, "tasks.get", {"task": "media.tasks.resize",
                                      "setting": "run"}).startswith(
        "unknown task setting 'run'")


def test_unknown_task_is_named(ops):
    assert refused(ops, "tasks.set", {"tasks": ["nope"], "setting":
                                      "acks_late", "value": True}) == (
        "unknown task 'nope'")


def test_unknown_worker_is_named(ops):
    assert refused(ops, "workers.get", {"worker": "w9", "what":
                                        "prefetch"}) == (
        "unknown worker 'w9'; known: w1@node1, w2@node1")


def test_step_is_bounded(ops):
    for by in (0, 65, -65, True, 1.0):
        assert "step" in refused(ops, "workers.change", {
            "workers": None, "what": "subprocesses", "by": by})


def test_queue_names_are_checked(ops):
    assert refused(ops, "queues.length", {"queue": "a b"}) == (
        "'a b' is not a valid queue name")


def test_stats_reject_states_on_other_functions(ops):
    assert refused(ops, "stats", {"fn": "tasks_failed", "start": None,
                                  "end": None, "workers": None,
                                  "tasknames": None,
                                  "states": ["SUCCESS"]}) == (
        "stats.tasks_failed takes no states")


def test_stats_bounds_must_be_datetimes(ops):
    assert "is not a datetime" in refused(ops, "stats", {
        "fn": "tasks", "start": "yesterday", "end": None, "workers": None,
        "tasknames": None, "states": None})


def test_pool_never_shrinks_below_one(ops, cluster):
    message = refused(ops, "workers.change", {"workers": None,
                                              "what": "subprocesses",
                                              "by": -1})
    assert message == ("w2@node1: the pool has 1 process(es) and cannot go"
                       " below 1 (applied on: w1@node1)")
    assert cluster.workers["w1@node1"].subprocesses == 1


def test_pool_growth_raises_prefetch_like_celery(ops, cluster):
    assert ops("workers.change", {"workers": ["w1@node1"],
                                  "what": "subprocesses", "by": 2}) == {
        "w1@node1": 4}
    assert cluster.workers["w1@node1"].prefetch == 16


def test_valid_calls_are_performed(ops, cluster):
    ops("tasks.set", {"tasks": None, "setting": "rate_limit",
                      "value": "10/m"})
    assert ops("tasks.get", {"task": "media.tasks.resize",
                             "setting": "rate_limit"}) == "10/m"
    assert ops("queues.length", {"queue": "celery"}) == 7
    assert ops("workers.names", {}) == ["w1@node1", "w2@node1"]


def test_naive_interval_bounds_use_the_manager_timezone(cluster):
    ops = Operations(cluster, cluster, Mailer(dry_run=True),
                     timezone=dt.timezone(dt.timedelta(hours=2)))
    cluster.record("media.tasks.resize", sent="2026-01-01T10:00:00+00:00")
    args = {"fn": "tasks", "workers": None, "tasknames": None,
            "states": None, "start": "2026-01-01T11:59:00",
            "end": "2026-01-01T12:01:00"}
    assert ops("stats", args) == 1
    args["start"], args["end"] = "2026-01-01T09:59:00", "2026-01-01T10:01:00"
    assert ops("stats", args) == 0
