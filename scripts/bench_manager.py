"""Benchmark of the manager loop: 10,000 due trivial policies, run once.

Phases, measured in one run:

1. load: the registry compiles every policy and evaluates its schedule
   section in a child (what a first start or a mass change costs);
2. run: the scheduler runs every due policy through the sandbox with N
   slots against a simulated cluster and records each run in SQLite.

Baseline: the same number of raw sandbox runs (Host.run of the same
compiled policy, no scheduler, no store) with the same slots, measured in
the same process; the report gives the ratio run / raw.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import threading
import time
from pathlib import Path

POLICY = """\
policy:
    schedule:
        crontab()
    apply:
        x = 1 + 1
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policies", type=int, default=10_000)
    parser.add_argument("--slots", type=int, default=2)


def _raw(host, wire, count: int, slots: int) -> float:
    remaining = [count]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            host.run(wire, handler=lambda op, args: None)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(slots)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict:
    from sandboxhost.host import Host
    from sandboxhost.language import check_and_compile
    from manager.mailer import Mailer
    from manager.registry import Registry
    from manager.runner import PolicyRunner
    from manager.scheduler import Scheduler
    from manager.simcluster import SimulatedCluster
    from manager.store import Store
    from manager.tenants import single_tenant

    count, slots = args.policies, args.slots
    start = dt.datetime(2026, 12, 4, 10, 0, 30, tzinfo=dt.timezone.utc)
    folder = Path(tempfile.mkdtemp(prefix="cm-bench-manager-"))
    store = Store(f"sqlite:///{folder / 'manager.db'}")
    with Host() as host:
        wire = check_and_compile(POLICY, "bench.policy").wire()
        _raw(host, wire, 200, slots)  # warm up
        raw_s = _raw(host, wire, count, slots)

        for i in range(count):
            store.upsert_policy(f"p{i:05d}", POLICY, now=start.timestamp())
        cluster = SimulatedCluster()
        cluster.add_worker("w1@bench")
        tenants = single_tenant()
        runner = PolicyRunner(host)
        registry = Registry(runner, store, tenants)
        clock = [start]
        scheduler = Scheduler(runner, registry, cluster=cluster,
                              stats=cluster, mailer=Mailer(None), store=store,
                              tenants=tenants, slots=slots,
                              clock=lambda: clock[0])
        began = time.perf_counter()
        registry.refresh(start)
        load_s = time.perf_counter() - began

        clock[0] = start + dt.timedelta(minutes=1)
        began = time.perf_counter()
        reports = scheduler.run_due_once()
        run_s = time.perf_counter() - began
    failed = sum(1 for r in reports if not r.ok)
    recorded = len(store.list_runs("p00000"))
    store.close()
    result = {
        "bench": "manager", "policies": count, "slots": slots,
        "load_s": round(load_s, 2), "run_s": round(run_s, 2),
        "total_s": round(load_s + run_s, 2),
        "raw_sandbox_s": round(raw_s, 2),
        "run_over_raw": round(run_s / raw_s, 2),
        "runs": len(reports), "failed": failed,
        "target_run_s": 60, "meets_target": run_s <= 60 and failed == 0
        and len(reports) == count and recorded == 1,
    }
    print(f"{'phase':<34} {'seconds':>9}")
    print(f"{'raw sandbox runs (baseline)':<34} {raw_s:>9.2f}")
    print(f"{'load (compile + schedule child)':<34} {load_s:>9.2f}")
    print(f"{'run all due (scheduler + store)':<34} {run_s:>9.2f}")
    print(f"run / raw = {run_s / raw_s:.2f}; {len(reports)} runs,"
          f" {failed} failed")
    return result
