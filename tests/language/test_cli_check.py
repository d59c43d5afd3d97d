"""``cmpolicy check``: exit codes, text and JSON output."""

import json
import subprocess
import sys

import pytest

BAD = """\
policy:
    schedule:
        crontab()
    apply:
        type = "x"
        import os
"""


def cmpolicy(*args):
    return subprocess.run([sys.executable, "-m", "manager.cli", *args],
                          capture_output=True, text=True, timeout=60)


def test_examples_are_valid(examples):
    result = cmpolicy("check", *map(str, examples))
    assert (result.returncode, result.stdout) == (0, "")


def test_invalid_file_prints_every_error_and_exits_1(tmp_path):
    path = tmp_path / "bad.policy"
    path.write_text(BAD)
    result = cmpolicy("check", str(path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{path}:5:9: error: 'type' is not allowed",
        '    type = "x"',
        f"{path}:6:9: error: import is not allowed",
        "    import os",
    ]


def test_json_format_lists_errors_as_data(tmp_path):
    path = tmp_path / "bad.policy"
    path.write_text(BAD)
    result = cmpolicy("check", "--format", "json", str(path))
    assert result.returncode == 1
    assert json.loads(result.stdout)[1] == {
        "file": str(path), "section": "apply", "line": 6, "column": 9,
        "source_line": "        import os",
        "message": "import is not allowed"}


def test_one_bad_file_among_good_ones_fails_the_run(tmp_path, examples):
    path = tmp_path / "bad.policy"
    path.write_text(BAD)
    result = cmpolicy("check", str(examples[0]), str(path))
    assert result.returncode == 1


@pytest.mark.parametrize("args", [["check"], ["nosuch"], []])
def test_usage_errors_exit_2(args):
    assert cmpolicy(*args).returncode == 2


def test_missing_file_is_a_usage_error(tmp_path):
    result = cmpolicy("check", str(tmp_path / "missing.policy"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr


TYPO = """\
policy:
    schedule:
        crontab(minute="*/10")
    condition:
        stats.mean_waittime(interval=datetime.timedelta(hours=1)) > 60
    apply:
        w = workers["w1@node1"]
        w.subprocesses.incremnt()
        print(now().isoformat(), w.prefetch.get(), "x".upper())
"""


def test_an_attribute_nothing_has_is_a_warning_with_a_suggestion(tmp_path):
    path = tmp_path / "typo.policy"
    path.write_text(TYPO)
    result = cmpolicy("check", str(path))
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"{path}:8:24: warning: no value in a policy has an attribute"
        " 'incremnt'; did you mean 'increment'?",
        "    w.subprocesses.incremnt()",
    ]
    result = cmpolicy("check", "--format", "json", str(path))
    [warning] = json.loads(result.stdout)
    assert (warning["severity"], warning["section"], warning["line"],
            warning["column"]) == ("warning", "apply", 8, 24)


def test_a_file_with_errors_gets_no_warnings(tmp_path):
    path = tmp_path / "both.policy"
    path.write_text(TYPO + "        import os\n")
    result = cmpolicy("check", str(path))
    assert result.returncode == 1
    assert "warning" not in result.stdout
