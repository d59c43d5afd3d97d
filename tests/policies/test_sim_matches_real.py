"""The simulated cluster and a real one agree on the same operations.

Each scenario is a policy run against a simulated cluster and against a
real prefork worker (filesystem:// broker) set up alike; what the runs
return, whether they fail and where, must be the same.
"""

import datetime as dt

import pytest

pytestmark = pytest.mark.integration

HEAD = "policy:\n    schedule:\n        crontab()\n    apply:\n"

SCENARIOS = {
    "shrink below one": "        workers['w1@test'].subprocesses"
                        ".decrement()\n",
    "grow the pool": "        print(workers['w1@test'].subprocesses"
                     ".increment())\n"
                     "        print(workers['w1@test'].subprocesses.get())\n",
    "grow raises prefetch": "        workers['w1@test'].subprocesses"
                            ".increment(2)\n"
                            "        print(workers['w1@test'].prefetch"
                            ".get())\n",
    "prefetch": "        print(workers['w1@test'].prefetch.increment(3))\n"
                "        print(workers['w1@test'].prefetch.decrement(1))\n",
    "unknown worker": "        workers['nope@test'].prefetch.increment()\n",
    "unknown task": "        tasks['nope.task'].acks_late = True\n",
    "task setting": "        tasks['media.tasks.resize'].rate_limit = '5/m'\n"
                    "        print(tasks['media.tasks.resize'].rate_limit)\n",
    "bad value": "        tasks['media.tasks.resize'].rate_limit = 'fast'\n",
    "queues": "        workers['w1@test'].queues.add('extra')\n"
              "        print(sorted(workers['w1@test'].queues.get()))\n",
    "names": "        print(workers.names())\n",
}


def outcome(run):
    return {
        "ok": run.ok,
        "output": run.output,
        "error_line": None if run.ok else run.error.line,
        "error_type": None if run.ok else getattr(run.error, "type_name",
                                                  None),
    }


@pytest.fixture(scope="module")
def real(request, policy_sandbox, tmp_path_factory):
    from manager.pytest_plugin import RealCluster
    spec = request.config.getini("cmpolicy_app")
    made = RealCluster(policy_sandbox, tmp_path_factory.mktemp("real"), spec)
    made.start_worker("w1@test", 1)
    yield made
    made.stop()


def test_simulated_and_real_runs_agree(policy_cluster, real):
    policy_cluster.add_worker("w1@test", 1)
    policy_cluster.add_task("media.tasks.resize")
    policy_cluster.add_task("billing.tasks.charge")
    policy_cluster.add_task("reports.tasks.nightly_export")
    differences = {}
    for name, body in SCENARIOS.items():
        policy = policy_cluster.load(text=HEAD + body, name=name)
        simulated = outcome(policy_cluster.run(policy))
        actual = outcome(real.run(policy))
        if simulated != actual:
            differences[name] = {"simulated": simulated, "real": actual}
    assert differences == {}


STATS = HEAD + """\
        hour = datetime.timedelta(hours=1)
        print(stats.tasks_succeeded(interval=hour,
                                    tasknames="media.tasks.resize"))
        print(stats.tasks_sent(interval=hour, workers="w1@test"))
        print(stats.tasks_failed(interval=hour))
        print(stats.mean_waittime(interval=hour) is not None)
        print(stats.mean_runtime(interval=hour,
                                 tasknames="billing.tasks.charge"))
"""


def test_stats_agree_on_recorded_tasks(policy_cluster, real):
    # The real worker's events go through the plugin's recorder into its
    # store; the simulated cluster is given the same tasks by hand.
    ids = [real.send_task("media.tasks.resize") for _ in range(3)]
    records = real.wait_recorded(ids)
    assert {r.worker for r in records} == {"w1@test"}
    policy_cluster.add_worker("w1@test", 1)
    for r in records:
        policy_cluster.record("media.tasks.resize", worker=r.worker,
                              sent=r.sent, started=r.started,
                              finished=r.finished)
    policy = policy_cluster.load(text=STATS, name="stats")
    simulated = outcome(policy_cluster.run(
        policy, now=dt.datetime.now(dt.timezone.utc)))
    actual = outcome(real.run(policy))
    assert simulated == actual
    assert actual["output"] == ["3", "3", "0", "True", "None"]
