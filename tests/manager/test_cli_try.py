"""``cmpolicy try``: a policy run once through the real sandbox."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "cluster.json"
NOW = "2026-12-04T10:00"


def cmpolicy(*args):
    return subprocess.run([sys.executable, "-m", "manager.cli", *args],
                          capture_output=True, text=True, timeout=60)


def test_every_example_runs_against_the_fixture(examples):
    for path in examples:
        result = cmpolicy("try", str(path), "--cluster", str(FIXTURE),
                          "--now", NOW)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "result:    ok" in result.stdout


def test_json_report_shows_calls_and_their_results(examples):
    grow = next(p for p in examples if p.name == "grow-on-wait.policy")
    result = cmpolicy("try", str(grow), "--cluster", str(FIXTURE),
                      "--now", NOW, "--json")
    data = json.loads(result.stdout)
    assert data["condition"] is True and data["applied"] is True
    assert data["schedule"] == "crontab */10 * mon-fri * * (UTC)"
    assert data["calls"][-1] == {
        "op": "workers.change",
        "args": {"workers": ["w1@node1"], "what": "subprocesses", "by": 1},
        "ok": True, "value": {"w1@node1": 3}, "error": None}


def test_emails_are_recorded_not_sent(examples):
    nightly = next(p for p in examples
                   if p.name == "nightly-report-missing.policy")
    data = json.loads(cmpolicy("try", str(nightly), "--cluster",
                               str(FIXTURE), "--now", NOW, "--json").stdout)
    assert data["emails"] == [{
        "subject": "nightly_export did not run",
        "from_email": "celery-policies@example.com",
        "recipient_list": ["oncall@example.com"],
        "message": "No successful reports.tasks.nightly_export between"
                   " 02:00 and 03:00."}]


def test_failing_policy_names_its_line_and_exits_1(tmp_path):
    path = tmp_path / "bad.policy"
    path.write_text("policy:\n    schedule:\n        crontab()\n"
                    "    apply:\n        x = 1\n"
                    "        workers['nope@x'].prefetch.increment()\n")
    result = cmpolicy("try", str(path), "--cluster", str(FIXTURE))
    assert result.returncode == 1
    assert (f"error:     {path}:6: in apply: unknown worker"
            " 'nope@x'; known: w1@node1, w2@node1 (UnknownName)") \
        in result.stdout
    assert result.stderr == ""


def test_a_fixture_with_wrong_types_is_a_usage_error(tmp_path, examples):
    fixture = tmp_path / "c.json"
    fixture.write_text('{"queues": {"celery": "ten"}}')
    result = cmpolicy("try", str(examples[0]), "--cluster", str(fixture))
    assert result.returncode == 2
    assert "queues.celery must be a whole number" in result.stderr


def test_syntax_errors_are_printed_like_check(tmp_path):
    path = tmp_path / "bad.policy"
    path.write_text("policy:\n    schedule:\n        crontab()\n"
                    "    apply:\n        import os\n")
    result = cmpolicy("try", str(path))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{path}:5:9: error: import is not"
                                    " allowed")


def test_bad_schedule_data_is_a_schedule_error(tmp_path):
    path = tmp_path / "bad.policy"
    path.write_text("policy:\n    schedule:\n        crontab(minute=99)\n"
                    "    apply:\n        pass\n")
    result = cmpolicy("try", str(path))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{path}:3: error: in schedule: crontab:")


@pytest.mark.parametrize("args", [
    ["try"], ["try", "x.policy", "--now", "yesterday"],
    ["try", "missing.policy"],
    ["try", "x.policy", "--cluster", "missing.json"],
])
def test_usage_errors_exit_2(args, tmp_path):
    (tmp_path / "x.policy").write_text("policy:\n")
    result = subprocess.run([sys.executable, "-m", "manager.cli", *args],
                            capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 2
