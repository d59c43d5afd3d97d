"""The real cluster: Celery remote control with tight replies.

Every broadcast that expects replies names its workers (``destination``)
and passes ``limit`` = their number, so it returns as soon as each answered
instead of waiting out the timeout; ``timeout`` is the idle time allowed
per reply. A worker that does not answer is an error that names it, and
the error says which workers did apply the change.

Task settings that policies change are remembered here, pushed to workers
that appear later (or restart), and restored on every worker by
``restore()`` when the manager stops.

Kombu and Celery errors (broker down, connection lost) are translated into
ClusterError at this boundary, chained to the original.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from celery import Celery

from manager.errors import (
    ClusterError,
    OperationRefused,
    UnknownName,
    WorkerUnreachable,
)

logger = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 1.0
DISCOVERY_TIMEOUT_S = 0.5
DIRECTORY_TTL_S = 5.0

_COUNTER_COMMANDS = {"subprocesses": "cm_pool", "prefetch": "cm_prefetch"}


class CeleryCluster:
    """The ``Cluster`` of ``manager.operations`` over Celery remote control."""

    def __init__(self, app: Celery, *, reply_timeout_s: float = REPLY_TIMEOUT_S,
                 discovery_timeout_s: float = DISCOVERY_TIMEOUT_S,
                 directory_ttl_s: float = DIRECTORY_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.app = app
        self.reply_timeout_s = reply_timeout_s
        self.discovery_timeout_s = discovery_timeout_s
        self.directory_ttl_s = directory_ttl_s
        self._clock = clock
        self._lock = threading.RLock()
        self._workers: dict[str, dict] = {}
        # Every worker seen since start: one of these that stops answering
        # is unreachable; a name never seen is unknown.
        self._ever_seen: set[str] = set()
        self._tasks: dict[str, set[str]] = {}
        self._seen_at = float("-inf")
        # (task names or None for all, setting) -> value, oldest first.
        self._desired: OrderedDict[tuple, Any] = OrderedDict()
        # worker -> the start token of the process the settings went to.
        self._synced: dict[str, str] = {}
        self._missing_ext_reported: set[str] = set()

    # -- transport boundary ----------------------------------------------------

    def _broadcast(self, command: str, *, arguments: dict | None = None,
                   destination: list[str] | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        """Send a command and collect ``{worker: reply}``."""
        limit = len(destination) if destination else None
        try:
            replies = self.app.control.broadcast(
                command, arguments=arguments or {}, destination=destination,
                reply=True, limit=limit,
                timeout=self.reply_timeout_s if timeout is None else timeout)
        except Exception as exc:  # kombu/redis/OS errors vary by transport
            raise ClusterError(f"cannot reach the broker for {command}:"
                               f" {exc}") from exc
        found: dict[str, Any] = {}
        for reply in replies or ():
            if isinstance(reply, dict):
                found.update(reply)
        return found

    def _ask(self, command: str, workers: list[str],
             arguments: dict | None = None) -> dict[str, Any]:
        """Ask named workers; every one must answer without error."""
        replies = self._broadcast(command, arguments=arguments,
                                  destination=workers)
        applied, failed, missing = {}, [], []
        for worker in workers:
            reply = replies.get(worker)
            if not isinstance(reply, dict):
                missing.append(worker)
            elif "error" in reply:
                failed.append(f"{worker}: {_explain(command, reply['error'])}")
            else:
                applied[worker] = reply.get("ok")
        if missing:
            self._forget(missing)
            live = self.live_workers()
            unknown = [w for w in missing
                       if w not in live and w not in self._ever_seen]
            if unknown:
                raise UnknownName(_unknown_workers(unknown, self._workers))
            done = ", ".join(applied) or "none"
            raise WorkerUnreachable(
                f"worker(s) {', '.join(missing)} did not answer within"
                f" {self.reply_timeout_s:g} s (applied on: {done})",
                missing=missing, applied=applied)
        if failed:
            # The workers answered and refused: the call was wrong for
            # them, not the cluster broken.
            done = ", ".join(applied) or "none"
            raise OperationRefused(f"{'; '.join(failed)} (applied on:"
                                   f" {done})")
        return applied

    # -- the worker directory ---------------------------------------------------

    def refresh(self) -> dict[str, dict]:
        """Find the workers that answer now; push settings to new ones."""
        replies = self._broadcast("cm_worker_state",
                                  timeout=self.discovery_timeout_s)
        if not replies:
            # A broadcast on Redis is pub/sub: a worker that is busy
            # re-subscribing (after a queue change) misses it. Ask once more
            # before concluding that no worker is up.
            replies = self._broadcast("cm_worker_state",
                                      timeout=self.reply_timeout_s)
        with self._lock:
            self._workers = {}
            for name, reply in replies.items():
                if isinstance(reply, dict) and "ok" in reply:
                    self._workers[name] = reply["ok"]
                else:
                    self._workers[name] = {}
                    if name not in self._missing_ext_reported:
                        self._missing_ext_reported.add(name)
                        logger.warning(
                            "worker %s does not load manager.worker_ext"
                            " (start it with --include manager.worker_ext);"
                            " policies cannot change it", name)
            self._ever_seen.update(self._workers)
            self._seen_at = self._clock()
        self._sync_new_workers()
        return dict(self._workers)

    def live_workers(self, *, fresh: bool = False) -> list[str]:
        with self._lock:
            stale = self._clock() - self._seen_at > self.directory_ttl_s
        if fresh or stale:
            self.refresh()
        return sorted(self._workers)

    def _forget(self, workers: list[str]) -> None:
        with self._lock:
            self._seen_at = float("-inf")
            for worker in workers:
                self._synced.pop(worker, None)

    def _select(self, workers: list[str] | None) -> list[str]:
        if workers is not None:
            return list(dict.fromkeys(workers))
        live = self.live_workers()
        if not live:
            raise WorkerUnreachable("no worker answers", missing=[])
        return live

    # -- the Cluster protocol ---------------------------------------------------

    def worker_names(self) -> list[str]:
        return self.live_workers(fresh=True)

    def task_names(self) -> list[str]:
        """Every task type a live worker has registered (Celery's excluded)."""
        workers = self._select(None)
        names: set[str] = set()
        for worker, reply in self._ask("cm_task_settings", workers).items():
            self._tasks[worker] = set(reply["tasks"])
            names.update(reply["tasks"])
        return sorted(names)

    def _known_tasks(self, names: list[str]) -> None:
        """Refuse, before sending anything, task names no worker has."""
        unknown = [n for n in names if not any(n in t for t in
                                               self._tasks.values())]
        if unknown:
            workers = self._select(None)
            for worker, reply in self._ask("cm_task_settings",
                                           workers).items():
                self._tasks[worker] = set(reply["tasks"])
            unknown = [n for n in names if not any(n in t for t in
                                                   self._tasks.values())]
        if unknown:
            raise UnknownName(f"unknown task {unknown[0]!r}"
                              if len(unknown) == 1 else
                              f"unknown tasks {', '.join(map(repr, unknown))}")

    def get_task_setting(self, task: str, setting: str) -> Any:
        workers = self._select(None)
        replies = self._ask("cm_task_settings", workers,
                            {"task_names": [task]})
        for worker in sorted(replies):
            found = replies[worker]["tasks"]
            if task in found:
                return found[task][setting]
        raise UnknownName(f"unknown task {task!r}")

    def set_task_setting(self, tasks: list[str] | None, setting: str,
                         value: Any) -> dict[str, Any]:
        if tasks is not None:
            self._known_tasks(tasks)
        workers = self._select(None)
        key = (None if tasks is None else tuple(tasks), setting)
        with self._lock:
            self._desired.pop(key, None)
            self._desired[key] = value
        self._ask("cm_set_task_setting", workers,
                  {"task_names": tasks, "setting": setting, "value": value})
        return {worker: value for worker in workers}

    def get_worker(self, worker: str, what: str) -> Any:
        state = self._ask("cm_worker_state", [worker])[worker]
        return state[what]

    def change_worker(self, workers: list[str] | None, what: str,
                      by: int) -> dict[str, int]:
        selected = self._select(workers)
        replies = self._ask(_COUNTER_COMMANDS[what], selected, {"n": by})
        return {worker: state[what] for worker, state in replies.items()}

    def change_queues(self, workers: list[str] | None, action: str,
                      queue: str) -> dict[str, list[str]]:
        selected = self._select(workers)
        replies = self._ask("cm_queues", selected, {"action": action,
                                                    "queue": queue})
        return {worker: reply["queues"] for worker, reply in replies.items()}

    def queue_length(self, queue: str) -> int:
        try:
            with self.app.pool.acquire(block=True) as conn:
                with conn.channel() as channel:
                    try:
                        return int(channel.queue_declare(
                            queue=queue, passive=True).message_count)
                    except conn.channel_errors:
                        return 0  # no such queue: nothing waits in it
        except ClusterError:
            raise
        except Exception as exc:
            raise ClusterError(f"cannot read the length of queue {queue!r}:"
                               f" {exc}") from exc

    # -- remembered settings ----------------------------------------------------

    def _sync_new_workers(self) -> None:
        """Give workers that appeared (or restarted) the current settings."""
        with self._lock:
            if not self._desired:
                return
            pending = [w for w, state in self._workers.items()
                       if state and self._synced.get(w) != state.get("started")]
            desired = list(self._desired.items())
        for worker in pending:
            try:
                for (tasks, setting), value in desired:
                    self._ask("cm_set_task_setting", [worker], {
                        "task_names": None if tasks is None else list(tasks),
                        "setting": setting, "value": value})
            except ClusterError as exc:
                logger.warning("could not give worker %s the current task"
                               " settings: %s", worker, exc)
                continue
            with self._lock:
                self._synced[worker] = self._workers[worker].get("started")
            logger.info("gave worker %s the %d task setting(s) policies"
                        " changed", worker, len(desired))

    def restore(self) -> list[str]:
        """Put every changed task setting back on every live worker."""
        with self._lock:
            had = bool(self._desired)
            self._desired.clear()
        workers = self.live_workers(fresh=True)
        if not workers or not had:
            return []
        try:
            self._ask("cm_restore_task_settings", workers,
                      {"task_names": None})
        except ClusterError as exc:
            logger.error("could not restore task settings on every worker:"
                         " %s", exc)
            raise
        logger.info("restored task settings on %s", ", ".join(workers))
        return workers


def _unknown_workers(unknown: list[str], known: dict) -> str:
    names = ", ".join(sorted(known)) or "none"
    if len(unknown) == 1:
        return f"unknown worker {unknown[0]!r}; known: {names}"
    return f"unknown workers {', '.join(map(repr, unknown))}; known: {names}"


def _explain(command: str, error: str) -> str:
    if "KeyError" in str(error) and command.startswith("cm_"):
        return ("the worker does not load manager.worker_ext (start it"
                " with --include manager.worker_ext)")
    return str(error)
