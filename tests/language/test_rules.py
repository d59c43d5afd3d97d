"""Every allowed and forbidden construct of the policy language."""

import builtins

import pytest

from sandboxhost.language import check, check_and_compile
from sandboxhost.rules import ALLOWED_BUILTINS, FORBIDDEN_NAMES

POLICY = """\
policy:
    schedule:
        {schedule}
    condition:
        {condition}
    apply:
        {apply}
"""


def policy(schedule="crontab()", condition="True", apply="pass"):
    return POLICY.format(schedule=schedule, condition=condition, apply=apply)


def errors(**sections):
    return [v.message for v in check(policy(**sections), "p.policy")]


def apply_errors(code):
    return errors(apply=code)


def condition_errors(code):
    return errors(condition=code)


# -- allowed ------------------------------------------------------------------

ALLOWED_APPLY = [
    "x = 1",
    "x = y = 2",
    "a, b = 1, 2",
    "a, *rest = [1, 2, 3]",
    "x = 1\n        x += 2",
    "x = {'a': 1}\n        x['a'] -= 1",
    "if 1 > 2:\n            x = 1\n        elif 2 > 3:\n            x = 2\n"
    "        else:\n            x = 3",
    "pass",
    "print('hi', 1, sep=', ', end='')",
    "x = [i * 2 for i in range(3) if i]",
    "x = {i: i for i in range(3)}",
    "x = {i for i in range(3)}",
    "x = sum(i for i in range(3))",
    "x = [j for i in range(3) for j in range(i)]",
    "x = 1 if True else 2",
    "x = f'{1 + 1:>4}'",
    "x = '{} and {}'.format(1, 2)",
    "x = '%s' % 3",
    "x = 'a'[0:1]",
    "x = not (1 < 2 <= 3 != 4)",
    "x = 1 in [1] and 2 not in [] and None is None and x is not None",
    "x = 2 ** 3 // 2 % 5 - -1 + +1 << 1 >> 1 | 1 & 1 ^ 1",
    "x = ~1",
    "x = (y := 3)",
    "tasks['t'].rate_limit = '10/s'",
    "workers['w'].subprocesses.increment()",
    "x = stats.tasks_failed(interval=datetime.timedelta(hours=1))",
    "x = math.floor(1.5) + len(calendar.day_name) + time.time()",
    "x = now() - today(offset_days=-1, timestr='10:00')",
    "x = PENDING + RECEIVED + STARTED + SUCCESS + FAILURE + REVOKED + RETRY",
    "x = queues['celery'].length()",
    "send_email('s', 'm', 'a@b.c', ['d@e.f'])",
    "x = sorted([3, 1], key=abs, reverse=True)",
    "x = [*range(3)]",
    "x = {**{'a': 1}}",
    "x = b'bytes' + bytearray(2)",
    "x = 1_000 + 0x1f + 0o7 + 0b1 + 1e3 + 2j",
]


@pytest.mark.parametrize("code", ALLOWED_APPLY)
def test_allowed_in_apply(code):
    assert apply_errors(code) == []


@pytest.mark.parametrize("name", sorted(ALLOWED_BUILTINS))
def test_every_allowed_builtin_may_be_used(name):
    assert apply_errors(f"x = {name}") == []


@pytest.mark.parametrize("code", [
    "stats.tasks() > 0",
    "any(x > 1 for x in [1, 2])",
    "[x for x in range(3)]",
    "now() > today()",
    "queues['celery'].length() > 100",
])
def test_allowed_in_condition(code):
    assert condition_errors(code) == []


@pytest.mark.parametrize("code", [
    "crontab()",
    "crontab(minute='*/10', day_of_week='mon-fri')",
    "every(seconds=30)",
    "every(minutes=1 + 1)",
])
def test_allowed_in_schedule(code):
    assert errors(schedule=code) == []


def test_examples_compile(examples):
    for path in examples:
        check_and_compile(path.read_text(), str(path))


# -- statements refused everywhere ------------------------------------------------

@pytest.mark.parametrize("code, message", [
    ("import os", "import is not allowed"),
    ("from os import path", "import is not allowed"),
    ("def f():\n            pass", "def is not allowed"),
    ("async def f():\n            pass", "async def is not allowed"),
    ("class A:\n            pass", "class is not allowed"),
    ("x = lambda: 1", "lambda is not allowed"),
    ("return 1", "return is not allowed"),
    ("global x", "global is not allowed"),
    ("nonlocal x", "nonlocal is not allowed"),
    ("for x in y:\n            pass", "a for statement is not allowed (use a"
     " comprehension or a generator expression)"),
    ("while True:\n            pass", "a while statement is not allowed (use"
     " a comprehension or a generator expression)"),
    ("try:\n            pass\n        except:\n            pass",
     "try is not allowed"),
    ("try:\n            pass\n        finally:\n            pass",
     "try is not allowed"),
    ("raise ValueError", "raise is not allowed"),
    ("with x:\n            pass", "with is not allowed"),
    ("del x", "del is not allowed"),
    ("assert x", "assert is not allowed"),
    ("x: int = 1", "an annotated assignment is not allowed"),
    ("match x:\n            case 1:\n                pass",
     "match is not allowed"),
    ("x = [y async for y in z]", "async comprehensions are not allowed"),
])
def test_refused_statements(code, message):
    assert apply_errors(code) == [message]


@pytest.mark.parametrize("code, message", [
    ("x = (yield)", "yield is not allowed"),
    ("x = (yield from y)", "yield from is not allowed"),
    ("x = await y", "await is not allowed"),
])
def test_refused_generator_and_async_expressions(code, message):
    found = apply_errors(code)
    assert found == [message] or found and "outside" in found[0]


# -- names -------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "__import__", "exec", "eval", "compile", "execfile", "input", "open",
    "getattr", "setattr", "hasattr", "delattr", "globals", "locals", "vars",
    "dir", "type", "super", "object", "breakpoint", "help", "memoryview",
    "classmethod", "staticmethod", "property",
])
def test_named_builtins_are_refused(name):
    expected = (f"{name!r}: names that begin with an underscore are not"
                " allowed" if name.startswith("_") else
                f"{name!r} is not allowed")
    assert apply_errors(f"x = {name}") == [expected]


def test_every_other_builtin_is_refused():
    others = set(dir(builtins)) - ALLOWED_BUILTINS - {"True", "False",
                                                      "None"}
    assert others <= FORBIDDEN_NAMES
    for name in sorted(n for n in others if not n.startswith("_")):
        assert apply_errors(f"x = {name}") == [f"{name!r} is not allowed"]


def test_forbidden_name_is_refused_even_as_a_local():
    assert apply_errors('type = "x"') == ["'type' is not allowed"]


def test_forbidden_name_is_refused_as_keyword_argument():
    assert apply_errors("print(1, open=2)") == ["'open' is not allowed"]


@pytest.mark.parametrize("code", ["_x = 1", "x = _y", "x = __name__",
                                  "x = __builtins__", "print(_=1)"])
def test_underscore_names_are_refused(code):
    (message,) = apply_errors(code)
    assert message.endswith(": names that begin with an underscore are not"
                            " allowed")


@pytest.mark.parametrize("attribute", [
    "__class__", "__dict__", "__globals__", "__subclasses__", "__mro__",
    "__init__", "__new__", "__code__", "__closure__", "__traceback__",
    "_private",
])
def test_underscore_attributes_are_refused(attribute):
    assert apply_errors(f"x = y.{attribute}") == [
        f"{attribute!r}: names that begin with an underscore are not allowed"]


@pytest.mark.parametrize("attribute", [
    "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_await",
    "ag_frame", "f_back", "f_globals", "f_locals", "f_builtins", "f_code",
    "tb_frame", "tb_next", "co_code", "co_consts", "func_globals",
    "cell_contents", "mro", "format_map", "with_traceback",
])
def test_special_attributes_are_refused(attribute):
    assert apply_errors(f"x = y.{attribute}") == [
        f"{attribute!r}: this attribute is not allowed"]


def test_generator_frame_walk_is_refused():
    code = "g = (i for i in [1])\n        x = g.gi_frame.f_back.f_globals"
    assert apply_errors(code) == [
        "'gi_frame': this attribute is not allowed",
        "'f_back': this attribute is not allowed",
        "'f_globals': this attribute is not allowed",
    ]


@pytest.mark.parametrize("spelling", [
    "ｅｖａｌ",                 # full-width letters
    "𝐞𝐯𝐚𝐥",                     # mathematical bold
    "ᵉval" if "ᵉ".isidentifier() else "ｅval",
])
def test_other_unicode_spellings_of_forbidden_names_are_refused(spelling):
    assert apply_errors(f"x = {spelling}('1')") == ["'eval' is not allowed"]


def test_unicode_low_line_cannot_start_a_name():
    # U+FF3F FULLWIDTH LOW LINE normalises to "_", but it is not a letter
    # Python accepts at the start of a name, so no spelling of "__class__"
    # gets past the parser; the checker would refuse it anyway.
    code = "x = y.\uff3f\uff3fclass\uff3f\uff3f"
    assert apply_errors(code) == ["invalid character '\uff3f' (U+FF3F)"]


def test_unicode_spelling_of_special_attribute_is_refused():
    code = "x = g.ｇｉ_ｆｒａｍｅ"
    assert apply_errors(code) == ["'gi_frame': this attribute is not allowed"]


# -- API names ---------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "tasks", "workers", "stats", "queues", "datetime", "time", "calendar",
    "math", "send_email", "now", "today",
])
def test_api_names_cannot_be_assigned(name):
    assert apply_errors(f"{name} = 1") == [
        f"cannot assign to {name!r}: it is part of the policy API"]


def test_api_names_cannot_be_augmented_or_unpacked():
    assert apply_errors("x, tasks = 1, 2\n        math += 1") == [
        "cannot assign to 'tasks': it is part of the policy API",
        "cannot assign to 'math': it is part of the policy API"]


def test_api_names_cannot_be_rebound_by_walrus():
    assert apply_errors("x = (stats := 1)") == [
        "cannot assign to 'stats': it is part of the policy API"]


@pytest.mark.parametrize("section, name", [
    ("condition", "tasks"), ("condition", "workers"),
    ("condition", "send_email"), ("condition", "crontab"),
    ("schedule", "stats"), ("schedule", "tasks"), ("schedule", "queues"),
    ("apply", "crontab"), ("apply", "every"),
])
def test_api_names_outside_their_sections_are_refused(section, name):
    assert errors(**{section: f"{name}"}) == [
        f"{name!r} is not available in the {section} section"]


# -- expression-only sections -----------------------------------------------------

@pytest.mark.parametrize("section", ["schedule", "condition"])
@pytest.mark.parametrize("code, word", [
    ("x = 1", "assignment"),
    ("x += 1", "assignment"),
    ("(x := 1)", "assignment (:=)"),
    ("pass", "a statement"),
    ("if x:\n            pass", "an if statement"),
])
def test_expression_sections_refuse_statements(section, code, word):
    code = code if section != "schedule" else code
    assert errors(**{section: code}) == [
        f"{word} is not allowed in the {section} section: it takes"
        " expressions only"]


def test_schedule_takes_exactly_one_expression():
    assert errors(schedule="crontab()\n        crontab()") == [
        "the schedule section takes exactly one expression"]


def test_condition_del_is_refused():
    assert condition_errors("del x") == ["del is not allowed"]


# -- format strings -------------------------------------------------------------

@pytest.mark.parametrize("literal", [
    "'{0.__class__}'", "'{.__globals__}'", "'{x.gi_frame}'",
    "'{0[a].__dict__}'", "'{:{0.__class__}}'",
])
def test_format_literal_reading_forbidden_attribute_is_refused(literal):
    (message,) = apply_errors(f"x = {literal}.format(y)")
    assert "reads an attribute that is not allowed" in message


def test_format_literal_with_plain_fields_is_allowed():
    assert apply_errors("x = '{0} {a} {0[1]} {a.days} {:>3}'.format(1)") == []


def test_fstring_attribute_is_checked_like_code():
    assert apply_errors("x = f'{y.__class__}'") == [
        "'__class__': names that begin with an underscore are not allowed"]


def test_every_violation_is_reported_at_once():
    code = "import os\n        x = eval\n        y = z._a\n        del q"
    assert len(apply_errors(code)) == 4


def test_lint_knows_every_name_the_api_and_value_types_offer():
    from sandboxhost.lint import known_attributes
    known = known_attributes()
    for name in ("increment", "decrement", "get", "subprocesses", "prefetch",
                 "queues", "add", "remove", "names", "all", "rate_limit",
                 "acks_late", "tasks_failed", "mean_waittime", "length",
                 "timedelta", "total_seconds", "isoformat", "upper",
                 "strftime", "tm_hour", "sqrt"):
        assert name in known, name
    assert "incremnt" not in known
