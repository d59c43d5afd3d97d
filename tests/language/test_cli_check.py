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
