"""The policy's layout: ``policy:``, then schedule, conditions, apply."""

import pytest

from sandboxhost.errors import PolicySyntaxError
from sandboxhost.language import check, check_and_compile

HELLO = """\
policy:
    schedule:
        crontab()
    condition:
        True
    apply:
        print("hello world!")
"""


def messages(source):
    return [(v.line, v.column, v.message) for v in check(source, "p.policy")]


def test_hello_world_compiles_three_sections():
    policy = check_and_compile(HELLO, "hello.policy")
    assert [s.name for s in policy.sections] == ["schedule", "condition",
                                                 "apply"]
    assert len(policy.conditions) == 1
    assert policy.apply.co_filename == "hello.policy"


def test_first_word_must_be_policy():
    assert messages("zombie:\n    schedule:\n        crontab()\n") == [
        (1, 1, 'expected "policy", found "zombie"')]


def test_schedule_must_come_first():
    assert messages("policy:\n    apply:\n        pass\n") == [
        (2, 5, 'expected "schedule", found "apply"')]


def test_unknown_section_after_schedule():
    source = "policy:\n    schedule:\n        crontab()\n    zombie:\n        1\n"
    assert messages(source) == [
        (4, 5, 'expected "condition" or "apply", found "zombie"')]


def test_nothing_may_follow_apply():
    source = HELLO + "    condition:\n        True\n"
    assert messages(source) == [
        (8, 5, 'expected end of policy, found "condition"')]


def test_empty_input_is_an_error():
    assert messages("") == [(1, 1, 'expected "policy", found end of file')]


def test_lone_indent_is_an_error():
    assert messages("    \n") == [
        (1, 1, 'expected "policy", found end of file')]


def test_only_comments_is_an_error():
    assert messages("# nothing here\n\n") == [
        (1, 1, 'expected "policy", found end of file')]


def test_indented_policy_is_an_error():
    source = "  policy:\n    schedule:\n        crontab()\n    apply:\n        pass\n"
    assert messages(source) == [
        (1, 3, '"policy:" must start at the beginning of the line')]


def test_policy_alone_is_an_error():
    assert messages("policy:\n") == [
        (1, 1, 'expected "schedule", found end of file')]


def test_missing_apply_is_an_error():
    source = "policy:\n    schedule:\n        crontab()\n"
    assert messages(source) == [
        (4, 1, 'expected "condition" or "apply", found end of file')]


def test_empty_section_is_an_error():
    source = "policy:\n    schedule:\n    apply:\n        pass\n"
    assert messages(source) == [
        (2, 5, 'expected an indented body under "schedule:"')]


def test_section_header_must_stand_alone():
    source = "policy:\n    schedule: crontab()\n    apply:\n        pass\n"
    assert messages(source) == [
        (2, 5, '"schedule:" must be on a line of its own, with its body'
               ' indented below it')]


def test_sections_must_be_indented_under_policy():
    source = "policy:\nschedule:\n    crontab()\n"
    assert messages(source) == [
        (2, 1, 'expected the sections of the policy indented under'
               ' "policy:"')]


def test_inconsistent_dedent_is_an_error():
    source = "policy:\n    schedule:\n        crontab()\n  apply:\n        pass\n"
    assert messages(source) == [
        (4, 3, "unindent does not match any outer indentation level")]


def test_comments_and_blank_lines_are_allowed_anywhere():
    source = """\
# leading comment

policy:   # trailing
  # inside
    schedule:
# odd column
        crontab()   # here

    condition:   # there
        True
    # between
    apply:

        pass
# the end
"""
    assert messages(source) == []


def test_several_conditions_are_kept_apart():
    source = HELLO.replace("    apply:", "    condition:\n        False\n"
                           "    apply:")
    assert len(check_and_compile(source).conditions) == 2


def test_no_condition_is_allowed():
    source = "policy:\n    schedule:\n        crontab()\n    apply:\n        pass\n"
    assert check_and_compile(source).conditions == ()


def test_logical_lines_span_brackets_and_backslashes():
    source = """\
policy:
    schedule:
        crontab(minute="*/5",
    hour="*")
    condition:
        1 + \\
2 == 3
    apply:
        x = [1,
             2]
"""
    assert messages(source) == []


def test_string_that_looks_like_a_header_stays_a_string():
    source = '''\
policy:
    schedule:
        crontab()
    apply:
        x = """
    condition:
        import os
"""
'''
    assert messages(source) == []


def test_error_lines_are_those_of_the_file():
    source = HELLO.replace('print("hello world!")',
                           'x = 1\n        y = lambda: 2')
    assert messages(source) == [(8, 13, "lambda is not allowed")]


def test_errors_carry_section_and_source_line():
    source = HELLO.replace("True", "tasks")
    (violation,) = check(source, "p.policy")
    assert violation.section == "condition"
    assert violation.source_line == "        tasks"
    assert str(violation) == ("p.policy:5:9: error: 'tasks' is not available"
                              " in the condition section")


def test_policy_syntax_error_lists_every_violation():
    source = HELLO.replace('print("hello world!")',
                           'import os\n        type = 1')
    with pytest.raises(PolicySyntaxError) as info:
        check_and_compile(source, "p.policy")
    assert str(info.value) == (
        "p.policy:7:9: error: import is not allowed\n"
        "p.policy:8:9: error: 'type' is not allowed")
    assert [v.line for v in info.value.violations] == [7, 8]


def test_python_syntax_errors_name_the_line():
    source = HELLO.replace('print("hello world!")', "x = (1,")
    assert messages(source) == [(7, 9, "a string or bracket is not closed")]


def test_syntax_error_in_one_section_does_not_hide_others():
    source = HELLO.replace("True", "1 +").replace(
        'print("hello world!")', "import os")
    lines = [m[0] for m in messages(source)]
    assert lines == [5, 7]
