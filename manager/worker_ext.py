"""Control commands that workers load: ``--include manager.worker_ext``.

Users put this module path in their worker command lines; keep it stable.

Celery's control commands run in the worker's main process, but prefork
pool processes keep their own copies of task attributes. So every change
is made in three places:

- on the task objects of the main process, with what Celery captured from
  them rebuilt: the consumer's rate-limit buckets for ``rate_limit``, the
  request strategies (time limits, ``acks_late``) and tracers otherwise;
- in a shared memory page created when this module is imported (before
  the pool forks), which every pool process reads before each task: a
  version number, then the overrides as JSON. A pool process applies them
  to its own task objects when the version moved, so retries and anything
  read inside the task see the new values from the next task on;
- in the originals kept here, so ``cm_restore_task_settings`` puts every
  task back exactly as it was.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import threading
import time

from celery import signals
from celery.utils.time import rate
from celery.worker.control import control_command, inspect_command

logger = logging.getLogger(__name__)

SETTINGS = (
    "ignore_result", "routing_key", "exchange", "default_retry_delay",
    "rate_limit", "store_errors_even_if_ignored", "acks_late", "expires",
    "time_limit", "soft_time_limit",
)
# Captured by the consumer's request strategies when they are built.
_STRATEGY_SETTINGS = frozenset({"time_limit", "soft_time_limit", "acks_late"})
# Captured in each task's publishing options cache.
_PUBLISH_SETTINGS = frozenset({"routing_key", "exchange", "expires",
                               "time_limit", "soft_time_limit"})

_PAGE_BYTES = 1024 * 1024
_HEADER = struct.Struct("<QI")  # version, length of the JSON that follows

_lock = threading.Lock()
# Settings a policy changed, per task, with their values before the first
# change; the pool sees the current value of every setting ever touched,
# so a restore reaches the pool processes the same way a change does.
_originals: dict[str, dict[str, object]] = {}
_touched: dict[str, set[str]] = {}
_page = mmap.mmap(-1, _PAGE_BYTES, flags=mmap.MAP_SHARED)
_seen_version = 0
# Tells the manager when a worker of the same name is a new process that
# has not been given the current settings yet.
_STARTED = f"{os.getpid()}-{time.time():.6f}"


def _ok(value):
    return {"ok": value}


def _nok(message: str):
    return {"error": message}


def _publish(tasks) -> None:
    """Write the touched settings for pool processes: data, then version."""
    current = {name: {s: getattr(tasks[name], s, None) for s in settings}
               for name, settings in _touched.items() if name in tasks}
    data = json.dumps(current).encode()
    if len(data) > _PAGE_BYTES - _HEADER.size:
        raise ValueError("too many task settings to share with the pool")
    version, _ = _HEADER.unpack_from(_page, 0)
    _page[_HEADER.size:_HEADER.size + len(data)] = data
    _HEADER.pack_into(_page, 0, version + 1, len(data))


def _apply(task, setting: str, value) -> None:
    setattr(task, setting, value)
    if setting in _PUBLISH_SETTINGS:
        task._exec_options = None


@signals.task_prerun.connect
def _refresh_in_pool_process(sender=None, task=None, **kwargs):
    """Before each task in a pool process: pick up changed settings."""
    global _seen_version
    version, length = _HEADER.unpack_from(_page, 0)
    if version == _seen_version or task is None:
        return
    try:
        current = json.loads(bytes(_page[_HEADER.size:_HEADER.size + length]))
    except ValueError:
        return  # caught mid-write; the next task reads it whole
    tasks = task.app.tasks
    for name, settings in current.items():
        if name in tasks:
            for setting, value in settings.items():
                _apply(tasks[name], setting, value)
    _seen_version = version


def _task_values(task) -> dict:
    return {s: getattr(task, s, None) for s in SETTINGS}


def _selected(state, task_names):
    tasks = state.app.tasks
    if task_names is None:
        names = sorted(n for n in tasks if not n.startswith("celery."))
        return names, []
    known = [n for n in task_names if n in tasks]
    return known, [n for n in task_names if n not in tasks]


def _rebuild(state, settings: set) -> None:
    consumer = state.consumer
    if "rate_limit" in settings:
        consumer.reset_rate_limits()
    if settings - {"rate_limit"}:
        # Request classes and tracers captured the old values.
        consumer.update_strategies()


@inspect_command(args=[("task_names", list)])
def cm_task_settings(state, task_names=None, **kwargs):
    """The settings of the named tasks (all of this worker's when None)."""
    names, unknown = _selected(state, task_names)
    tasks = state.app.tasks
    return _ok({"tasks": {n: _task_values(tasks[n]) for n in names},
                "unknown": unknown})


@control_command(args=[("task_names", list), ("setting", str),
                       ("value", str)])
def cm_set_task_setting(state, task_names=None, setting=None, value=None,
                        **kwargs):
    """Set one setting on the named tasks (all when None)."""
    if setting not in SETTINGS:
        return _nok(f"unknown task setting {setting!r}")
    if setting == "rate_limit" and value:
        try:
            rate(value)  # Celery's own parser: refuse what it cannot read
        except (ValueError, KeyError, TypeError):
            return _nok(f"invalid rate limit {value!r:.60}")
    names, unknown = _selected(state, task_names)
    tasks = state.app.tasks
    with _lock:
        before = {n: getattr(tasks[n], setting, None) for n in names}
        for name in names:
            task = tasks[name]
            _originals.setdefault(name, {}).setdefault(
                setting, getattr(task, setting, None))
            _apply(task, setting, value)
            _touched.setdefault(name, set()).add(setting)
        try:
            _publish(tasks)
            _rebuild(state, {setting})
        except Exception as exc:  # keep the worker usable: undo the change
            for name, old in before.items():
                _apply(tasks[name], setting, old)
            _publish(tasks)
            _rebuild(state, {setting})
            logger.error("policy manager could not set %s: %s", setting, exc)
            return _nok(f"could not set {setting}: {exc}")
    logger.info("policy manager set %s=%r on %s", setting, value,
                ", ".join(names) or "no task")
    return _ok({"applied": names, "unknown": unknown})


@control_command(args=[("task_names", list)])
def cm_restore_task_settings(state, task_names=None, **kwargs):
    """Put the named tasks' settings (all changed when None) back."""
    tasks = state.app.tasks
    with _lock:
        names = sorted(_originals) if task_names is None else \
            [n for n in task_names if n in _originals]
        changed = set()
        for name in names:
            for setting, value in _originals.pop(name).items():
                if name in tasks:
                    _apply(tasks[name], setting, value)
                changed.add(setting)
        _publish(tasks)
        if changed:
            _rebuild(state, changed)
    logger.info("policy manager restored the settings of %s",
                ", ".join(names) or "no task")
    return _ok({"restored": names})


def _worker_state(consumer) -> dict:
    queues = [q.name for q in consumer.task_consumer.queues] \
        if consumer.task_consumer else []
    return {"subprocesses": consumer.pool.num_processes,
            "prefetch": consumer.qos.value, "queues": queues,
            "started": _STARTED}


@inspect_command()
def cm_worker_state(state, **kwargs):
    """Pool size, prefetch count and consumed queues, in one reply."""
    return _ok(_worker_state(state.consumer))


@control_command(args=[("n", int)])
def cm_pool(state, n=0, **kwargs):
    """Grow (n > 0) or shrink (n < 0) the pool; never below one process.

    Same effect as Celery's pool_grow / pool_shrink, prefetch included,
    with the floor checked and the new sizes in the reply.
    """
    consumer = state.consumer
    if consumer.controller.autoscaler:
        return _nok("the pool is autoscaled; change the autoscale range"
                    " instead")
    current = consumer.pool.num_processes
    if current + n < 1:
        return _nok(f"the pool has {current} process(es) and cannot go"
                    " below 1")
    try:
        if n > 0:
            consumer.pool.grow(n)
        elif n < 0:
            _shrink(consumer.pool, -n)
    except (ValueError, AttributeError, NotImplementedError) as exc:
        return _nok(f"cannot resize the pool: {exc}")
    consumer._update_prefetch_count(n)
    return _ok(_worker_state(consumer))


def _shrink(task_pool, n: int) -> None:
    """Remove n idle pool processes without killing one mid-read.

    With a blocking pool (brokers without an event loop, such as the
    filesystem transport) every pool process reads jobs from one shared
    queue under one lock, and an idle process usually sits inside that
    read, holding the lock. Celery's shrink kills idle processes; killing
    the holder leaves the lock taken forever and the pool never runs
    another task. Here each process to remove is sent an end-of-work
    marker through the queue instead: whichever idle process reads it
    leaves cleanly, lock released. Pools with their own queue per process
    (the event-loop pool, used with Redis) shrink the usual way.
    """
    from billiard.pool import Pool as BlockingPool
    from celery.concurrency.asynpool import AsynPool

    pool = task_pool._pool
    if not isinstance(pool, BlockingPool) or isinstance(pool, AsynPool):
        task_pool.shrink(n)
        return
    idle = list(pool._iterinactive())
    if len(idle) < n:
        raise ValueError("cannot shrink the pool: its processes are busy")
    for _ in range(n):
        pool._processes -= 1
        if pool._putlock:
            pool._putlock.shrink()
    # A process that reads the marker exits with status 1, which the pool
    # would log as a crash; these exits are asked for.
    for process in idle:
        process._controlled_termination = True
    for _ in range(n):
        pool._quick_put(None)


@control_command(args=[("n", int)])
def cm_prefetch(state, n=0, **kwargs):
    """Change the prefetch count by n; it never goes below 1.

    A prefetch count of 0 means unlimited and is left alone, as Celery's
    own QoS does.
    """
    qos = state.consumer.qos
    if n > 0:
        qos.increment_eventually(n)
    elif n < 0:
        qos.decrement_eventually(-n)
    qos.update()
    return _ok(_worker_state(state.consumer))


@control_command(args=[("action", str), ("queue", str)])
def cm_queues(state, action=None, queue=None, **kwargs):
    """Start (add) or stop (remove) consuming from a queue."""
    consumer = state.consumer
    current = _worker_state(consumer)["queues"]
    if action == "add":
        if queue not in current:
            consumer.call_soon(consumer.add_task_queue, queue, None,
                               "direct", None)
            current = current + [queue]
    elif action == "remove":
        if queue in current:
            consumer.call_soon(consumer.cancel_task_queue, queue)
            current = [q for q in current if q != queue]
    else:
        return _nok(f"unknown queue action {action!r}")
    return _ok({"queues": current})
