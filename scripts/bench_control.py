"""Benchmark of the control path on Redis, with 1 and 3 real workers.

For the same change made the same number of times, the median latency of
a raw ``app.control.broadcast(..., destination=..., limit=N)`` (baseline)
and of our operation (validation, tenant scope and Celery control through
``manager.operations.Operations``), interleaved so that machine noise hits
both alike. Changes: prefetch +1/-1 on every worker, and a task's rate
limit. Starts its own redis-server on a free loopback port and its own
prefork workers, and stops them at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reps", type=int, default=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (scripts/test"
                         " installs it)")
    port = _free_port()
    proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port",
                             str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(folder)],
                            stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def _start_worker(name: str, env: dict, folder: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench_app", "worker", "-n",
         name, "-c", "1", "-P", "prefork", "--include", "manager.worker_ext",
         "--without-mingle", "--without-gossip", "--loglevel", "WARNING"],
        env=env, cwd=HERE, stdout=open(folder / f"{name}.log", "w"),
        stderr=subprocess.STDOUT, start_new_session=True)


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def run(args: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="cm-bench-control-"))
    redis, url = _start_redis(folder)
    env = {**os.environ, "CM_BENCH_BROKER": url,
           "CMPOLICY_STATE_DIR": str(folder),
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    os.environ.update({"CM_BENCH_BROKER": url,
                       "CMPOLICY_STATE_DIR": str(folder)})
    sys.path.insert(0, str(HERE))
    import bench_app
    from manager.control import CeleryCluster
    from manager.mailer import Mailer
    from manager.operations import Operations
    from manager.simcluster import SimulatedCluster

    app = bench_app.app
    workers: dict[str, subprocess.Popen] = {}
    results = {}
    try:
        for count in (1, 3):
            while len(workers) < count:
                name = f"b{len(workers) + 1}@bench"
                workers[name] = _start_worker(name, env, folder)
            names = sorted(workers)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                replies = app.control.ping(destination=names, timeout=0.5)
                if replies and len(replies) == count:
                    break
            cluster = CeleryCluster(app)
            cluster.refresh()
            ops = Operations(cluster, SimulatedCluster(), Mailer(None))
            samples = {k: [] for k in ("raw_prefetch", "ours_prefetch",
                                       "raw_rate_limit", "ours_rate_limit")}
            for rep in range(args.reps + 3):
                step = 1 if rep % 2 == 0 else -1
                timings = {}
                started = time.perf_counter()
                app.control.broadcast("cm_prefetch", arguments={"n": step},
                                      destination=names, reply=True,
                                      limit=count, timeout=1.0)
                timings["raw_prefetch"] = time.perf_counter() - started
                started = time.perf_counter()
                ops("workers.change", {"workers": names, "what": "prefetch",
                                       "by": -step})
                timings["ours_prefetch"] = time.perf_counter() - started
                limit = f"{rep + 1}/m"
                started = time.perf_counter()
                app.control.broadcast("rate_limit", arguments={
                    "task_name": "bench.noop", "rate_limit": limit},
                    destination=names, reply=True, limit=count, timeout=1.0)
                timings["raw_rate_limit"] = time.perf_counter() - started
                started = time.perf_counter()
                ops("tasks.set", {"tasks": ["bench.noop"],
                                  "setting": "rate_limit", "value": limit})
                timings["ours_rate_limit"] = time.perf_counter() - started
                if rep >= 3:  # warm-up turns are not counted
                    for key, value in timings.items():
                        samples[key].append(value)
            cluster.restore()
            row = {k: _median_ms(v) for k, v in samples.items()}
            row["prefetch_ratio"] = round(row["ours_prefetch"]
                                          / row["raw_prefetch"], 2)
            row["rate_limit_ratio"] = round(row["ours_rate_limit"]
                                            / row["raw_rate_limit"], 2)
            results[f"{count}_workers"] = row
    finally:
        for proc in workers.values():
            proc.send_signal(signal.SIGTERM)
        for proc in workers.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        redis.terminate()
        redis.wait(10)
    print(f"{'workers':<9} {'change':<11} {'raw p50 ms':>11} {'ours p50 ms':>12}"
          f" {'ratio':>6}")
    for key, row in results.items():
        for change in ("prefetch", "rate_limit"):
            print(f"{key.split('_')[0]:<9} {change:<11}"
                  f" {row['raw_' + change]:>11.2f}"
                  f" {row['ours_' + change]:>12.2f}"
                  f" {row[change + '_ratio']:>6.2f}")
    worst = max(max(r["prefetch_ratio"], r["rate_limit_ratio"])
                for r in results.values())
    return {"bench": "control", "broker": "redis", "reps": args.reps,
            "results": results, "worst_ratio": worst,
            "meets_target": worst <= 1.5}
