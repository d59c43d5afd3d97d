"""The policies and runs tables, through the store's small functions."""

import pytest

from manager.store import Run, Store

SOURCE = "policy:\n    schedule:\n        crontab()\n    apply:\n        pass\n"
OTHER_SOURCE = SOURCE.replace("crontab()", 'crontab(minute="*/5")')


@pytest.fixture
def store(tmp_path):
    with Store(state_dir=tmp_path) as made:
        yield made


def run(run_id, started, policy="resize", outcome="ok", **changes):
    values = dict(run_id=run_id, policy=policy, tenant="default",
                  started=started, duration_s=0.01, applied=True,
                  outcome=outcome, condition=True)
    values.update(changes)
    return Run(**values)


def test_a_new_policy_is_enabled_and_dated(store):
    policy = store.upsert_policy("resize", SOURCE, now=100.0,
                                 schedule={"minute": "*"})
    assert (policy.enabled, policy.created, policy.modified) == \
        (True, 100.0, 100.0)
    assert policy.tenant == "default"
    assert store.get_policy("resize") == policy


def test_replacing_a_policy_keeps_its_creation_and_enabled_flag(store):
    store.upsert_policy("resize", SOURCE, now=100.0)
    store.set_policy_enabled("resize", False, now=150.0)
    policy = store.upsert_policy("resize", OTHER_SOURCE, tenant="media",
                                 now=200.0)
    assert (policy.source, policy.tenant, policy.enabled) == \
        (OTHER_SOURCE, "media", False)
    assert (policy.created, policy.modified) == (100.0, 200.0)
    assert store.upsert_policy("resize", SOURCE, enabled=True).enabled


def test_policies_are_listed_by_name_and_tenant(store):
    store.upsert_policy("b", SOURCE, tenant="t1")
    store.upsert_policy("a", SOURCE, tenant="t2")
    store.upsert_policy("c", SOURCE, tenant="t1")
    assert [p.name for p in store.list_policies()] == ["a", "b", "c"]
    assert [p.name for p in store.list_policies("t1")] == ["b", "c"]
    assert store.list_policies("nobody") == []


def test_unknown_policies_are_reported_not_raised(store):
    assert store.get_policy("ghost") is None
    assert store.delete_policy("ghost") is False
    assert store.set_policy_enabled("ghost", True) is False
    assert store.update_last_run("ghost", 1.0, "ok") is False


def test_delete_removes_the_policy_but_not_its_history(store):
    store.upsert_policy("resize", SOURCE)
    store.record_run(run("r1", 10.0))
    assert store.delete_policy("resize") is True
    assert store.get_policy("resize") is None
    assert [r.run_id for r in store.list_runs("resize")] == ["r1"]


def test_runs_are_listed_newest_first_with_their_calls(store):
    store.upsert_policy("resize", SOURCE)
    calls = [{"op": "tasks.set", "args": {"setting": "rate_limit"}}]
    store.record_run(run("r1", 10.0))
    store.record_run(run("r3", 30.0, calls=calls, output="hello\n"))
    store.record_run(run("r2", 20.0, outcome="error", applied=False,
                         error_section="apply", error_line=7,
                         error_message="ZeroDivisionError"))
    store.record_run(run("x1", 40.0, policy="other"))
    found = store.list_runs("resize")
    assert [r.run_id for r in found] == ["r3", "r2", "r1"]
    assert found[0].calls == calls and found[0].output == "hello\n"
    assert (found[1].error_section, found[1].error_line) == ("apply", 7)
    assert [r.run_id for r in store.list_runs("resize", limit=1)] == ["r3"]


def test_recording_a_run_notes_it_on_the_policy(store):
    store.upsert_policy("resize", SOURCE)
    store.record_run(run("r1", 10.0, outcome="error",
                         error_message="boom"))
    policy = store.get_policy("resize")
    assert (policy.last_run_at, policy.last_outcome, policy.last_error) == \
        (10.0, "error", "boom")
    store.update_last_run("resize", 20.0, "ok")
    policy = store.get_policy("resize")
    assert (policy.last_run_at, policy.last_outcome, policy.last_error) == \
        (20.0, "ok", None)


def test_run_ids_are_unique(store):
    from manager.errors import StoreError
    store.record_run(run("r1", 10.0))
    with pytest.raises(StoreError, match="UNIQUE"):
        store.record_run(run("r1", 11.0))
