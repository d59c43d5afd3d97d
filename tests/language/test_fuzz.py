"""Random and mutated policies: the only exception is PolicySyntaxError."""

from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sandboxhost.errors import PolicySyntaxError
from sandboxhost.language import check_and_compile

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "examples"
SEEDS = [p.read_text() for p in sorted(EXAMPLES.glob("*.policy"))] or [
    "policy:\n    schedule:\n        crontab()\n    apply:\n        pass\n"]

FRAGMENTS = [
    "policy:", "schedule:", "condition:", "apply:", "    ", "\n", "\t",
    "\r", "\x0c", "(", ")", "[", "]", "{", "}", ":", "=", ":=", "lambda",
    "import", "__class__", "ｅｖａｌ", "'''", '"', "\\", "#", "-", "not ",
    "yield", "async", "f'{", "}'", "9" * 50, "é", "\x00", "\ufeff",
    "tasks", "workers", ".", "*", "**", "if x:", "else:", "for", "@",
]


def attempt(source):
    try:
        check_and_compile(source, "fuzz.policy")
    except PolicySyntaxError as exc:
        for violation in exc.violations:
            assert violation.line >= 1 and violation.column >= 1
            assert violation.message


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.one_of(st.sampled_from(FRAGMENTS),
                               st.text(max_size=8)))
        if action == "insert":
            text = text[:pos] + piece + text[pos:]
        elif action == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 20)):]
        else:
            text = text[:pos] + piece + text[pos + len(piece):]
    return text


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_policies_raise_only_policy_syntax_errors(source):
    attempt(source)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
@example("policy:\n schedule:\n  crontab()\n apply:\n  x = 1\r import os")
def test_random_text_raises_only_policy_syntax_errors(source):
    attempt(source)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_policy_syntax_errors(source):
    attempt(source)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_fragment_soup_raises_only_policy_syntax_errors(source):
    attempt(source)
