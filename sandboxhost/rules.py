"""The syntax the language accepts, as frozen constants.

Names are in ``sandboxhost.names`` (the child needs those and nothing of
``ast``); the tables here are for the checker only. A node type absent
from ``ALLOWED_NODES`` is refused.
"""

from __future__ import annotations

import ast

from sandboxhost.names import (  # noqa: F401 - the checker's vocabulary
    ALLOWED_BUILTINS,
    ALLOWED_CONSTANTS,
    API_NAMES,
    COMMON_API,
    FORBIDDEN_NAMES,
    FORMAT_HOOK,
    SECTION_API,
    SECTIONS,
    SPECIAL_ATTRIBUTES,
    name_problem,
)

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
