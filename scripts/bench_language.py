"""Benchmark of the checker on hostile input.

For each hostile file (1 MB, or the largest a policy may be), the time of
``cmpolicy check`` end to end (a new process) and of the checker in this
process, against Python's own ``compile()`` of the same text in a new
process as the baseline. The checker must answer with a policy error in
under a second, whatever the input.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1024 * 1024
HEAD = "policy:\n    schedule:\n        crontab()\n    apply:\n"


def hostile_inputs() -> dict[str, str]:
    line = "        x = " + "a+" * 400 + "a\n"
    return {
        "1 MB of statements": HEAD + "        x = 1\n" * (MB // 14),
        "1 MB of open brackets": HEAD + "        x = " + "(" * MB,
        "1 MB number literal": HEAD + "        x = " + "9" * MB,
        "1 MB of unary minus": HEAD + "        x = " + "-" * MB + "1",
        "1 MB unclosed string": HEAD + '        x = """' + "a" * MB,
        "64 KB of long chains": HEAD + line * (60_000 // len(line)),
        "64 KB of nested ifs": HEAD + "".join(
            " " * (8 + 4 * i) + "if x:\n" for i in range(95)),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=5)


def _timed(command: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, timeout=120)
    return time.perf_counter() - started, result.returncode


def run(args: argparse.Namespace) -> dict:
    from sandboxhost.language import check

    folder = Path(tempfile.mkdtemp(prefix="cm-bench-language-"))
    rows = {}
    print(f"{'input':<24} {'check ms':>9} {'cmpolicy s':>11}"
          f" {'compile s':>10} {'exit':>5}")
    for name, text in hostile_inputs().items():
        path = folder / (name.replace(" ", "-") + ".policy")
        path.write_text(text)
        in_process = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            found = check(text, str(path))
            in_process.append(time.perf_counter() - started)
        assert found, name
        cli = [_timed([sys.executable, "-m", "manager.cli", "check",
                       str(path)]) for _ in range(args.repeat)]
        base = [_timed([sys.executable, "-c",
                        "import sys; compile(open(sys.argv[1]).read(),"
                        " 'x', 'exec')", str(path)])
                for _ in range(args.repeat)]
        rows[name] = {
            "check_ms_p50": round(statistics.median(in_process) * 1000, 2),
            "cmpolicy_s_p50": round(statistics.median(t for t, _ in cli), 3),
            "cmpolicy_exit": cli[0][1],
            "compile_s_p50": round(statistics.median(t for t, _ in base), 3),
            "first_error": found[0].message[:60],
        }
        row = rows[name]
        print(f"{name:<24} {row['check_ms_p50']:>9.2f}"
              f" {row['cmpolicy_s_p50']:>11.3f} {row['compile_s_p50']:>10.3f}"
              f" {row['cmpolicy_exit']:>5}")
    worst = max(r["cmpolicy_s_p50"] for r in rows.values())
    return {"bench": "language", "inputs": rows, "worst_cmpolicy_s": worst,
            "meets_target": worst < 1.0 and all(r["cmpolicy_exit"] == 1
                                                for r in rows.values())}
