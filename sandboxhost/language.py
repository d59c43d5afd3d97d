"""Parse a policy into sections, check every rule, compile each section.

The work is bounded before Python's own parser sees anything: the source
size, the length of every literal, bracket depth and tokens per line are
checked on the token stream, and the syntax tree's depth is checked without
recursion before anything walks it recursively.

What runs is exactly what was checked: each section is parsed once, every
node of that tree is checked, and that same tree object is compiled.
Identifiers in the tree are already NFKC-normalised by the parser, so
another Unicode spelling of a forbidden name is the forbidden name.
"""

from __future__ import annotations

import ast
import io
import logging
import marshal
import string
import tokenize
from dataclasses import dataclass, field
from types import CodeType

import _string

from sandboxhost.errors import PolicySyntaxError, Violation
from sandboxhost.rules import (
    ALLOWED_NODES,
    API_NAMES,
    FORMAT_HOOK,
    NODE_HINTS,
    NODE_WORDS,
    SECTION_API,
    SECTIONS,
    name_problem,
)

logger = logging.getLogger(__name__)

MAX_SOURCE_BYTES = 64 * 1024
MAX_NUMBER_CHARS = 100
MAX_STRING_CHARS = 16 * 1024
MAX_BRACKET_DEPTH = 32
MAX_TOKENS_PER_LINE = 1000
MAX_TREE_DEPTH = 64
MAX_VIOLATIONS = 200

_FORMAT_ATTRIBUTES = frozenset({"format"})

_SKIPPED_TOKENS = frozenset({
    tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
    tokenize.ENCODING,
})
_OPENERS = frozenset("([{")
_CLOSERS = frozenset(")]}")


@dataclass(frozen=True)
class SectionInfo:
    """Where one section sits in the policy file."""

    name: str
    header_line: int
    first_line: int
    last_line: int


@dataclass(frozen=True)
class CompiledPolicy:
    """The checked, compiled sections of one policy."""

    filename: str
    schedule: CodeType
    conditions: tuple[CodeType, ...]
    apply: CodeType
    sections: tuple[SectionInfo, ...] = field(default=())

    def wire(self) -> dict:
        """The sections as the child receives them (marshal, never pickle)."""
        return {
            "filename": self.filename,
            "schedule": marshal.dumps(self.schedule),
            "conditions": [marshal.dumps(c) for c in self.conditions],
            "apply": marshal.dumps(self.apply),
        }


@dataclass
class _Line:
    """One logical line: its tokens (no comments or layout tokens)."""

    tokens: list
    first_row: int
    first_col: int
    last_row: int

    def is_header(self) -> bool:
        return (len(self.tokens) == 2
                and self.tokens[0].type == tokenize.NAME
                and self.tokens[1].string == ":")

    @property
    def word(self) -> str:
        return self.tokens[0].string


class _Report:
    """Collects violations, located by file line and 1-based column."""

    def __init__(self, filename: str, rows: list[str]):
        self.filename = filename
        self.rows = rows
        self.violations: list[Violation] = []

    def add(self, line: int, column: int, message: str,
            section: str | None = None) -> None:
        if len(self.violations) >= MAX_VIOLATIONS:
            return
        line = max(1, line)
        text = self.rows[line - 1] if line <= len(self.rows) else ""
        self.violations.append(Violation(
            self.filename, section, line, max(1, column), text, message))

    def add_node(self, node: ast.AST, message: str, section: str) -> None:
        line = getattr(node, "lineno", 1)
        offset = getattr(node, "col_offset", 0)
        self.add(line, self._column(line, offset), message, section)

    def _column(self, line: int, byte_offset: int) -> int:
        # The tree counts columns in UTF-8 bytes; people count characters.
        if line > len(self.rows):
            return byte_offset + 1
        raw = self.rows[line - 1].encode("utf-8")[:byte_offset]
        return len(raw.decode("utf-8", "replace")) + 1


def check_and_compile(source: str | bytes,
                      filename: str = "<policy>") -> CompiledPolicy:
    """Check ``source`` against every rule and compile its sections.

    Raises PolicySyntaxError carrying every violation found.
    """
    violations, policy = _run(source, filename)
    if violations:
        raise PolicySyntaxError(violations)
    assert policy is not None
    return policy


def check(source: str | bytes, filename: str = "<policy>") -> list[Violation]:
    """Every violation in ``source``; an empty list when it is valid."""
    return _run(source, filename)[0]


def checked_trees(source: str | bytes, filename: str = "<policy>"
                  ) -> list[tuple[str, list[ast.stmt]]] | None:
    """Each section's checked statements, for further reading (lint);
    None when the policy has violations."""
    trees: list[tuple[str, list[ast.stmt]]] = []
    violations, _policy = _run(source, filename, trees)
    return None if violations else trees


def _run(source: str | bytes, filename: str,
         trees: list | None = None
         ) -> tuple[list[Violation], CompiledPolicy | None]:
    text, report = _normalise(source, filename)
    if report.violations:
        return report.violations, None
    lines = _logical_lines(text, report)
    if report.violations:
        return report.violations, None
    layout = _layout(lines, report)
    if report.violations:
        return report.violations, None
    policy = _compile_sections(text, layout, report, trees)
    report.violations.sort(key=lambda v: (v.line, v.column))
    return report.violations, policy


# -- text --------------------------------------------------------------------

def _normalise(source: str | bytes, filename: str) -> tuple[str, _Report]:
    """Decode, bound the size, make newlines plain ``\\n``, refuse controls.

    Turning every CR into a newline first means the tokenizer, the section
    splitter and the parser all read the same lines.
    """
    report = _Report(filename, [])
    if isinstance(source, bytes):
        size = len(source)
        if size > MAX_SOURCE_BYTES:
            report.add(_line_at(source, MAX_SOURCE_BYTES), 1, _too_big(size))
            return "", report
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = source.count(b"\n", 0, exc.start) + 1
            report.add(line, 1, f"the policy is not UTF-8 text ({exc.reason}"
                                f" at byte {exc.start})")
            return "", report
    else:
        size = len(source.encode("utf-8", "surrogatepass"))
        if size > MAX_SOURCE_BYTES:
            cut = source.encode("utf-8", "surrogatepass")[:MAX_SOURCE_BYTES]
            report.add(_line_at(cut, len(cut)), 1, _too_big(size))
            return "", report
    text = source.removeprefix("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    report.rows = text.split("\n")
    for row, line in enumerate(report.rows, 1):
        stripped = line.lstrip(" ")
        if stripped.startswith("\t"):
            report.add(row, len(line) - len(stripped) + 1,
                       "indent with spaces, not tabs")
        for col, char in enumerate(line, 1):
            if _is_control(char):
                report.add(row, col, f"control character U+{ord(char):04X}"
                                     " is not allowed")
                break
    return text, report


def _is_control(char: str) -> bool:
    code = ord(char)
    if char == "\t":
        return False
    return (code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029)
            or 0xD800 <= code <= 0xDFFF)


def _too_big(size: int) -> str:
    return (f"the policy is {size} bytes; the limit is {MAX_SOURCE_BYTES}"
            " bytes")


def _line_at(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


# -- tokens ------------------------------------------------------------------

def _logical_lines(text: str, report: _Report) -> list[_Line]:
    """Split into logical lines, bounding literals, depth and length."""
    lines: list[_Line] = []
    current: list = []
    depth = 0
    too_long_reported = False
    readline = io.StringIO(text).readline
    try:
        for tok in tokenize.generate_tokens(readline):
            if tok.type in _SKIPPED_TOKENS:
                continue
            if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
                if current:
                    lines.append(_Line(current, current[0].start[0],
                                       current[0].start[1], tok.start[0]))
                current, depth, too_long_reported = [], 0, False
                continue
            row, col = tok.start
            if tok.type == tokenize.NUMBER and len(tok.string) > MAX_NUMBER_CHARS:
                report.add(row, col + 1, f"number literal of {len(tok.string)}"
                           f" characters; the limit is {MAX_NUMBER_CHARS}")
            elif tok.type == tokenize.STRING and len(tok.string) > MAX_STRING_CHARS:
                report.add(row, col + 1, f"string literal of {len(tok.string)}"
                           f" characters; the limit is {MAX_STRING_CHARS}")
            elif tok.string in _OPENERS:
                depth += 1
                if depth == MAX_BRACKET_DEPTH + 1:
                    report.add(row, col + 1, "brackets nested more than"
                               f" {MAX_BRACKET_DEPTH} deep")
            elif tok.string in _CLOSERS:
                depth = max(0, depth - 1)
            current.append(tok)
            if len(current) > MAX_TOKENS_PER_LINE and not too_long_reported:
                too_long_reported = True
                report.add(current[0].start[0], current[0].start[1] + 1,
                           "this line is too complex (more than"
                           f" {MAX_TOKENS_PER_LINE} tokens)")
            if len(report.violations) >= MAX_VIOLATIONS:
                break
    except tokenize.TokenError as exc:
        message, (row, col) = exc.args
        what = ("a string or bracket is not closed" if "EOF" in message
                else message)
        start = current[0].start if current else (row, col)
        report.add(start[0], start[1] + 1, what)
    except SyntaxError as exc:
        # tokenize reports 0-based columns, unlike the compiler.
        report.add(exc.lineno or 1, (exc.offset or 0) + 1, exc.msg)
    return lines


# -- layout ------------------------------------------------------------------

@dataclass
class _Section:
    name: str
    header: _Line
    body: list[_Line] = field(default_factory=list)


def _expected(names: list[str]) -> str:
    return " or ".join(f'"{n}"' for n in names)


def _layout(lines: list[_Line], report: _Report) -> list[_Section]:
    """Find ``policy:`` and its sections in order; report the first misfit."""
    if not lines:
        report.add(1, 1, 'expected "policy", found end of file')
        return []
    first = lines[0]
    if not (first.is_header() and first.word == "policy"):
        report.add(first.first_row, first.first_col + 1,
                   f'expected "policy", found "{first.word}"')
        return []
    if first.first_col != 0:
        report.add(first.first_row, first.first_col + 1,
                   '"policy:" must start at the beginning of the line')
        return []
    if len(lines) == 1:
        report.add(first.first_row, 1,
                   'expected "schedule", found end of file')
        return []
    indent = lines[1].first_col
    if indent == 0:
        report.add(lines[1].first_row, 1, "expected the sections of the"
                   ' policy indented under "policy:"')
        return []

    sections: list[_Section] = []
    expected = ["schedule"]
    for line in lines[1:]:
        where = (line.first_row, line.first_col + 1)
        if line.first_col > indent:
            sections[-1].body.append(line)
            continue
        if line.first_col < indent:
            report.add(*where, f'expected end of policy, found "{line.word}"')
            return []
        if not line.is_header():
            if line.tokens[0].type == tokenize.NAME and len(line.tokens) > 1 \
                    and line.tokens[1].string == ":" \
                    and line.word in SECTIONS:
                report.add(*where, f'"{line.word}:" must be on a line of'
                           " its own, with its body indented below it")
            elif expected:
                report.add(*where, f"expected {_expected(expected)},"
                           f' found "{line.word}"')
            else:
                report.add(*where, f'expected end of policy, found "{line.word}"')
            return []
        if line.word not in expected:
            if expected:
                report.add(*where, f"expected {_expected(expected)},"
                           f' found "{line.word}"')
            else:
                report.add(*where, f'expected end of policy, found "{line.word}"')
            return []
        if sections and not sections[-1].body:
            _report_empty(sections[-1], report)
            return []
        sections.append(_Section(line.word, line))
        expected = [] if line.word == "apply" else ["condition", "apply"]

    if sections and not sections[-1].body:
        _report_empty(sections[-1], report)
        return []
    if expected:
        last = lines[-1]
        report.add(last.last_row + 1, 1,
                   f"expected {_expected(expected)}, found end of file")
        return []
    return sections


def _report_empty(section: _Section, report: _Report) -> None:
    header = section.header
    report.add(header.first_row, header.first_col + 1,
               f'expected an indented body under "{section.name}:"')


# -- sections ----------------------------------------------------------------

def _compile_sections(text: str, sections: list[_Section], report: _Report,
                      trees: list | None = None) -> CompiledPolicy | None:
    rows = text.split("\n")
    schedule = None
    conditions: list[CodeType] = []
    apply = None
    infos = []
    for section in sections:
        body = _parse_section(rows, section, report)
        infos.append(SectionInfo(section.name, section.header.first_row,
                                 section.body[0].first_row,
                                 section.body[-1].last_row))
        if body is None:
            continue
        before = len(report.violations)
        _Checker(section.name, report).check_body(body)
        if len(report.violations) != before:
            continue
        if trees is not None:
            trees.append((section.name, body))
        code = _compile_body(section.name, body, report)
        if section.name == "schedule":
            schedule = code
        elif section.name == "condition":
            conditions.append(code)
        else:
            apply = code
    if report.violations:
        return None
    return CompiledPolicy(report.filename, schedule, tuple(conditions),
                          apply, tuple(infos))


def _parse_section(rows: list[str], section: _Section,
                   report: _Report) -> list[ast.stmt] | None:
    """Parse one section in place, so line and column numbers are the file's.

    The section's lines are kept where they are and the header line becomes
    ``if 1:``; every other line of the file is blank.
    """
    header_row = section.header.first_row
    first = section.body[0].first_row
    last = section.body[-1].last_row
    lines = [""] * (header_row - 1) + ["if 1:"]
    lines += [""] * (first - header_row - 1) + rows[first - 1:last]
    try:
        tree = ast.parse("\n".join(lines) + "\n", report.filename)
    except SyntaxError as exc:
        report.add(exc.lineno or first, exc.offset or 1, exc.msg, section.name)
        return None
    except (RecursionError, MemoryError):
        widest = max(section.body, key=lambda ln: len(ln.tokens))
        report.add(widest.first_row, widest.first_col + 1,
                   "this expression is too complex", section.name)
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.If):
        report.add(first, 1, "this section could not be read as one block",
                   section.name)
        return None
    return tree.body[0].body


class _Checker:
    """Deny-by-default walk of one section's statements."""

    def __init__(self, section: str, report: _Report):
        self.section = section
        self.report = report
        self.allowed = ALLOWED_NODES[section]
        self.api = SECTION_API[section]

    def check_body(self, body: list[ast.stmt]) -> None:
        if self.section == "schedule" and len(body) != 1:
            self.error(body[1], "the schedule section takes exactly one"
                       " expression")
        root = ast.Module(body=body, type_ignores=[])
        deep = _too_deep(root)
        if deep is not None:
            self.error(deep, f"nested more than {MAX_TREE_DEPTH} levels deep")
            return
        # A refused node's children are not checked: one message per
        # construct reads better than one per piece of it.
        pending = list(reversed(body))
        while pending:
            node = pending.pop()
            if self.check_node(node):
                pending.extend(reversed(list(ast.iter_child_nodes(node))))

    def error(self, node: ast.AST, message: str) -> None:
        self.report.add_node(node, message, self.section)

    def check_node(self, node: ast.AST) -> bool:
        """Check one node; False when it is refused as a whole."""
        kind = type(node)
        if kind not in self.allowed:
            word = NODE_WORDS.get(kind, kind.__name__)
            if kind in ALLOWED_NODES["apply"]:
                self.error(node, f"{word} is not allowed in the"
                           f" {self.section} section: it takes expressions"
                           " only")
            else:
                self.error(node, f"{word} is not allowed"
                           f"{NODE_HINTS.get(kind, '')}")
            return False
        if kind is ast.Name:
            self.check_name(node)
        elif kind is ast.Attribute:
            problem = name_problem(node.attr, attribute=True)
            if problem:
                self.error(_AttributeName(node), problem)
        elif kind is ast.keyword and node.arg is not None:
            problem = name_problem(node.arg)
            if problem:
                self.error(node, problem)
        elif kind is ast.comprehension and node.is_async:
            self.error(node.target, "async comprehensions are not allowed")
        elif kind is ast.Constant and isinstance(node.value, str):
            problem = _format_field_problem(node.value)
            if problem:
                self.error(node, problem)
        return True

    def check_name(self, node: ast.Name) -> None:
        problem = name_problem(node.id)
        if problem:
            self.error(node, problem)
        elif node.id in API_NAMES:
            if not isinstance(node.ctx, ast.Load):
                self.error(node, f"cannot assign to {node.id!r}: it is part"
                           " of the policy API")
            elif node.id not in self.api:
                self.error(node, f"{node.id!r} is not available in the"
                           f" {self.section} section")


class _AttributeName:
    """Where the name of an attribute starts, for a precise column."""

    def __init__(self, node: ast.Attribute):
        self.lineno = node.end_lineno
        self.col_offset = node.end_col_offset - len(node.attr.encode())
        if node.end_lineno != node.lineno or self.col_offset < 0:
            self.lineno, self.col_offset = node.lineno, node.col_offset


def _too_deep(root: ast.AST) -> ast.AST | None:
    """The first node below MAX_TREE_DEPTH, found without recursion."""
    stack = [(root, 0, root)]
    while stack:
        node, depth, located = stack.pop()
        if hasattr(node, "lineno"):
            located = node
        if depth > MAX_TREE_DEPTH:
            return located
        for child in ast.iter_child_nodes(node):
            stack.append((child, depth + 1, located))
    return None


def _format_field_problem(value: str) -> str | None:
    """Refuse a literal format string whose fields read forbidden attributes.

    ``"{0.__class__}".format(x)`` needs no forbidden name in the code; the
    door is inside the string. The runtime's formatter refuses the same
    fields at run time; this catches the literal ones before anything runs.
    """
    if "{" not in value:
        return None
    pending = [value]
    while pending:
        text = pending.pop()
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError:
            return None
        for _, field_name, spec, _ in parts:
            if field_name:
                try:
                    _, rest = _string.formatter_field_name_split(field_name)
                    keys = list(rest)
                except ValueError:
                    continue
                for is_attribute, key in keys:
                    if is_attribute and name_problem(key, attribute=True):
                        return (f"format field {{{field_name}}} reads an"
                                f" attribute that is not allowed ({key!r})")
            if spec and "{" in spec:
                pending.append(spec)
    return None


class _FormatRouter(ast.NodeTransformer):
    """Route ``<expr>.format`` through the runtime's checked formatter."""

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        if node.attr in _FORMAT_ATTRIBUTES and isinstance(node.ctx, ast.Load):
            hook = ast.Name(id=FORMAT_HOOK, ctx=ast.Load())
            call = ast.Call(func=hook, args=[node.value], keywords=[])
            return ast.copy_location(call, node)
        return node


def _compile_body(section: str, body: list[ast.stmt],
                  report: _Report) -> CodeType | None:
    body = [_FormatRouter().visit(stmt) for stmt in body]
    if section == "apply":
        tree: ast.AST = ast.Module(body=body, type_ignores=[])
        mode = "exec"
    else:
        values = [stmt.value for stmt in body]
        expr = values[0]
        if len(values) > 1:
            # Lines of one condition are ANDed, in order, short-circuit.
            expr = ast.copy_location(ast.BoolOp(op=ast.And(), values=values),
                                     values[0])
        tree = ast.Expression(body=expr)
        mode = "eval"
    ast.fix_missing_locations(tree)
    try:
        return compile(tree, report.filename, mode, dont_inherit=True)
    except SyntaxError as exc:
        report.add(exc.lineno or body[0].lineno, exc.offset or 1, exc.msg,
                   section)
    except (RecursionError, MemoryError, ValueError) as exc:
        report.add(body[0].lineno, 1, f"this section cannot be compiled"
                   f" ({type(exc).__name__})", section)
    return None
