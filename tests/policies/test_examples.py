"""Tests of the example policies, written only with the pytest plugin."""

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "examples"
NOW = "2026-12-04T10:00"  # a Friday


def example(name):
    path = EXAMPLES / name
    if not path.exists():
        pytest.skip("the shared examples are not beside this checkout")
    return path


@pytest.fixture
def resize_cluster(policy_cluster):
    policy_cluster.add_worker("w1@node1", subprocesses=2)
    policy_cluster.add_task("media.tasks.resize")
    return policy_cluster


def waited(cluster, seconds, count=3):
    for i in range(count):
        cluster.record("media.tasks.resize", worker="w1@node1",
                       sent=f"2026-12-04T09:{10 + i}:00",
                       started=f"2026-12-04T09:{10 + i}:{seconds:02d}")


def test_hello_prints_every_minute(policy_cluster):
    run = policy_cluster.run(example("hello.policy"), now=NOW)
    assert run.output == ["hello world!"]
    run.assert_no_calls()
    times = policy_cluster.schedule_times(example("hello.policy"),
                                          "2026-12-04T10:00:30",
                                          "2026-12-04T10:03:00")
    assert [t.strftime("%H:%M") for t in times] == ["10:01", "10:02",
                                                     "10:03"]


def test_grow_on_wait_adds_a_process_when_jobs_wait(resize_cluster):
    waited(resize_cluster, 59, count=2)
    resize_cluster.record("media.tasks.resize", worker="w1@node1",
                          sent="2026-12-04T09:30", started="2026-12-04T09:35")
    run = resize_cluster.run(example("grow-on-wait.policy"), now=NOW)
    assert run.condition is True
    assert run.calls[-1] == ("workers.change", {
        "workers": ["w1@node1"], "what": "subprocesses", "by": 1})
    assert resize_cluster.workers["w1@node1"].subprocesses == 3


def test_grow_on_wait_leaves_a_fast_pool_alone(resize_cluster):
    waited(resize_cluster, 5)
    run = resize_cluster.run(example("grow-on-wait.policy"), now=NOW)
    assert run.condition is False
    run.assert_no_changes()


def test_grow_on_wait_runs_every_ten_minutes_on_weekdays(resize_cluster):
    times = resize_cluster.schedule_times(example("grow-on-wait.policy"),
                                          "2026-12-04T23:45",
                                          "2026-12-07T00:15")
    assert [t.strftime("%a %H:%M") for t in times] == [
        "Fri 23:50", "Mon 00:00", "Mon 00:10"]


def test_grow_on_wait_fails_clearly_when_the_worker_is_gone(policy_cluster):
    policy_cluster.add_task("media.tasks.resize")
    policy_cluster.add_worker("w2@node1")
    waited(policy_cluster, 59)
    policy_cluster.record("media.tasks.resize", worker="w1@node1",
                          sent="2026-12-04T09:30", started="2026-12-04T09:35")
    run = policy_cluster.run(example("grow-on-wait.policy"), now=NOW)
    run.assert_failed(section="apply", line=13,
                      message="unknown worker 'w1@node1'")


def test_shrink_on_idle_gives_a_process_back(resize_cluster):
    waited(resize_cluster, 3)
    run = resize_cluster.run(example("shrink-on-idle.policy"), now=NOW)
    assert run.applied
    assert resize_cluster.workers["w1@node1"].subprocesses == 1


def test_shrink_on_idle_keeps_the_last_process(resize_cluster):
    resize_cluster.workers["w1@node1"].subprocesses = 1
    waited(resize_cluster, 3)
    run = resize_cluster.run(example("shrink-on-idle.policy"), now=NOW)
    assert run.applied and run.ok
    run.assert_no_changes()


def test_throttle_on_failures_slows_a_flaky_task(policy_cluster):
    policy_cluster.add_task("billing.tasks.charge")
    for i in range(21):
        policy_cluster.record("billing.tasks.charge", "FAILURE",
                              sent=f"2026-12-04T09:57:{i:02d}")
    run = policy_cluster.run(example("throttle-on-failures.policy"), now=NOW)
    assert run.applied
    assert policy_cluster.tasks["billing.tasks.charge"]["rate_limit"] == "30/m"
    assert run.output[0].startswith("throttled billing.tasks.charge at"
                                    " 2026-12-04 10:00:00")


def test_throttle_on_failures_second_condition_counts_every_task(
        policy_cluster):
    policy_cluster.add_task("billing.tasks.charge")
    for i in range(201):
        policy_cluster.record("other.task", "FAILURE",
                              sent=f"2026-12-04T09:58:{i % 60:02d}")
    run = policy_cluster.run(example("throttle-on-failures.policy"), now=NOW)
    assert run.condition is True


def test_nightly_report_mails_when_the_export_did_not_run(policy_cluster):
    policy_cluster.add_task("reports.tasks.nightly_export")
    run = policy_cluster.run(example("nightly-report-missing.policy"),
                             now="2026-12-04T03:00")
    (email,) = run.emails
    assert email.subject == "nightly_export did not run"
    assert email.recipient_list == ("oncall@example.com",)


def test_nightly_report_is_quiet_when_the_export_succeeded(policy_cluster):
    policy_cluster.record("reports.tasks.nightly_export", "SUCCESS",
                          sent="2026-12-04T02:30")
    run = policy_cluster.run(example("nightly-report-missing.policy"),
                             now="2026-12-04T03:00")
    assert run.condition is False and run.emails == []


def test_a_policy_from_a_string_with_a_syntax_error(policy_cluster):
    from sandboxhost.errors import PolicySyntaxError
    with pytest.raises(PolicySyntaxError) as info:
        policy_cluster.load(text="policy:\n    schedule:\n        crontab()\n"
                            "    apply:\n        import os\n")
    assert info.value.first.message == "import is not allowed"
