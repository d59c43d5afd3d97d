"""Hostile text: bounded work, and the checker reads what the compiler runs."""

import dis

import pytest

from sandboxhost.language import (
    MAX_SOURCE_BYTES,
    check,
    check_and_compile,
)

HEAD = "policy:\n    schedule:\n        crontab()\n    apply:\n"


def messages(source):
    return [(v.line, v.column, v.message) for v in check(source, "p.policy")]


def names_in(code):
    """Every name the compiled code can load, nested code included."""
    found = set()
    pending = [code]
    while pending:
        current = pending.pop()
        found.update(i.argval for i in dis.get_instructions(current)
                     if isinstance(i.argval, str))
        found.update(current.co_names)
        pending.extend(c for c in current.co_consts if hasattr(c, "co_code"))
    return found


# -- newlines and control characters ---------------------------------------------

def test_lone_carriage_return_in_a_comment_ends_the_line():
    # A checker that reads "# a\rimport os" as one comment line would let
    # the compiler see an import it never checked.
    source = HEAD + "        x = 1  # a\r        import os\n"
    assert messages(source) == [(6, 9, "import is not allowed")]


def test_lone_carriage_return_before_a_forbidden_name():
    source = HEAD + "        x = 1 #\rx = eval\n"
    assert messages(source) == [(6, 1, 'expected end of policy, found "x"')]


def test_crlf_files_are_read_as_plain_lines():
    source = HEAD.replace("\n", "\r\n") + "        pass\r\n"
    assert messages(source) == []


@pytest.mark.parametrize("char", ["\x0c", "\x0b", "\x00", "\x1c", "\x85",
                                  "\u2028", "\u2029", "\x7f"])
def test_control_characters_are_refused(char):
    source = HEAD + f"        x = 1 {char}\n"
    assert messages(source) == [
        (5, 15, f"control character U+{ord(char):04X} is not allowed")]


def test_form_feed_in_indentation_is_refused():
    source = HEAD + "\x0c        pass\n"
    assert messages(source)[0][2] == "control character U+000C is not allowed"


def test_tab_indentation_is_refused():
    source = HEAD + "\tpass\n"
    assert messages(source) == [(5, 1, "indent with spaces, not tabs")]


def test_byte_order_mark_is_ignored():
    assert messages("\ufeff" + HEAD + "        pass\n") == []


def test_invalid_utf8_is_refused_with_its_line():
    source = (HEAD + "        x = 'caf\xe9'\n").encode("latin-1")
    assert messages(source) == [
        (5, 1, "the policy is not UTF-8 text (invalid continuation byte at"
               " byte 67)")]


def test_utf8_bytes_are_accepted():
    assert messages((HEAD + "        x = 'café'\n").encode()) == []


def test_lone_surrogate_is_refused():
    source = HEAD + "        x = '\ud800'\n"
    assert messages(source)[0][2] == "control character U+D800 is not allowed"


def test_backslash_continuation_at_end_of_file():
    assert messages(HEAD + "        x = 1 + \\") == [
        (5, 18, "unexpected EOF while parsing")]


def test_unclosed_triple_quoted_string():
    assert messages(HEAD + '        x = """\n') == [
        (5, 9, "a string or bracket is not closed")]


def test_compiled_code_holds_only_checked_names():
    source = HEAD + "        x = [len(y) for y in ['a']]\n        print(x)\n"
    policy = check_and_compile(source)
    assert names_in(policy.apply) <= {"x", "y", "len", "print", "<listcomp>",
                                      ".0", "a"}


def test_format_calls_are_routed_through_the_checked_formatter():
    source = HEAD + "        x = '{}'.format(1)\n        y = str.format('{}', 2)\n"
    names = names_in(check_and_compile(source).apply)
    assert "__cm_format__" in names
    assert "format" not in names


# -- bounded work ----------------------------------------------------------------

def test_oversized_policy_is_refused_before_parsing():
    source = HEAD + ("        x = 1\n" * 10_000)
    (line, column, message) = messages(source)[0]
    assert message == (f"the policy is {len(source)} bytes; the limit is"
                       f" {MAX_SOURCE_BYTES} bytes")
    assert line > 1


def test_huge_number_literal_is_refused():
    assert messages(HEAD + "        x = " + "9" * 300_00 + "\n") == [
        (5, 13, "number literal of 30000 characters; the limit is 100")]


def test_huge_string_literal_is_refused():
    source = HEAD + "        x = '" + "a" * 20_000 + "'\n"
    assert messages(source) == [
        (5, 13, "string literal of 20002 characters; the limit is 16384")]


def test_deep_brackets_are_refused():
    source = HEAD + "        x = " + "(" * 200 + "1" + ")" * 200 + "\n"
    assert messages(source) == [(5, 45, "brackets nested more than 32 deep")]


@pytest.mark.parametrize("expr", [
    "-" * 5000 + "1",
    "not " * 3000 + "x",
    "1+" * 3000 + "1",
    "a" + ".b" * 3000,
    "f" + "()" * 3000,
])
def test_long_chains_are_refused_not_crashed(expr):
    (line, column, message) = messages(HEAD + f"        x = {expr}\n")[0]
    assert (line, column) == (5, 9)
    assert message == "this line is too complex (more than 1000 tokens)"


@pytest.mark.parametrize("expr", [
    "-" * 200 + "1",
    "1+" * 400 + "1",
    "a" + ".b" * 400,
    "x" + "[0]" * 300,
])
def test_deep_trees_are_refused_not_crashed(expr):
    (line, column, message) = messages(HEAD + f"        x = {expr}\n")[0]
    assert line == 5
    assert message == "nested more than 64 levels deep"


def test_deep_if_nesting_is_refused():
    body = "".join(" " * (8 + 4 * i) + "if x:\n" for i in range(70))
    body += " " * (8 + 4 * 70) + "pass\n"
    found = messages(HEAD + body)
    assert found and found[0][2] in ("nested more than 64 levels deep",
                                     "too many levels of indentation")


def test_many_errors_are_capped():
    source = HEAD + "        import os\n" * 1000
    assert len(check(source)) == 200
