#!/usr/bin/env python3
"""Benchmark of the event recorder and of the stats queries over SQLite.

1. Ingest: a synthetic stream of task events (sent, received, started,
   succeeded or failed, tasks overlapping as on a busy cluster) goes through
   the recorder's merge and batched writes into a fresh SQLite store;
   reported as events per second (target: 10,000 or more).
2. Queries: every stats function, over a store of ``--tasks`` tasks spread
   over a week, for a one-hour and a one-day window, alone and narrowed to
   a task name or a worker; p50 latency (target: 20 ms or less for the
   hour) against the same SQL forced to scan the table (``NOT INDEXED``),
   the baseline.

Prints a table, then one JSON line with every number.
Usage: scripts/bench_events.py [--tasks N] [--events N] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy.schema import CreateIndex, DropIndex  # noqa: E402

from manager.events import Recorder  # noqa: E402
from manager.store import STATS_COUNTS, Store, stats_statement  # noqa: E402
from manager.store_schema import TASK_INDEXES, tasks  # noqa: E402

logger = logging.getLogger("bench.events")

FUNCTIONS = STATS_COUNTS + ("mean_waittime", "mean_runtime")
TASK_NAMES = [f"proj.tasks.job{i:02d}" for i in range(20)]
WORKERS = [f"w{i}@node{i % 4}" for i in range(8)]
WEEK_S = 7 * 86_400.0
HOUR_S = 3600.0
DAY_S = 86_400.0
IN_FLIGHT_TASKS = 500
INSERT_CHUNK_ROWS = 50_000
SEED = 20261204
TARGET_EVENTS_PER_S = 10_000
TARGET_P50_MS = 20.0


# -- ingest --------------------------------------------------------------------------

def synthetic_events(count: int, rng: random.Random) -> list[dict]:
    """About ``count`` events of tasks that overlap: each task's four
    events are spread among the events of the next IN_FLIGHT_TASKS."""
    tasks_needed = count // 4
    base = time.time() - HOUR_S
    timeline = []
    for i in range(tasks_needed):
        task_id = f"{i:08x}-bench-0000-0000-000000000000"
        name = rng.choice(TASK_NAMES)
        worker = rng.choice(WORKERS)
        sent = base + i * 0.001
        received = sent + rng.uniform(0.0, 0.01)
        started = received + rng.uniform(0.0, 0.5)
        finished = started + rng.uniform(0.001, 2.0)
        ok = rng.random() < 0.95
        # Arrival position: tasks interleave, and the odd event comes late.
        slot = i + rng.uniform(0, IN_FLIGHT_TASKS)
        timeline += [
            (i, {"type": "task-sent", "uuid": task_id, "timestamp": sent,
                 "name": name, "hostname": "web@front"}),
            (slot * 0.3 + i * 0.7, {
                "type": "task-received", "uuid": task_id,
                "timestamp": received, "name": name, "hostname": worker}),
            (slot * 0.6 + i * 0.4, {
                "type": "task-started", "uuid": task_id,
                "timestamp": started, "hostname": worker}),
            (slot, {"type": "task-succeeded" if ok else "task-failed",
                    "uuid": task_id, "timestamp": finished,
                    "hostname": worker,
                    **({"runtime": finished - started} if ok else {})}),
        ]
    timeline.sort(key=lambda item: item[0])
    return [event for _pos, event in timeline]


def bench_ingest(folder: Path, count: int, rng: random.Random,
                 db_name: str = "ingest.db") -> dict:
    events = synthetic_events(count, rng)
    store = Store(f"sqlite:///{folder / db_name}")
    before = store.query("tasks_sent", None, None, None, None, None)
    recorder = Recorder(store)
    started = time.perf_counter()
    for event in events:
        recorder.on_event(event)
        # The consumer loop calls this between messages.
        recorder.maybe_flush()
    recorder.flush()
    elapsed_s = time.perf_counter() - started
    rows = store.query("tasks_sent", None, None, None, None, None)
    store.close()
    return {"events": len(events), "tasks": rows - before,
            "stored_before": before,
            "seconds": round(elapsed_s, 3),
            "events_per_s": round(len(events) / elapsed_s),
            "flush_events": recorder.flush_events,
            "flush_interval_s": recorder.flush_interval_s}


# -- queries ---------------------------------------------------------------------------

def fill(store: Store, count: int, now: float, rng: random.Random) -> float:
    """``count`` finished-or-not tasks over the week before ``now``.

    Rows go in without indexes, which are then built, as a long-running
    recorder would have them; returns the seconds taken.
    """
    started = time.perf_counter()
    with store._write("drop indexes") as conn:
        for index in TASK_INDEXES:
            conn.execute(DropIndex(index))
    states = ["SUCCESS"] * 90 + ["FAILURE"] * 5 + ["REVOKED"] * 2 + \
        ["STARTED"] * 2 + ["PENDING"]
    done = 0
    while done < count:
        rows = []
        for i in range(done, min(count, done + INSERT_CHUNK_ROWS)):
            sent = now - rng.uniform(0, WEEK_S)
            state = rng.choice(states)
            wait = rng.uniform(0, 2.0)
            run = rng.uniform(0.001, 5.0) if state == "SUCCESS" else None
            rows.append({
                "task_id": f"{i:012d}-fill", "name": rng.choice(TASK_NAMES),
                "worker": rng.choice(WORKERS), "state": state,
                "state_at": sent + wait + (run or 0.0), "state_rank": 4,
                "worker_at": sent, "sent": sent, "received": sent,
                "started": None if state == "PENDING" else sent + wait,
                "finished": sent + wait + (run or 0.0),
                "at": sent, "waittime": None if state == "PENDING" else wait,
                "runtime": run})
        with store._write("fill") as conn:
            conn.execute(tasks.insert(), rows)
        done += len(rows)
    with store._write("create indexes") as conn:
        for index in TASK_INDEXES:
            conn.execute(CreateIndex(index))
    return time.perf_counter() - started


def p50_ms(run, runs: int) -> float:
    run()  # warm the cache and the statement cache
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        run()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1e3


def full_scan_sql(fn: str, start: float, end: float, workers, tasknames,
                  states) -> str:
    """The same query as text, made to scan the table."""
    statement = stats_statement(fn, start, end, workers, tasknames, states)
    sql = str(statement.compile(compile_kwargs={"literal_binds": True}))
    assert "FROM tasks" in sql
    return sql.replace("FROM tasks", "FROM tasks NOT INDEXED", 1)


def bench_queries(folder: Path, count: int, runs: int, baseline_runs: int,
                  rng: random.Random) -> tuple[list[dict], float]:
    store = Store(f"sqlite:///{folder / 'queries.db'}")
    now = time.time()
    fill_s = fill(store, count, now, rng)
    shapes = [
        ("1h", HOUR_S, None, None),
        ("1h name", HOUR_S, None, [TASK_NAMES[3]]),
        ("1h worker", HOUR_S, [WORKERS[5]], None),
        ("1d", DAY_S, None, None),
        ("1d name", DAY_S, None, [TASK_NAMES[3]]),
    ]
    rows = []
    with store._read() as conn:
        for label, window_s, workers, tasknames in shapes:
            for fn in FUNCTIONS:
                states = ["FAILURE", "REVOKED"] if fn == "tasks" else None
                start, end = now - window_s, now

                def indexed(fn=fn, start=start, workers=workers,
                            tasknames=tasknames, states=states):
                    return store.query(fn, start, end, workers, tasknames,
                                       states)

                sql = full_scan_sql(fn, start, end, workers, tasknames,
                                    states)

                def scan(sql=sql):
                    return conn.exec_driver_sql(sql).scalar()

                fast, slow = indexed(), scan()
                if fast != slow and not (
                        isinstance(fast, float) and abs(fast - slow) < 1e-9):
                    raise RuntimeError(f"{fn} {label}: {fast} != {slow}")
                rows.append({
                    "query": f"{fn} {label}", "fn": fn, "shape": label,
                    "answer": fast,
                    "p50_ms": round(p50_ms(indexed, runs), 3),
                    "full_scan_p50_ms": round(p50_ms(scan, baseline_runs),
                                              3)})
    store.close()
    return rows, fill_s


def print_table(ingest: dict, rows: list[dict], tasks_count: int) -> None:
    print(f"ingest: {ingest['events']} events ({ingest['tasks']} tasks) in"
          f" {ingest['seconds']} s = {ingest['events_per_s']} events/s"
          f" (target >= {TARGET_EVENTS_PER_S})")
    print(f"\nqueries over {tasks_count} tasks (p50 ms; target <="
          f" {TARGET_P50_MS} for 1h windows)")
    print(f"{'query':<30} {'answer':>12} {'indexed':>9} {'full scan':>10}"
          f" {'speed-up':>9}")
    for row in rows:
        answer = row["answer"]
        shown = f"{answer:.3f}" if isinstance(answer, float) else answer
        ratio = row["full_scan_p50_ms"] / max(row["p50_ms"], 1e-6)
        print(f"{row['query']:<30} {shown!s:>12} {row['p50_ms']:>9.2f}"
              f" {row['full_scan_p50_ms']:>10.1f} {ratio:>8.0f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench events",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000,
                        help="stored tasks for the query benchmark")
    parser.add_argument("--events", type=int, default=200_000,
                        help="events in the ingest benchmark")
    parser.add_argument("--runs", type=int, default=50,
                        help="runs per indexed query (p50 of them)")
    parser.add_argument("--baseline-runs", type=int, default=3,
                        help="runs per full-scan query")
    parser.add_argument("--dir", type=Path, help="where the databases go"
                        " (default: a temporary folder, removed after)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose
                        else logging.WARNING)
    rng = random.Random(SEED)
    with tempfile.TemporaryDirectory(prefix="bench-events-") as scratch:
        folder = args.dir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("ingest.db", "queries.db"):
            for suffix in ("", "-wal", "-shm"):
                (folder / f"{name}{suffix}").unlink(missing_ok=True)
        ingest = bench_ingest(folder, args.events, rng)
        rows, fill_s = bench_queries(folder, args.tasks, args.runs,
                                     args.baseline_runs, rng)
        # The same stream into the full store: deeper indexes to update.
        ingest_full = bench_ingest(folder, args.events, rng, "queries.db")
    print_table(ingest, rows, args.tasks)
    print(f"ingest into the store of {ingest_full['stored_before']} tasks:"
          f" {ingest_full['events_per_s']} events/s")
    hour_p50s = [r["p50_ms"] for r in rows if r["shape"].startswith("1h")]
    report = {
        "bench": "events", "python": sys.version.split()[0],
        "cpus": os.cpu_count(), "ingest": ingest,
        "ingest_into_full_store": ingest_full,
        "stored_tasks": args.tasks, "fill_s": round(fill_s, 1),
        "queries": rows,
        "max_p50_ms_1h": max(hour_p50s),
        "targets_met": {
            "ingest": min(ingest["events_per_s"],
                          ingest_full["events_per_s"])
            >= TARGET_EVENTS_PER_S,
            "query_1h_p50": max(hour_p50s) <= TARGET_P50_MS},
    }
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
