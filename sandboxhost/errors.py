"""The exceptions of the sandbox.

SandboxError
 +-- PolicySyntaxError        the policy text breaks the language rules
 +-- RunError                 a run of a compiled policy did not succeed
 |    +-- PolicyError         policy code raised (bad value, failed call, ...)
 |    +-- ChildDied           the child ended without reporting (signal, exit)
 |    +-- ChildTimedOut       the child exceeded its wall-clock limit
 |    +-- LimitExceeded       the child exceeded a budget (calls, output, ...)
 |    +-- ProtocolViolation   the child sent a malformed or unexpected frame
 +-- HostError                the host itself cannot run children
"""

from __future__ import annotations

from collections import namedtuple


class SandboxError(Exception):
    """Root of every error raised by ``sandboxhost``."""


_ViolationFields = namedtuple(
    "_ViolationFields",
    "filename section line column source_line message")


class Violation(_ViolationFields):
    """One broken rule, located in the policy file.

    A named tuple, not a dataclass: this module is imported by the template
    process that forks every child, and dataclasses would bring ``inspect``.
    """

    __slots__ = ()

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}:{self.column}: error: {self.message}"

    def as_dict(self) -> dict:
        return {
            "file": self.filename,
            "section": self.section,
            "line": self.line,
            "column": self.column,
            "source_line": self.source_line,
            "message": self.message,
        }


class PolicySyntaxError(SandboxError):
    """Raised when a policy breaks the language; carries every violation."""

    def __init__(self, violations: list[Violation] | tuple[Violation, ...]):
        self.violations = tuple(violations)
        super().__init__("\n".join(str(v) for v in self.violations))

    @property
    def first(self) -> Violation:
        return self.violations[0]


class RunError(SandboxError):
    """Base of the ways a run can fail; ``section``/``line`` when known."""

    kind = "error"

    def __init__(self, message: str, *, section: str | None = None,
                 line: int | None = None):
        self.message = message
        self.section = section
        self.line = line
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = ""
        if self.section:
            where = f"in {self.section}"
            if self.line:
                where += f" at line {self.line}"
            where += ": "
        return where + self.message

    def as_dict(self) -> dict:
        return {"kind": self.kind, "section": self.section,
                "line": self.line, "message": self.message}


class PolicyError(RunError):
    """Raised when policy code raised an exception; names its line."""

    kind = "policy_error"

    def __init__(self, message: str, *, section: str | None = None,
                 line: int | None = None, type_name: str = "Exception"):
        self.type_name = type_name
        super().__init__(message, section=section, line=line)

    def _describe(self) -> str:
        text = super()._describe()
        return f"{text} ({self.type_name})" if self.type_name else text


class ChildDied(RunError):
    """Raised when the child ended before reporting a result."""

    kind = "child_died"

    def __init__(self, message: str, *, signal: int | None = None,
                 exit_code: int | None = None, **kw):
        self.signal = signal
        self.exit_code = exit_code
        super().__init__(message, **kw)


class ChildTimedOut(RunError):
    """Raised when the child ran past its wall-clock limit and was killed."""

    kind = "timeout"


class LimitExceeded(RunError):
    """Raised when the child went over a budget: calls, output, frames."""

    kind = "limit"

    def __init__(self, message: str, *, limit: str, **kw):
        self.limit = limit
        super().__init__(message, **kw)


class ProtocolViolation(RunError):
    """Raised when the child sent a frame that is malformed or unexpected."""

    kind = "protocol"


class HostError(SandboxError):
    """Raised when the host cannot start or reach its template process."""


class OperationError(SandboxError):
    """Raised by a call handler to refuse a call; the child re-raises it."""

    def __init__(self, message: str, *, type_name: str = "PolicyError"):
        self.message = message
        self.type_name = type_name
        super().__init__(message)
