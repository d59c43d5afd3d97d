"""The event recorder, ``cmevents``: Celery task events into the store.

Each task event becomes a ``TaskUpdate``; updates for one task are merged
(``merge``, pure) while a batch fills, and the batch is written in one
transaction every ``FLUSH_INTERVAL_S`` or ``FLUSH_EVENTS`` events, whichever
comes first. The store merges a batch into existing rows by the same rules,
so events may arrive out of order, twice, or across batches:

- sent, received and started are the earliest seen; finished the latest
  terminal event (succeeded, failed, revoked);
- the state is that of the event with the latest timestamp, ties broken by
  lifecycle order (sent, received, started, retried, then the terminal
  states);
- the run time comes from the latest terminal event that carries one
  (Celery puts it on task-succeeded only);
- the name is the first one seen; the worker is that of the latest event
  sent by a worker (a retried task may move), never the publisher's.

A retried task keeps its id, so its row spans every attempt: sent and
started are the first attempt's, the state and run time the last one's.

What is lost when the recorder is down depends on the broker. On
``filesystem://`` the recorder listens on a fixed queue
(``celeryev.cm-recorder``), so events wait as files and are recorded when
it comes back. On Redis events travel by pub/sub, and those published while
no recorder listens are lost; the same holds for the auto-deleted queue on
RabbitMQ. A crash (SIGKILL) loses the batch not yet written, at most
``FLUSH_INTERVAL_S`` worth of events.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable

from celery import Celery
from celery.events.receiver import EventReceiver
from kombu.exceptions import KombuError
from kombu.utils.url import maybe_sanitize_url

from manager.config import default_state_dir, load_app
from manager.errors import ConfigurationError, StoreError
from manager.store import Store, TaskUpdate
from manager.store_schema import ID_CHARS, NAME_CHARS

logger = logging.getLogger(__name__)

RECORDER_NODE_ID = "cm-recorder"
FLUSH_INTERVAL_S = 0.5
FLUSH_EVENTS = 5000
# While the store refuses writes, batches pile up in memory; past this
# many tasks the oldest batch is dropped (and said so) rather than the
# process growing without bound.
MAX_PENDING_TASKS = 200_000
# How long one wait for the broker may block, so that an idle recorder
# still flushes on time and notices a stop request.
DRAIN_TIMEOUT_S = 0.1
RECONNECT_MAX_WAIT_S = 10.0
ENABLE_EVENTS_AGAIN_S = 3.0
DEFAULT_RETENTION_DAYS = 7.0
SECONDS_PER_DAY = 86_400.0
RETENTION_EVERY_S = 300.0
RETENTION_CHUNK_ROWS = 2000
# Pause between two delete chunks so the recorder's batch gets the lock.
RETENTION_PAUSE_S = 0.05

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# event type -> (state, lifecycle rank, the time column the event sets)
TASK_EVENTS: dict[str, tuple[str, int, str | None]] = {
    "task-sent": ("PENDING", 0, "sent"),
    "task-received": ("RECEIVED", 1, "received"),
    "task-started": ("STARTED", 2, "started"),
    "task-retried": ("RETRY", 3, None),
    "task-succeeded": ("SUCCESS", 4, "finished"),
    "task-failed": ("FAILURE", 5, "finished"),
    "task-revoked": ("REVOKED", 6, "finished"),
}


# -- events to updates (pure) ---------------------------------------------------

def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _name(value) -> str | None:
    if isinstance(value, str) and value:
        return value[:NAME_CHARS]
    return None


def task_update(event: dict) -> TaskUpdate | None:
    """The update one task event makes; None for other or malformed events."""
    kind = TASK_EVENTS.get(event.get("type"))
    task_id, at = event.get("uuid"), event.get("timestamp")
    if kind is None or not isinstance(task_id, str) or not task_id \
            or len(task_id) > ID_CHARS or not _number(at):
        return None
    state, rank, column = kind
    at = float(at)
    update = TaskUpdate(task_id=task_id, state=state, state_at=at,
                        state_rank=rank, name=_name(event.get("name")))
    if column is not None:
        setattr(update, column, at)
    # task-sent's hostname is the publisher's, not a worker's.
    if event["type"] != "task-sent":
        worker = _name(event.get("hostname"))
        if worker is not None:
            update.worker, update.worker_at = worker, at
    runtime = event.get("runtime")
    if column == "finished" and _number(runtime):
        update.runtime = float(runtime)
    return update


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return b if b < a else a


def _latest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return b if b > a else a


def _runtime(old: TaskUpdate, new: TaskUpdate) -> float | None:
    if new.finished is None and old.finished is None:
        return _latest(old.runtime, new.runtime)
    if new.finished is None:
        return old.runtime
    if old.finished is None or new.finished > old.finished:
        return new.runtime
    if new.finished < old.finished:
        return old.runtime
    return _latest(old.runtime, new.runtime)


def _newer_worker(old: TaskUpdate, new: TaskUpdate) -> bool:
    if new.worker is None:
        return False
    if old.worker is None:
        return True
    if new.worker_at is None or old.worker_at is None:
        return False  # as in SQL, where a comparison with NULL is false
    if new.worker_at != old.worker_at:
        return new.worker_at > old.worker_at
    return new.worker > old.worker


def merge(old: TaskUpdate, new: TaskUpdate) -> TaskUpdate:
    """Two updates of one task as one, by the rules in the module doc.

    The store applies the same rules in SQL (``manager.store``); the
    result does not depend on the order of the updates except for the
    name, where the first one seen stays.
    """
    if old.task_id != new.task_id:
        raise ValueError(f"cannot merge task {new.task_id!r} into"
                         f" {old.task_id!r}")
    newer = (new.state_at, new.state_rank) > (old.state_at, old.state_rank)
    by_state = new if newer else old
    by_worker = new if _newer_worker(old, new) else old
    return TaskUpdate(
        task_id=old.task_id, state=by_state.state,
        state_at=by_state.state_at, state_rank=by_state.state_rank,
        name=old.name if old.name is not None else new.name,
        worker=by_worker.worker, worker_at=by_worker.worker_at,
        sent=_earliest(old.sent, new.sent),
        received=_earliest(old.received, new.received),
        started=_earliest(old.started, new.started),
        finished=_latest(old.finished, new.finished),
        runtime=_runtime(old, new))


def fold(events: Iterable[dict]) -> dict[str, TaskUpdate]:
    """Task events merged per task id, in order of first appearance."""
    merged: dict[str, TaskUpdate] = {}
    for event in events:
        update = task_update(event)
        if update is None:
            continue
        known = merged.get(update.task_id)
        merged[update.task_id] = update if known is None \
            else merge(known, update)
    return merged


# -- batching --------------------------------------------------------------------

class Recorder:
    """Collects task events and writes them to the store in batches.

    Not thread-safe: one consumer loop feeds it and flushes it.
    """

    def __init__(self, store: Store, *,
                 flush_interval_s: float = FLUSH_INTERVAL_S,
                 flush_events: int = FLUSH_EVENTS,
                 max_pending_tasks: int = MAX_PENDING_TASKS,
                 on_worker_online: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.flush_events = flush_events
        self.max_pending_tasks = max_pending_tasks
        self.on_worker_online = on_worker_online
        self._clock = clock
        self._pending: dict[str, TaskUpdate] = {}
        self._pending_events = 0
        self._last_flush = clock()
        self.events_seen = 0
        self.tasks_written = 0
        self.failed_flushes = 0

    def on_event(self, event: dict) -> None:
        """Take one event from the receiver; flush when the batch is full."""
        kind = event.get("type", "")
        if kind.startswith("task-"):
            self.add(event)
        elif kind in ("worker-online", "worker-offline"):
            worker = event.get("hostname")
            logger.info("cmevents: %s is %s", worker, kind[7:])
            if kind == "worker-online" and self.on_worker_online \
                    and isinstance(worker, str):
                self.on_worker_online(worker)

    def add(self, event: dict) -> None:
        update = task_update(event)
        if update is None:
            logger.debug("cmevents: ignored event %.200r", event)
            return
        self.events_seen += 1
        self._pending_events += 1
        known = self._pending.get(update.task_id)
        self._pending[update.task_id] = update if known is None \
            else merge(known, update)
        if self._pending_events >= self.flush_events:
            self.flush()

    @property
    def pending(self) -> int:
        """Tasks waiting to be written."""
        return len(self._pending)

    def maybe_flush(self) -> int:
        """Flush when the batch is old enough; called on every loop turn."""
        if self._clock() - self._last_flush >= self.flush_interval_s:
            return self.flush()
        return 0

    def flush(self) -> int:
        """Write the batch; on a store error keep it for the next try."""
        self._last_flush = self._clock()
        if not self._pending:
            return 0
        batch = list(self._pending.values())
        try:
            self.store.upsert_tasks(batch)
        except StoreError as exc:
            self.failed_flushes += 1
            logger.warning("cmevents: could not write %d tasks (will retry):"
                           " %s", len(batch), exc)
            if len(batch) > self.max_pending_tasks:
                logger.error("cmevents: dropped %d tasks' events: the store"
                             " has refused writes for too long", len(batch))
                self._reset()
            return 0
        self._reset()
        self.tasks_written += len(batch)
        logger.debug("cmevents: wrote %d tasks", len(batch))
        return len(batch)

    def _reset(self) -> None:
        self._pending = {}
        self._pending_events = 0


# -- retention -------------------------------------------------------------------

class Retention(threading.Thread):
    """Deletes tasks older than the retention age, in small chunks.

    Each chunk is its own short transaction, with a pause between chunks,
    so the recorder's inserts are never held up for long.
    """

    def __init__(self, store: Store, retention_s: float, *,
                 every_s: float = RETENTION_EVERY_S,
                 chunk_rows: int = RETENTION_CHUNK_ROWS,
                 pause_s: float = RETENTION_PAUSE_S) -> None:
        super().__init__(name="cmevents-retention", daemon=True)
        self.store = store
        self.retention_s = retention_s
        self.every_s = every_s
        self.chunk_rows = chunk_rows
        self.pause_s = pause_s
        self.deleted = 0
        self._stop_requested = threading.Event()

    def run(self) -> None:
        while True:
            try:
                deleted = self.store.prune(
                    self.retention_s, chunk_rows=self.chunk_rows,
                    pause_s=self.pause_s,
                    should_stop=self._stop_requested.is_set)
            except StoreError as exc:
                logger.warning("cmevents: pruning old tasks failed (will"
                               " retry): %s", exc)
            else:
                self.deleted += deleted
                if deleted:
                    logger.info("cmevents: pruned %d tasks older than %.1f"
                                " days", deleted,
                                self.retention_s / SECONDS_PER_DAY)
            if self._stop_requested.wait(self.every_s):
                return

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop_requested.set()
        if self.is_alive():
            self.join(timeout_s)


# -- Celery I/O --------------------------------------------------------------------

class _Receiver(EventReceiver):
    """Celery's receiver, with a hook on every turn of the loop."""

    def __init__(self, *args, on_turn: Callable[[], object],
                 on_ready: Callable[[], object], stopping: threading.Event,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._on_turn = on_turn
        self._on_ready = on_ready
        self._stopping = stopping

    def on_consume_ready(self, connection, channel, consumers,
                         wakeup=True, **kwargs) -> None:
        super().on_consume_ready(connection, channel, consumers,
                                 wakeup=wakeup, **kwargs)
        self._on_ready()

    def on_iteration(self) -> None:
        self._on_turn()
        # Seen before the next wait for the broker, at most
        # DRAIN_TIMEOUT_S after a signal set it.
        self.should_stop = self._stopping.is_set()


def enable_events(app: Celery, destination: list[str] | None = None) -> None:
    """Ask workers to send task events (Celery's ``enable_events``)."""
    try:
        app.control.enable_events(destination=destination)
    except (KombuError, OSError) as exc:
        logger.warning("cmevents: could not ask %s to send task events: %s",
                       ", ".join(destination or ["the workers"]), exc)
    else:
        logger.info("cmevents: asked %s to send task events",
                    ", ".join(destination or ["every worker"]))


class EventSwitch:
    """Asks workers that come online to send task events.

    A worker announces itself (worker-online) a moment before it listens
    for broadcasts, so the request is sent at once and again
    ``ENABLE_EVENTS_AGAIN_S`` later; asking twice is harmless. A worker
    started with ``--without-heartbeat --without-gossip`` and without
    ``-E`` has no event dispatcher at all and cannot be switched on.
    """

    def __init__(self, app: Celery,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self._clock = clock
        self._again: list[tuple[float, str]] = []

    def worker_online(self, worker: str) -> None:
        enable_events(self.app, [worker])
        self._again.append((self._clock() + ENABLE_EVENTS_AGAIN_S, worker))

    def tick(self) -> None:
        """Send the requests that are due; called on every loop turn."""
        if not self._again:
            return
        now = self._clock()
        due = [worker for at, worker in self._again if at <= now]
        if due:
            self._again = [(at, w) for at, w in self._again if at > now]
            enable_events(self.app, sorted(set(due)))


def node_id_for(app: Celery) -> str | None:
    """A fixed receiver id where the broker keeps a queue for it."""
    if (app.conf.broker_url or "").startswith("filesystem://"):
        return RECORDER_NODE_ID
    return None  # a fresh id: a shared fixed queue would split the events


def announce(app: Celery, store: Store, node_id: str | None,
             events_enabled: bool) -> None:
    """Tell the user what the recorder needs from the cluster."""
    broker = maybe_sanitize_url(app.conf.broker_url or "")
    logger.info("cmevents: recording events from %s into %s", broker,
                store.safe_url)
    if not events_enabled:
        logger.info("cmevents: workers must send task events: start them"
                    " with -E (or set worker_send_task_events = True), or"
                    " run cmevents --enable-events to switch them on")
    logger.info("cmevents: publishers should set task_send_sent_event ="
                " True; without it tasks are matched, and wait time"
                " measured, from the time a worker received them")
    if not app.conf.task_send_sent_event:
        logger.warning("cmevents: this app does not set"
                       " task_send_sent_event")
    if node_id == RECORDER_NODE_ID:
        logger.info("cmevents: events wait in queue celeryev.%s while"
                    " cmevents is not running", node_id)
    else:
        logger.warning("cmevents: on this broker, events published while"
                       " cmevents is not running are lost")


def consume(app: Celery, recorder: Recorder, stopping: threading.Event, *,
            node_id: str | None = None,
            on_ready: Callable[[], object] = lambda: None,
            on_turn: Callable[[], object] = lambda: None) -> None:
    """Feed the recorder from the broker until ``stopping`` is set.

    A lost broker connection is logged and re-opened with a growing wait;
    events already batched are written in the meantime.
    """
    wait_s = DRAIN_TIMEOUT_S
    while not stopping.is_set():
        connection = app.connection_for_read()
        # kombu raises its OperationalError when it cannot connect.
        errors = (connection.connection_errors + connection.channel_errors
                  + (KombuError,))
        try:
            with connection:
                receiver = _Receiver(
                    connection, handlers={"*": recorder.on_event},
                    node_id=node_id, app=app,
                    on_turn=lambda: (recorder.maybe_flush(), on_turn()),
                    on_ready=on_ready, stopping=stopping)
                # Retry here, where a stop request is seen, not in kombu.
                receiver.connect_max_retries = 1
                for _ in receiver.consume(safety_interval=DRAIN_TIMEOUT_S):
                    wait_s = DRAIN_TIMEOUT_S
        except errors as exc:
            recorder.flush()
            logger.warning("cmevents: broker connection lost (%s); retrying"
                           " in %.1f s", exc, wait_s)
            stopping.wait(wait_s)
            wait_s = min(wait_s * 2, RECONNECT_MAX_WAIT_S)
    recorder.flush()


class RecorderThread(threading.Thread):
    """A recorder in a thread of this process (the pytest plugin's real
    cluster): its own store connection, set ``stopping`` to end it.
    ``ready`` is set once it consumes events."""

    def __init__(self, app: Celery, store_url: str,
                 stopping: threading.Event) -> None:
        super().__init__(name="cm-recorder", daemon=True)
        self.app = app
        self.store_url = store_url
        self.stopping = stopping
        self.ready = threading.Event()

    def run(self) -> None:
        store = Store(self.store_url)
        try:
            consume(self.app, Recorder(store), self.stopping,
                    node_id=node_id_for(self.app), on_ready=self.ready.set)
        finally:
            store.close()


# -- command line --------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from manager.cli import cluster_options
    parser = argparse.ArgumentParser(
        prog="cmevents", parents=[cluster_options()],
        description="Record Celery task events into the policy manager's"
        " store, for the stats API. Runs until SIGINT or SIGTERM.")
    parser.add_argument("--retention-days", type=float,
                        default=DEFAULT_RETENTION_DAYS,
                        help="delete tasks older than this; 0 keeps them"
                        " (default: %(default)s)")
    parser.add_argument("--enable-events", action="store_true",
                        help="ask workers to send task events, now and when"
                        " they come online")
    return parser


def cmevents_main(argv: list[str] | None = None) -> int:
    """Entry point of ``cmevents``."""
    args = _parser().parse_args(argv)
    from manager.cli import configure_logging
    configure_logging(args.verbose, default=logging.INFO)
    if args.retention_days < 0:
        logger.error("cmevents: --retention-days must be 0 or more")
        return EXIT_USAGE
    state_dir = args.state_dir or default_state_dir()
    try:
        app = load_app(args.app, args.broker, state_dir)
    except ConfigurationError as exc:
        logger.error("cmevents: %s", exc)
        return EXIT_USAGE
    try:
        store = Store(args.db, state_dir=state_dir)
    except StoreError as exc:
        logger.error("cmevents: %s", exc)
        return EXIT_FAILED

    # Start-up: say what is needed, switch events on if asked.
    node_id = node_id_for(app)
    announce(app, store, node_id, args.enable_events)
    switch = EventSwitch(app) if args.enable_events else None
    if switch is not None:
        enable_events(app)
    recorder = Recorder(store, on_worker_online=switch and
                        switch.worker_online)
    retention = None
    if args.retention_days > 0:
        retention = Retention(store, args.retention_days * SECONDS_PER_DAY)
        retention.start()

    # Run: a signal only sets the flag; the loop sees it within
    # DRAIN_TIMEOUT_S and the last batch is written on the way out.
    stopping = threading.Event()

    def _stop(signum, _frame) -> None:
        logger.info("cmevents: %s received, stopping",
                    signal.Signals(signum).name)
        stopping.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    ready = lambda: logger.info("cmevents: listening for events")  # noqa
    try:
        consume(app, recorder, stopping, node_id=node_id, on_ready=ready,
                on_turn=switch.tick if switch else lambda: None)
    finally:
        if retention is not None:
            retention.stop()
        store.close()
    if recorder.pending:
        logger.error("cmevents: %d tasks' events could not be written",
                     recorder.pending)
        return EXIT_FAILED
    logger.info("cmevents: stopped after %d events (%d task writes)",
                recorder.events_seen, recorder.tasks_written)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(cmevents_main())
