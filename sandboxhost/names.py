"""The names a policy may and may not use, as frozen constants.

The checker applies these to the syntax tree; the child runtime uses the
same lists (the builtins it offers, the checked formatter). This module is
imported by the template process, so it stays small: no ``ast``.
An entry is added only with the reason it is safe or must be refused.
"""

from __future__ import annotations

import builtins
import unicodedata

# Builtins a policy may call. Each is a pure function of its arguments or a
# plain type; none reaches attributes by name, frames, files or modules.
ALLOWED_BUILTINS = frozenset({
    "abs", "all", "any", "bin", "bool", "bytearray", "callable", "chr",
    "complex", "dict", "divmod", "enumerate", "filter", "float", "format",
    "frozenset", "hash", "hex", "int", "isinstance", "issubclass", "iter",
    "len", "list", "map", "max", "min", "next", "oct", "ord", "pow",
    "print", "range", "repr", "reversed", "round", "set", "slice", "sorted",
    "str", "sum", "tuple", "zip",
})

ALLOWED_CONSTANTS = frozenset({"True", "False", "None"})

# Named by the language reference; listed apart from "every other builtin"
# so that the message can say why.
_NAMED_FORBIDDEN = (
    "__import__", "exec", "eval", "compile", "execfile", "input", "open",
    "getattr", "setattr", "hasattr", "delattr", "globals", "locals",
    "vars", "dir", "type", "super", "object", "breakpoint", "help",
    "memoryview", "classmethod", "staticmethod", "property", "reload",
    "exit", "quit", "copyright", "credits", "license",
)

# Every builtin that is not allowed is refused by name, wherever it
# appears, even as the name of a harmless local ("type = 'x'").
FORBIDDEN_NAMES = frozenset(
    (set(dir(builtins)) | set(_NAMED_FORBIDDEN))
    - ALLOWED_BUILTINS - ALLOWED_CONSTANTS
)

# Attributes that lead from an ordinary object to the interpreter:
# frames, code, globals, the class hierarchy. Names with a leading
# underscore are refused separately, so only the public spellings of
# these doors are listed.
SPECIAL_ATTRIBUTES = frozenset({
    # generators, coroutines, async generators
    "gi_frame", "gi_code", "gi_running", "gi_yieldfrom", "gi_suspended",
    "cr_frame", "cr_code", "cr_running", "cr_await", "cr_origin",
    "cr_suspended",
    "ag_frame", "ag_code", "ag_running", "ag_await", "ag_suspended",
    # frames
    "f_back", "f_builtins", "f_code", "f_globals", "f_lasti", "f_lineno",
    "f_locals", "f_trace", "f_trace_lines", "f_trace_opcodes",
    # tracebacks and exceptions
    "tb_frame", "tb_lasti", "tb_lineno", "tb_next", "with_traceback",
    # code objects
    "co_code", "co_consts", "co_names", "co_varnames", "co_filename",
    "co_name", "co_qualname", "co_firstlineno", "co_lnotab",
    "co_linetable", "co_exceptiontable", "co_freevars", "co_cellvars",
    "co_argcount", "co_posonlyargcount", "co_kwonlyargcount",
    "co_nlocals", "co_stacksize", "co_flags", "co_lines", "co_positions",
    # functions and methods (old and new spellings)
    "func_globals", "func_code", "func_closure", "func_defaults",
    "func_dict", "func_name", "im_func", "im_self", "im_class",
    "cell_contents",
    # types
    "mro",
    # string formatting that reads attributes by name at run time; the
    # compiler routes ``.format`` through a checked formatter instead
    "format_map",
})

# Names of the policy API: may be read but never rebound.
API_NAMES = frozenset({
    "tasks", "workers", "stats", "queues", "datetime", "time", "calendar",
    "math", "send_email", "now", "today", "crontab", "every",
    "PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE", "REVOKED",
    "RETRY",
})

COMMON_API = frozenset({
    "datetime", "time", "calendar", "math", "now", "today",
    "PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE", "REVOKED",
    "RETRY",
})

# Which API names each section can see (POLICY-LANGUAGE.md, "Availability").
SECTION_API = {
    "schedule": COMMON_API | {"crontab", "every"},
    "condition": COMMON_API | {"stats", "queues"},
    "apply": COMMON_API | {"stats", "queues", "tasks", "workers",
                           "send_email"},
}

SECTIONS = ("schedule", "condition", "apply")


def name_problem(name: str, *, attribute: bool = False) -> str | None:
    """Say why ``name`` may not appear in a policy, or None when it may.

    The name is compared after NFKC normalisation, which is what Python
    does to identifiers, so that other Unicode spellings of a forbidden
    name (full-width letters, ligatures, mathematical alphabets) are
    refused as the name they stand for.
    """
    normal = unicodedata.normalize("NFKC", name)
    shown = repr(name) if normal == name else f"{name!r} (read as {normal!r})"
    if normal.startswith("_"):
        return f"{shown}: names that begin with an underscore are not allowed"
    if attribute:
        if normal in SPECIAL_ATTRIBUTES:
            return f"{shown}: this attribute is not allowed"
        return None
    if normal in FORBIDDEN_NAMES:
        return f"{shown} is not allowed"
    return None


# The name the compiler routes ``<expr>.format`` through; policy code
# cannot spell it (leading underscore), the child runtime defines it.
FORMAT_HOOK = "__cm_format__"
