"""The event recorder on real prefork workers, on Redis and filesystem.

``cmevents`` runs as its own process (``python -m manager.events -A
cmapp``); workers run a known mix of succeeding, failing, retried and
revoked tasks, and the recorded rows and every stats function must give
exactly the expected answers.
"""

import os
import signal
import subprocess
import sys
import time
import uuid

from functools import partial

from helpers import eventually as _eventually
import pytest

from manager.stats import query_records
from manager.store import STATS_COUNTS, Store

pytestmark = pytest.mark.integration

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
W1, W2 = "ev1@test", "ev2@test"
SECOND_QUEUE = "second"
SLEEP_S = 0.3
WAIT_S = 60.0
ALL_FUNCTIONS = STATS_COUNTS + ("mean_waittime", "mean_runtime")


eventually = partial(_eventually, timeout=WAIT_S)


class RecorderProcess:
    """``cmevents`` in a child process, logging to a file."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.proc = None
        self.starts = 0

    @property
    def log_path(self):
        return self.cluster.state_dir / f"cmevents-{self.starts}.log"

    def start(self, *extra):
        self.starts += 1
        env = {**os.environ, **self.cluster.env,
               "PYTHONPATH": os.pathsep.join([HERE, ROOT])}
        handle = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "manager.events", "-A", "cmapp",
             "--state-dir", str(self.cluster.state_dir), "-v", *extra],
            env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=HERE,
            start_new_session=True)
        assert eventually(lambda: "listening for events" in self.log()
                          or self.proc.poll() is not None), self.log()
        assert self.proc.poll() is None, self.log()

    def log(self):
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise


@pytest.fixture(scope="module")
def setup(cluster):
    cluster.start_worker(W1, 2)
    cluster.start_worker(W2, 1, extra=("-Q", SECOND_QUEUE))
    recorder = RecorderProcess(cluster)
    recorder.start()
    store = Store(f"sqlite:///{cluster.state_dir / 'manager.db'}")
    yield cluster, recorder, store
    if recorder.proc.poll() is None:
        recorder.stop()
    store.close()


def wait_recorded(store, cluster, queue=None):
    """Send probes until one is recorded as finished: on Redis the
    receiver's subscription starts a moment after it says it listens."""
    add = cluster.module.add
    for _ in range(20):
        probe = add.apply_async((0, 0), queue=queue)
        probe.get(timeout=30)
        if eventually(lambda: (row := store.task(probe.id)) is not None
                      and row.state == "SUCCESS", timeout=3):
            return
    pytest.fail("the recorder recorded no probe task")


def send_revoked(cluster, task, *args):
    """A task that the worker revokes: its id is revoked before it is sent."""
    task_id = str(uuid.uuid4())
    replies = cluster.app.control.revoke(task_id, destination=[W1],
                                         reply=True, timeout=5)
    assert replies, "the worker did not confirm the revoke"
    task.apply_async(args, task_id=task_id)
    return task_id


@pytest.fixture(scope="module")
def mix(setup):
    """Run the task mix once; return what each task should look like."""
    cluster, _recorder, store = setup
    wait_recorded(store, cluster)
    m = cluster.module
    since = time.time()
    expected = {}  # task id -> (name, worker, state)
    waiting = []
    for i in range(4):
        waiting.append((m.add.delay(i, i), "cmapp.add", W1, "SUCCESS"))
    for _ in range(2):
        waiting.append((m.fail.delay(), "cmapp.fail", W1, "FAILURE"))
        waiting.append((m.flaky.delay(), "cmapp.flaky", W1, "SUCCESS"))
        waiting.append((m.sleep.delay(SLEEP_S), "cmapp.sleep", W1,
                        "SUCCESS"))
    waiting.append((m.hopeless.delay(), "cmapp.hopeless", W1, "FAILURE"))
    for i in range(3):
        waiting.append((m.add.apply_async((i, 1), queue=SECOND_QUEUE),
                        "cmapp.add", W2, "SUCCESS"))
    waiting.append((m.fail.apply_async(queue=SECOND_QUEUE), "cmapp.fail",
                    W2, "FAILURE"))
    for i in range(2):
        task_id = send_revoked(cluster, m.add, i, 2)
        expected[task_id] = ("cmapp.add", W1, "REVOKED")
    for result, name, worker, state in waiting:
        result.get(timeout=60, propagate=False)
        expected[result.id] = (name, worker, state)

    def all_recorded():
        rows = {task_id: store.task(task_id) for task_id in expected}
        done = all(row is not None and row.state == expected[tid][2]
                   and row.worker is not None
                   for tid, row in rows.items())
        return rows if done else None

    until = time.time()  # every task of the mix was sent by now
    rows = eventually(all_recorded)
    assert rows, {tid: store.task(tid) for tid in expected}
    return since, until, expected, rows


def test_every_task_has_one_row_with_its_name_worker_and_state(mix):
    _since, _until, expected, rows = mix
    found = {tid: (row.name, row.worker, row.state)
             for tid, row in rows.items()}
    assert found == expected


def test_times_follow_the_lifecycle(mix):
    _since, _until, expected, rows = mix
    for task_id, row in rows.items():
        assert row.sent is not None and row.finished is not None, row
        if row.state == "REVOKED":
            # Revoked on arrival: never received as runnable, never run.
            assert row.started is None, row
            continue
        assert row.sent <= row.received <= row.started <= row.finished, row
        if row.state == "SUCCESS":
            assert row.runtime is not None and row.runtime >= 0, row


def test_retried_tasks_keep_one_row_in_their_last_state(mix, setup):
    since, until, _expected, rows = mix
    _cluster, _recorder, store = setup
    retried = {row.name: row for row in rows.values()
               if row.name in ("cmapp.flaky", "cmapp.hopeless")}
    assert retried["cmapp.flaky"].state == "SUCCESS"
    assert retried["cmapp.flaky"].runtime is not None
    assert retried["cmapp.hopeless"].state == "FAILURE"
    # Each attempt sent events under the same id: still one task each.
    assert store.query("tasks_sent", since, until, None,
                       ["cmapp.flaky", "cmapp.hopeless"], None) == 3


def test_sleeping_tasks_report_their_run_time(mix, setup):
    since, until, _expected, _rows = mix
    _cluster, _recorder, store = setup
    mean = store.query("mean_runtime", since, until, None,
                       ["cmapp.sleep"], None)
    assert mean >= SLEEP_S


def test_counts_are_exact(mix, setup):
    since, until, _expected, _rows = mix
    _cluster, _recorder, store = setup

    def q(fn, workers=None, tasknames=None, states=None, start=since,
          end=until):
        return store.query(fn, start, end, workers, tasknames, states)

    assert q("tasks_sent") == 17
    assert q("tasks") == 17
    assert q("tasks_succeeded") == 4 + 2 + 2 + 3
    assert q("tasks_failed") == 2 + 1 + 1
    assert q("tasks_revoked") == 2
    assert q("tasks_ready") == 17
    assert q("tasks_unready") == 0
    assert q("tasks", states=["FAILURE", "REVOKED"]) == 6
    assert q("tasks_sent", workers=[W2]) == 4
    assert q("tasks_failed", tasknames=["cmapp.fail"]) == 3
    assert q("tasks_succeeded", workers=[W1],
             tasknames=["cmapp.add", "cmapp.flaky"]) == 6
    assert q("tasks_sent", start=until + 1, end=until + 2) == 0
    assert q("mean_runtime", tasknames=["cmapp.nothing"]) is None


def test_every_function_agrees_with_the_definitions(mix, setup):
    since, until, _expected, _rows = mix
    _cluster, _recorder, store = setup
    records = store.records()
    shapes = [
        dict(workers=None, tasknames=None, states=None),
        dict(workers=[W1], tasknames=None, states=None),
        dict(workers=[W2], tasknames=["cmapp.add"], states=None),
        dict(workers=None, tasknames=["cmapp.sleep", "cmapp.flaky"],
             states=None),
    ]
    for fn in ALL_FUNCTIONS:
        for shape in shapes:
            got = store.query(fn, since, until, **shape)
            want = query_records(records, fn, since, until, **shape)
            assert got == pytest.approx(want), (fn, shape)
    got = store.query("tasks", since, until, None, None, ["RETRY"])
    assert got == 0


def test_mean_waittime_is_started_minus_sent(mix, setup):
    since, until, _expected, rows = mix
    _cluster, _recorder, store = setup
    waits = [row.started - row.sent for row in rows.values()
             if row.started is not None]
    assert waits and min(waits) >= 0
    # The probe tasks were sent before ``since`` and are not counted.
    got = store.query("mean_waittime", since, until, None, None, None)
    assert got == pytest.approx(sum(waits) / len(waits))


def test_sigterm_flushes_and_exits_zero(mix, setup):
    cluster, recorder, store = setup
    result = cluster.module.add.delay(40, 2)
    result.get(timeout=30)
    # Events after the last flush are written on the way out, so the
    # task is complete once the process has exited.
    eventually(lambda: store.task(result.id) is not None, timeout=10)
    assert recorder.stop() == 0, recorder.log()
    assert "stopped after" in recorder.log()
    assert store.task(result.id).state == "SUCCESS"


def test_events_wait_on_filesystem_while_the_recorder_is_down(
        mix, setup):
    cluster, recorder, store = setup
    if cluster.kind != "filesystem":
        pytest.skip("on Redis events published with no recorder are lost"
                    " (pub/sub); the recorder's docstring says so")
    if recorder.proc.poll() is None:
        recorder.stop()
    result = cluster.module.add.delay(20, 22)
    assert result.get(timeout=30) == 42
    recorder.start()
    row = eventually(lambda: (r := store.task(result.id)) is not None
                     and r.state == "SUCCESS" and r)
    assert row and row.worker == W1


def test_recorder_resumes_after_a_crash(mix, setup):
    cluster, recorder, store = setup
    if recorder.proc.poll() is None:
        recorder.stop(signal.SIGKILL)
    before = len(store.records())
    recorder.start()
    wait_recorded(store, cluster)
    result = cluster.module.add.delay(1, 2)
    result.get(timeout=30)
    row = eventually(lambda: (r := store.task(result.id)) is not None
                     and r.state == "SUCCESS" and r)
    assert row, recorder.log()
    assert len(store.records()) >= before + 2


def start_quiet_worker(cluster, name, queue):
    """A worker that sends no task events (no -E, events off in its
    config) but has its event dispatcher, as heartbeats are on."""
    cluster.start_worker(name, 1, events=False, heartbeat=True,
                         extra=("-Q", queue, "--",
                                "worker.send_task_events=False"))


def test_enable_events_switches_quiet_workers_on(mix, setup):
    cluster, recorder, store = setup
    start_quiet_worker(cluster, "quiet1@test", "quiet1")
    assert "task events: OFF" in cluster.log("quiet1@test")
    silent = cluster.module.add.apply_async((2, 3), queue="quiet1")
    silent.get(timeout=30)
    if recorder.proc.poll() is None:
        recorder.stop()
    recorder.start("--enable-events")
    assert "asked every worker to send task events" in recorder.log()
    # Probes reach SUCCESS only once the worker sends task events.
    wait_recorded(store, cluster, queue="quiet1")
    # Before that, only the publisher's task-sent event was seen.
    row = store.task(silent.id)
    assert row.state == "PENDING" and row.worker is None, row
    # A worker that comes online later is switched on too.
    start_quiet_worker(cluster, "quiet2@test", "quiet2")
    wait_recorded(store, cluster, queue="quiet2")
    assert "asked quiet2@test to send task events" in recorder.log()
