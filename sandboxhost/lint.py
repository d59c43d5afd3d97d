"""Warnings about a valid policy: attribute names nothing in the language has.

The checker decides what a policy may do; it cannot tell a typo such as
``workers["w1"].subprocesses.incremnt()`` from a real method, and that
mistake only shows when the policy runs. ``lint`` reads a checked policy
and warns about every attribute name that no API object, module view or
value type of the language has, with the closest known name. It never
refuses a policy: a warning may be wrong (a name the language allows on
some value this list does not know).
"""

from __future__ import annotations

import ast
import datetime
import difflib
import time
from functools import lru_cache

from sandboxhost import namespace
from sandboxhost.errors import Violation
from sandboxhost.language import checked_trees

# Types whose values policy code handles: literals, what the API returns,
# and what the modules it may use give.
VALUE_TYPES = (str, bytes, int, float, complex, bool, list, dict, set,
               frozenset, tuple, range, slice, datetime.datetime,
               datetime.date, datetime.time, datetime.timedelta,
               datetime.timezone, time.struct_time)


class LintWarning(Violation):
    """A likely mistake in a valid policy; never a reason to refuse it."""

    __slots__ = ()

    def __str__(self) -> str:
        return (f"{self.filename}:{self.line}:{self.column}: warning:"
                f" {self.message}")

    def as_dict(self) -> dict:
        return {**super().as_dict(), "severity": "warning"}


def _public(obj: object) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


def _api_classes() -> list[type]:
    found, todo = [], [namespace._Proxy, namespace.ScheduleSpec]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@lru_cache(maxsize=1)
def known_attributes() -> frozenset[str]:
    """Every attribute name some value in a policy can have."""
    names: set[str] = set(namespace.TASK_SETTINGS)
    for cls in _api_classes():
        names |= _public(cls)
    for view in namespace._MODULES.values():
        for name in dir(view):
            names.add(name)
            member = getattr(view, name)
            if isinstance(member, type):
                names |= _public(member)
    for kind in VALUE_TYPES:
        names |= _public(kind)
    return frozenset(names)


def lint(source: str | bytes, filename: str = "<policy>") -> list[LintWarning]:
    """Warnings for a policy that checks; [] for one that does not (its
    violations come first)."""
    trees = checked_trees(source, filename)
    if trees is None:
        return []
    text = source.decode("utf-8", "replace") if isinstance(source, bytes) \
        else source
    # The checker's own line breaks (plain \n), not str.splitlines'.
    rows = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    known = known_attributes()
    warnings = []
    for section, body in trees:
        for statement in body:
            for node in ast.walk(statement):
                if not isinstance(node, ast.Attribute) or node.attr in known:
                    continue
                message = f"no value in a policy has an attribute {node.attr!r}"
                close = difflib.get_close_matches(node.attr, known, n=1)
                if close:
                    message += f"; did you mean {close[0]!r}?"
                line = node.end_lineno or node.lineno
                source_line = rows[line - 1] if line <= len(rows) else ""
                # ast's offsets count UTF-8 bytes; columns count characters.
                before = source_line.encode("utf-8")[:node.end_col_offset]
                column = (len(before.decode("utf-8", "replace"))
                          - len(node.attr) + 1)
                warnings.append(LintWarning(filename, section, line, column,
                                            source_line, message))
    return sorted(warnings, key=lambda w: (w.line, w.column))
