"""Tenants: who may touch which workers, tasks, queues and mail recipients.

Tenants are configured in a TOML file::

    [default]                 # the scope of policies with no tenant
    workers = ["*"]
    tasks = ["*"]

    [tenants.media]
    workers = ["media-*@*"]               # glob patterns
    tasks = ["media.tasks.*"]
    queues = ["media", "media.*"]
    recipients = ["*@media.example.com"]

    [tenants.media.limits]
    memory_mb = 128
    cpu_time_s = 2
    wall_timeout_s = 10
    max_calls = 100
    output_bytes = 65536
    emails_per_run = 2
    emails_per_hour = 10
    runs_in_parallel = 2

A scope left out allows nothing, except in ``[default]`` when no file is
given at all (then the default tenant may touch everything). Patterns
match whole names, case-sensitively (addresses case-insensitively).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sandboxhost.limits import MIB, RunLimits

from manager.errors import ConfigurationError

logger = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
SCOPES = ("workers", "tasks", "queues", "recipients")
TENANT_NAME_RE = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")

_LIMIT_KEYS = {
    "memory_mb", "cpu_time_s", "wall_timeout_s", "max_calls",
    "output_bytes", "emails_per_run", "emails_per_hour", "runs_in_parallel",
}
# Counts and the CPU rlimit (whole seconds) take whole numbers only.
_WHOLE_LIMIT_KEYS = _LIMIT_KEYS - {"memory_mb", "wall_timeout_s"}


@dataclass(frozen=True)
class Patterns:
    """Glob patterns that whole names must match."""

    globs: tuple[str, ...] = ()
    case_sensitive: bool = True
    _compiled: tuple = field(default=(), repr=False, compare=False)

    @classmethod
    def of(cls, globs, *, case_sensitive: bool = True) -> "Patterns":
        flags = 0 if case_sensitive else re.IGNORECASE
        compiled = tuple(re.compile(fnmatch.translate(g), flags)
                         for g in globs)
        return cls(tuple(globs), case_sensitive, compiled)

    @property
    def everything(self) -> bool:
        return "*" in self.globs

    def allows(self, name: str) -> bool:
        return any(p.match(name) for p in self._compiled)

    def keep(self, names) -> list[str]:
        return [n for n in names if self.allows(n)]


@dataclass(frozen=True)
class Tenant:
    """One tenant: its scope and its budgets."""

    name: str
    workers: Patterns
    tasks: Patterns
    queues: Patterns
    recipients: Patterns
    limits: RunLimits = RunLimits()
    emails_per_run: int = 5
    emails_per_hour: int = 20
    # One run at a time by default, so with the default two slots no
    # tenant can hold every slot.
    runs_in_parallel: int = 1

    def scope(self, kind: str) -> Patterns:
        return getattr(self, kind)


def unrestricted(name: str = DEFAULT_TENANT) -> Tenant:
    """A tenant that may touch everything (no tenants file)."""
    everything = Patterns.of(["*"])
    return Tenant(name, everything, everything, everything,
                  Patterns.of(["*"], case_sensitive=False))


@dataclass(frozen=True)
class Tenants:
    """Every configured tenant, and the default one."""

    default: Tenant
    named: dict[str, Tenant]

    def get(self, name: str | None) -> Tenant:
        if name in (None, "", DEFAULT_TENANT):
            return self.default
        try:
            return self.named[name]
        except KeyError:
            raise ConfigurationError(f"unknown tenant {name!r}; configured:"
                                     f" {', '.join(sorted(self.named)) or 'none'}"
                                     ) from None

    @property
    def names(self) -> list[str]:
        return [DEFAULT_TENANT, *sorted(self.named)]


def single_tenant() -> Tenants:
    """No tenants file: one default tenant that may touch everything."""
    return Tenants(unrestricted(), {})


def load_tenants(path: str | Path | None) -> Tenants:
    """Read the tenants file; no file means one unrestricted tenant."""
    if path is None:
        return single_tenant()
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigurationError(f"cannot read the tenants file {path}:"
                                 f" {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"the tenants file {path} is not valid"
                                 f" TOML: {exc}") from exc
    return parse_tenants(data, str(path))


def parse_tenants(data: dict, where: str = "tenants file") -> Tenants:
    unknown = set(data) - {"default", "tenants"}
    if unknown:
        raise ConfigurationError(f"{where}: unknown section(s)"
                                 f" {', '.join(sorted(unknown))}")
    default = _tenant(DEFAULT_TENANT, data.get("default", {}), where)
    named = {}
    for name, spec in data.get("tenants", {}).items():
        if not TENANT_NAME_RE.match(name) or name == DEFAULT_TENANT:
            raise ConfigurationError(f"{where}: {name!r} is not a valid"
                                     " tenant name")
        named[name] = _tenant(name, spec, where)
    return Tenants(default, named)


def _tenant(name: str, spec: dict, where: str) -> Tenant:
    if not isinstance(spec, dict):
        raise ConfigurationError(f"{where}: tenant {name} must be a table")
    unknown = set(spec) - set(SCOPES) - {"limits"}
    if unknown:
        raise ConfigurationError(f"{where}: tenant {name}: unknown key(s)"
                                 f" {', '.join(sorted(unknown))}")
    scopes = {}
    for kind in SCOPES:
        globs = spec.get(kind, [])
        if isinstance(globs, str):
            globs = [globs]
        if not isinstance(globs, list) or not all(isinstance(g, str) and g
                                                  for g in globs):
            raise ConfigurationError(f"{where}: tenant {name}: {kind} must"
                                     " be a list of patterns")
        scopes[kind] = Patterns.of(globs,
                                   case_sensitive=kind != "recipients")
    limits = spec.get("limits", {})
    unknown = set(limits) - _LIMIT_KEYS
    if unknown:
        raise ConfigurationError(f"{where}: tenant {name}: unknown limit(s)"
                                 f" {', '.join(sorted(unknown))}")
    for key, value in limits.items():
        kinds = (int,) if key in _WHOLE_LIMIT_KEYS else (int, float)
        if not isinstance(value, kinds) or isinstance(value, bool) \
                or not 0 < value < math.inf:
            raise ConfigurationError(
                f"{where}: tenant {name}: limit {key} must be a positive"
                f" {'whole number' if key in _WHOLE_LIMIT_KEYS else 'number'}")
    base = RunLimits()
    try:
        run_limits = _run_limits(base, limits)
    except ValueError as exc:
        raise ConfigurationError(f"{where}: tenant {name}: {exc}") from None
    return Tenant(name, scopes["workers"], scopes["tasks"], scopes["queues"],
                  scopes["recipients"], run_limits,
                  int(limits.get("emails_per_run", 5)),
                  int(limits.get("emails_per_hour", 20)),
                  int(limits.get("runs_in_parallel", 1)))


def _run_limits(base: RunLimits, limits: dict) -> RunLimits:
    return base.replace(
        memory_bytes=int(limits.get("memory_mb", base.memory_bytes / MIB)
                         * MIB),
        cpu_time_s=int(limits.get("cpu_time_s", base.cpu_time_s)),
        wall_timeout_s=float(limits.get("wall_timeout_s",
                                        base.wall_timeout_s)),
        max_calls=int(limits.get("max_calls", base.max_calls)),
        output_bytes=int(limits.get("output_bytes", base.output_bytes)),
    )
