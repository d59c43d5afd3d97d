"""cmrun end to end on real workers, on Redis and on the filesystem broker.

One cmrun (manager loop and event recorder) runs a directory of policies
against a real prefork worker: a policy whose condition reads recorded
stats grows the worker's pool, a broken policy is reported while the
others run, a spinning policy is killed at its wall time and recorded as
such, an edited policy is picked up without a restart, and stopping cmrun
puts back the task settings policies changed.
"""

import os
import signal
import subprocess
import sys
import threading

from functools import partial

from helpers import eventually as _eventually
import pytest

from manager.control import CeleryCluster
from manager.store import Store

pytestmark = pytest.mark.integration

WORKER = "e2e@test"

GROW = """\
policy:
    schedule:
        every(seconds=2)
    condition:
        stats.tasks_succeeded(interval=datetime.timedelta(minutes=5),
                              tasknames="cmapp.add") >= 3
    apply:
        if workers["e2e@test"].subprocesses.get() < 2:
            workers["e2e@test"].subprocesses.increment()
        print("grow v1")
"""

RATE = """\
policy:
    schedule:
        every(seconds=2)
    apply:
        tasks["cmapp.stamp"].rate_limit = "7/m"
"""

SPIN = """\
policy:
    schedule:
        every(seconds=2)
    apply:
        x = sum(i for i in range(10 ** 12))
"""

BROKEN = """\
policy:
    schedule:
        every(seconds=2)
    apply:
        import os
"""

TENANTS = """\
[default]
workers = ["*"]
tasks = ["*"]
queues = ["*"]

[default.limits]
wall_timeout_s = 1.5
"""


eventually = partial(_eventually, timeout=60.0, interval=0.2)


class Output:
    """Collects a process's output lines as they come."""

    def __init__(self, proc):
        self.lines = []
        self.thread = threading.Thread(target=self._read, args=(proc,),
                                       daemon=True)
        self.thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append(line)

    def has(self, text):
        return any(text in line for line in self.lines)

    @property
    def text(self):
        return "".join(self.lines)


@pytest.fixture(scope="module")
def manager_run(cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"e2e-{cluster.kind}")
    policies = folder / "policies"
    policies.mkdir()
    for name, text in (("grow", GROW), ("rate", RATE), ("spin", SPIN),
                       ("broken", BROKEN)):
        (policies / f"{name}.policy").write_text(text)
    tenants = folder / "tenants.toml"
    tenants.write_text(TENANTS)
    cluster.start_worker(WORKER, 1)
    state = folder / "state"
    cmd = [sys.executable, "-m", "manager.supervisor",
           "--broker", cluster.env["CM_TEST_BROKER"],
           "--state-dir", str(state), "--policies", str(policies),
           "--tenants", str(tenants)]
    env = {**os.environ, "CMPOLICY_STATE_DIR": str(cluster.state_dir)}
    if cluster.kind == "filesystem":
        # The filesystem broker lives in the cluster's state directory.
        cmd[cmd.index("--state-dir") + 1] = str(cluster.state_dir)
        state = cluster.state_dir
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    output = Output(proc)
    assert eventually(lambda: output.has("listening for events")), \
        output.text
    yield cluster, proc, output, policies, Store(
        f"sqlite:///{state / 'manager.db'}")
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def pool_size(app):
    stats = app.control.inspect([WORKER], timeout=1.0, limit=1).stats()
    return len(stats[WORKER]["pool"]["processes"]) if stats else None


def test_recorded_stats_drive_a_real_change(manager_run):
    cluster, proc, output, policies, store = manager_run
    for _ in range(3):
        cluster.module.add.delay(1, 2).get(timeout=30)
    assert eventually(lambda: pool_size(cluster.app) == 2), output.text
    assert eventually(lambda: output.has("policy grow says: grow v1"))


def test_a_broken_policy_is_reported_and_others_run(manager_run):
    cluster, proc, output, policies, store = manager_run
    assert eventually(lambda: output.has(
        "policy broken: <policy broken>") or output.has("import is not"
                                                          " allowed"))
    assert eventually(lambda: store.list_runs("rate"))
    assert store.list_runs("broken") == []


def test_a_spinning_policy_is_killed_and_recorded(manager_run):
    cluster, proc, output, policies, store = manager_run
    runs = eventually(lambda: store.list_runs("spin"))
    assert runs[0].outcome == "timeout"
    assert "wall" in runs[0].error_message or "time" in \
        runs[0].error_message


def test_an_edited_policy_is_picked_up(manager_run):
    cluster, proc, output, policies, store = manager_run
    (policies / "grow.policy").write_text(GROW.replace("grow v1", "grow v2"))
    assert eventually(lambda: output.has("policy grow says: grow v2")), \
        output.text[-3000:]


def test_cmpolicy_run_changes_the_real_worker_once(manager_run, tmp_path):
    cluster, proc, output, policies, store = manager_run
    path = tmp_path / "once.policy"
    path.write_text("policy:\n    schedule:\n        crontab()\n"
                    "    apply:\n"
                    "        print(workers['e2e@test'].queues.add('once'))\n")
    result = subprocess.run(
        [sys.executable, "-m", "manager.cli", "run", str(path), "--broker",
         cluster.env["CM_TEST_BROKER"], "--state-dir",
         str(cluster.state_dir if cluster.kind == "filesystem"
             else tmp_path / "state")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "call:      workers.queues(workers=['e2e@test'], action='add'," \
        " queue='once')" in result.stdout
    control = CeleryCluster(cluster.app)
    assert eventually(lambda: "once" in control.get_worker(WORKER,
                                                            "queues"))
    bad = tmp_path / "bad.policy"
    bad.write_text(path.read_text().replace("e2e@test", "nope@test"))
    result = subprocess.run(
        [sys.executable, "-m", "manager.cli", "run", str(bad), "--broker",
         cluster.env["CM_TEST_BROKER"], "--state-dir", str(tmp_path / "s2")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "unknown worker 'nope@test'" in result.stdout


def test_stopping_cmrun_restores_task_settings(manager_run):
    cluster, proc, output, policies, store = manager_run
    control = CeleryCluster(cluster.app)
    assert eventually(lambda: control.get_task_setting(
        "cmapp.stamp", "rate_limit") == "7/m")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0, output.text[-3000:]
    assert control.get_task_setting("cmapp.stamp", "rate_limit") is None
    assert "restored task settings" in output.text
