"""Events to rows: the pure merge, and the recorder's batching."""

import pytest

from manager.errors import StoreError
from manager.events import Recorder, fold, merge, task_update
from manager.store import Store, TaskUpdate

TID = "2f1d6a3e-0000-4000-8000-000000000001"
WORKER = "w1@host"
PUBLISHER = "web@frontend"


def ev(kind, at, task_id=TID, **fields):
    """A task event as Celery's receiver hands it over."""
    event = {"type": f"task-{kind}", "uuid": task_id, "timestamp": at,
             "hostname": PUBLISHER if kind == "sent" else WORKER}
    event.update(fields)
    return event


LIFECYCLE = [
    ev("sent", 100.0, name="proj.resize"),
    ev("received", 101.0, name="proj.resize"),
    ev("started", 103.0),
    ev("succeeded", 110.0, runtime=7.0),
]


def row_of(events):
    return fold(events)[TID]


def expected_row(**changes):
    values = dict(task_id=TID, state="SUCCESS", state_at=110.0,
                  state_rank=4, name="proj.resize", worker=WORKER,
                  worker_at=110.0, sent=100.0, received=101.0,
                  started=103.0, finished=110.0, runtime=7.0)
    values.update(changes)
    return TaskUpdate(**values)


def test_a_lifecycle_makes_one_complete_row():
    assert row_of(LIFECYCLE) == expected_row()


@pytest.mark.parametrize("order", [[3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]])
def test_events_out_of_order_give_the_same_row(order):
    assert row_of([LIFECYCLE[i] for i in order]) == expected_row()


def test_duplicate_events_change_nothing():
    assert row_of(LIFECYCLE + LIFECYCLE[::-1]) == expected_row()


def test_the_publishers_hostname_is_not_the_worker():
    row = row_of([ev("sent", 100.0, name="proj.resize")])
    assert (row.worker, row.state, row.sent) == (None, "PENDING", 100.0)


def test_without_task_sent_the_task_is_matched_on_received():
    row = Store("sqlite://")
    row.upsert_tasks([row_of(LIFECYCLE[1:])])
    record = row.task(TID)
    assert record.matched_at == 101.0
    assert record.waittime == 2.0


def test_equal_timestamps_follow_the_lifecycle():
    events = [ev("succeeded", 5.0, runtime=0.0), ev("started", 5.0),
              ev("received", 5.0, name="t")]
    assert row_of(events).state == "SUCCESS"
    assert row_of(events[1:]).state == "STARTED"


def test_a_retried_task_keeps_its_first_times_and_ends_in_its_last_state():
    retried = [
        ev("sent", 100.0, name="proj.flaky"),
        ev("received", 100.5, name="proj.flaky"),
        ev("started", 101.0),
        ev("retried", 102.0, exception="Retry()"),
        ev("sent", 102.1, name="proj.flaky", hostname=WORKER),
        ev("received", 102.2, name="proj.flaky", hostname="w2@host"),
        ev("started", 105.0, hostname="w2@host"),
        ev("succeeded", 106.0, runtime=1.0, hostname="w2@host"),
    ]
    row = row_of(retried)
    assert (row.sent, row.received, row.started) == (100.0, 100.5, 101.0)
    assert (row.state, row.finished, row.runtime) == ("SUCCESS", 106.0, 1.0)
    assert row.worker == "w2@host"
    assert row_of(retried[::-1]) == row


def test_a_retry_seen_last_does_not_undo_a_later_success():
    row = row_of([ev("succeeded", 20.0, runtime=1.0), ev("retried", 10.0)])
    assert row.state == "SUCCESS"


def test_the_latest_terminal_event_sets_finished_and_runtime():
    row = row_of([ev("failed", 30.0), ev("succeeded", 20.0, runtime=4.0)])
    assert (row.state, row.finished, row.runtime) == ("FAILURE", 30.0, None)


def test_a_revoked_task_has_no_run_time():
    row = row_of([ev("sent", 1.0, name="t"), ev("revoked", 2.0,
                                                terminated=False)])
    assert (row.state, row.finished, row.runtime) == ("REVOKED", 2.0, None)


@pytest.mark.parametrize("event", [
    {"type": "task-sent"},
    {"type": "task-sent", "uuid": TID},
    {"type": "task-sent", "uuid": TID, "timestamp": "yesterday"},
    {"type": "task-sent", "uuid": TID, "timestamp": True},
    {"type": "task-sent", "uuid": 7, "timestamp": 1.0},
    {"type": "task-sent", "uuid": "x" * 256, "timestamp": 1.0},
    {"type": "task-rejected", "uuid": TID, "timestamp": 1.0},
    {"type": "worker-heartbeat", "hostname": WORKER, "timestamp": 1.0},
])
def test_malformed_or_foreign_events_are_ignored(event):
    assert task_update(event) is None


def test_long_names_are_cut_to_the_column_size():
    update = task_update(ev("received", 1.0, name="n" * 1000))
    assert len(update.name) == 255


def test_merging_two_tasks_is_a_bug():
    other = task_update(ev("sent", 1.0, task_id="other"))
    with pytest.raises(ValueError):
        merge(task_update(LIFECYCLE[0]), other)


# -- the recorder -------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FlakyStore:
    """Refuses writes while ``broken``; remembers the batches it took."""

    def __init__(self):
        self.broken = False
        self.batches = []

    def upsert_tasks(self, updates):
        if self.broken:
            raise StoreError("database is locked")
        self.batches.append(list(updates))
        return len(updates)


def many(n, kind="sent"):
    return [ev(kind, float(i), task_id=f"t{i}", name="t") for i in range(n)]


def test_a_full_batch_is_written_at_once():
    store = FlakyStore()
    recorder = Recorder(store, flush_events=3, clock=FakeClock())
    for event in many(7):
        recorder.on_event(event)
    assert [len(batch) for batch in store.batches] == [3, 3]
    assert recorder.pending == 1


def test_events_of_one_task_are_merged_before_writing():
    store = FlakyStore()
    recorder = Recorder(store, flush_events=4, clock=FakeClock())
    for event in LIFECYCLE:
        recorder.on_event(event)
    assert store.batches == [[expected_row()]]


def test_a_partial_batch_is_written_when_the_interval_passes():
    store, clock = FlakyStore(), FakeClock()
    recorder = Recorder(store, flush_interval_s=0.5, clock=clock)
    recorder.on_event(LIFECYCLE[0])
    clock.now = 0.4
    assert recorder.maybe_flush() == 0
    clock.now = 0.5
    assert recorder.maybe_flush() == 1
    assert recorder.pending == 0


def test_a_refused_batch_is_kept_and_written_later():
    store, clock = FlakyStore(), FakeClock()
    recorder = Recorder(store, clock=clock)
    store.broken = True
    recorder.on_event(LIFECYCLE[0])
    assert recorder.flush() == 0
    recorder.on_event(LIFECYCLE[3])
    store.broken = False
    assert recorder.flush() == 1
    assert store.batches[0][0].state == "SUCCESS"
    assert recorder.failed_flushes == 1


def test_a_store_refusing_writes_for_too_long_costs_the_batch_not_memory():
    store = FlakyStore()
    recorder = Recorder(store, max_pending_tasks=5, clock=FakeClock())
    store.broken = True
    for event in many(6):
        recorder.on_event(event)
    recorder.flush()
    assert recorder.pending == 0


def test_worker_online_events_are_passed_on():
    seen = []
    recorder = Recorder(FlakyStore(), on_worker_online=seen.append,
                        clock=FakeClock())
    recorder.on_event({"type": "worker-online", "hostname": WORKER})
    recorder.on_event({"type": "worker-heartbeat", "hostname": WORKER})
    recorder.on_event({"type": "worker-offline", "hostname": WORKER})
    assert seen == [WORKER]
    assert recorder.events_seen == 0


def test_batches_split_anywhere_give_the_row_of_one_batch(tmp_path):
    """Every split of the lifecycle over two batches, in both orders."""
    for cut in range(1, len(LIFECYCLE)):
        for first, second in ((LIFECYCLE[:cut], LIFECYCLE[cut:]),
                              (LIFECYCLE[cut:], LIFECYCLE[:cut])):
            store = Store("sqlite://")
            store.upsert_tasks(list(fold(first).values()))
            store.upsert_tasks(list(fold(second).values()))
            assert store.task(TID) == store_record(expected_row())
            store.close()


def store_record(update):
    from manager.stats import TaskRecord
    return TaskRecord(task_id=update.task_id, name=update.name,
                      worker=update.worker, state=update.state,
                      sent=update.sent, received=update.received,
                      started=update.started, finished=update.finished,
                      runtime=update.runtime)


# -- switching events on, and the command line ---------------------------------------

class FakeControl:
    def __init__(self):
        self.asked = []

    def enable_events(self, destination=None):
        self.asked.append(destination)


class FakeApp:
    def __init__(self):
        self.control = FakeControl()


def test_a_worker_coming_online_is_asked_now_and_once_more_later():
    from manager.events import ENABLE_EVENTS_AGAIN_S, EventSwitch
    app, clock = FakeApp(), FakeClock()
    switch = EventSwitch(app, clock=clock)
    switch.worker_online(WORKER)
    switch.tick()
    assert app.control.asked == [[WORKER]]
    clock.now = ENABLE_EVENTS_AGAIN_S
    switch.tick()
    switch.tick()
    assert app.control.asked == [[WORKER], [WORKER]]


@pytest.mark.parametrize("argv, code", [
    (["--retention-days", "-1"], 2),
    (["-A", "no_such_module_for_cmevents"], 2),
    (["--db", "nonsense://"], 1),
])
def test_bad_options_end_the_recorder_before_it_listens(tmp_path, argv,
                                                        code):
    from manager.events import cmevents_main
    assert cmevents_main(["--state-dir", str(tmp_path), *argv]) == code
