"""The language's allow and deny lists, as frozen constants.

Everything here is data: ``language`` applies it to the syntax tree, and the
child runtime uses the same lists (safe formatting, the builtins it offers).
An entry is added only with the reason it is safe or must be refused.
"""

from __future__ import annotations

import ast
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


# Syntax nodes each section accepts. A node type absent from these sets is
# refused, so a new Python release cannot widen the language quietly.
_EXPRESSION_NODES = frozenset({
    ast.Expr, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.IfExp, ast.Dict,
    ast.Set, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
    ast.Compare, ast.Call, ast.keyword, ast.FormattedValue, ast.JoinedStr,
    ast.Constant, ast.Attribute, ast.Subscript, ast.Starred, ast.Name,
    ast.List, ast.Tuple, ast.Slice, ast.comprehension,
    ast.Load, ast.Store,
    ast.And, ast.Or,
    ast.Add, ast.Sub, ast.Mult, ast.MatMult, ast.Div, ast.Mod, ast.Pow,
    ast.LShift, ast.RShift, ast.BitOr, ast.BitXor, ast.BitAnd,
    ast.FloorDiv,
    ast.Invert, ast.Not, ast.UAdd, ast.USub,
    ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Is, ast.IsNot,
    ast.In, ast.NotIn,
})

ALLOWED_NODES = {
    "schedule": _EXPRESSION_NODES,
    "condition": _EXPRESSION_NODES,
    "apply": _EXPRESSION_NODES | {
        ast.Assign, ast.AugAssign, ast.If, ast.Pass, ast.NamedExpr,
    },
}

# What to call a refused node in a message; anything unlisted is named by
# its class.
NODE_WORDS = {
    ast.Import: "import", ast.ImportFrom: "import",
    ast.FunctionDef: "def", ast.AsyncFunctionDef: "async def",
    ast.Lambda: "lambda", ast.ClassDef: "class", ast.Return: "return",
    ast.Yield: "yield", ast.YieldFrom: "yield from", ast.Global: "global",
    ast.Nonlocal: "nonlocal", ast.For: "a for statement",
    ast.AsyncFor: "async for", ast.While: "a while statement",
    ast.Try: "try", ast.TryStar: "try", ast.Raise: "raise",
    ast.With: "with", ast.AsyncWith: "async with", ast.Delete: "del",
    ast.Assert: "assert", ast.Await: "await", ast.Break: "break",
    ast.Continue: "continue", ast.Match: "match",
    ast.AnnAssign: "an annotated assignment", ast.Assign: "assignment",
    ast.AugAssign: "assignment", ast.NamedExpr: "assignment (:=)",
    ast.If: "an if statement", ast.Pass: "a statement",
    ast.Del: "del",
}

NODE_HINTS = {
    ast.For: " (use a comprehension or a generator expression)",
    ast.While: " (use a comprehension or a generator expression)",
}
