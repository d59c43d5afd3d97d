"""Load and run one policy: the steps every entry point shares.

``cmpolicy try``, ``cmpolicy run``, the scheduler and the pytest plugin all
go through here, so a policy meets the same checks, the same sandbox and
the same errors wherever it runs.

Loading checks and compiles the text (in the manager), then evaluates the
schedule section in a child and builds the schedule from the data it
returns. Running evaluates the conditions and, if one holds, the apply
section, in a fresh child whose calls are served by ``Operations``.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

from sandboxhost.errors import PolicyError, PolicySyntaxError, RunError
from sandboxhost.host import Host, RunOutcome
from sandboxhost.language import CompiledPolicy, check_and_compile
from sandboxhost.limits import RunLimits

from manager.operations import Cluster, Operations, StatsSource
from manager.mailer import Mailer
from manager.schedules import PolicySchedule, ScheduleError, build_schedule
from manager.tenants import Tenant, unrestricted

logger = logging.getLogger(__name__)


# A schedule section only builds schedule data, and it is evaluated in the
# manager loop when a policy's text changes: its run gets at most this.
SCHEDULE_WALL_TIMEOUT_S = 2.0


class PolicyLoadError(Exception):
    """Raised when a policy's schedule section fails or returns bad data."""

    def __init__(self, message: str, *, filename: str, line: int | None):
        self.message = message
        self.filename = filename
        self.line = line
        where = f"{filename}:{line}" if line else filename
        # A policy error already names its section ("in schedule at ...").
        section = "" if message.startswith("in schedule") else "in schedule: "
        super().__init__(f"{where}: error: {section}{message}")


@dataclass(frozen=True)
class LoadedPolicy:
    """A checked, compiled policy with its schedule."""

    name: str
    filename: str
    source: str
    compiled: CompiledPolicy
    schedule: PolicySchedule
    tenant: str = "default"

    @property
    def schedule_line(self) -> int | None:
        for section in self.compiled.sections:
            if section.name == "schedule":
                return section.first_line
        return None


@dataclass
class RunReport:
    """One run: when, who, and what the sandbox said."""

    run_id: str
    policy: str
    tenant: str
    started: dt.datetime
    outcome: RunOutcome
    emails: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome.ok

    @property
    def error(self) -> RunError | None:
        return self.outcome.error

    def describe_error(self) -> str | None:
        error = self.outcome.error
        if error is None:
            return None
        return describe_run_error(error)

    def as_dict(self) -> dict:
        out = self.outcome
        return {
            "run_id": self.run_id,
            "policy": self.policy,
            "tenant": self.tenant,
            "started": self.started.isoformat(),
            "duration_s": round(out.duration_s, 6),
            "condition": out.condition,
            "applied": out.applied,
            "outcome": outcome_word(out),
            "calls": [call_dict(c) for c in out.calls],
            "output": list(out.output),
            "error": None if out.error is None else out.error.as_dict(),
        }


def call_dict(call) -> dict:
    return {"op": call.op, "args": call.args, "ok": call.ok,
            "value": call.value, "error": call.error}


def outcome_word(outcome: RunOutcome) -> str:
    """ok, or the kind of failure (policy_error, timeout, limit, ...)."""
    if outcome.error is None:
        return "ok"
    return outcome.error.kind


def describe_run_error(error: RunError) -> str:
    text = str(error)
    if isinstance(error, PolicyError):
        return text
    return f"{error.kind}: {text}"


def policy_name(path: str | Path) -> str:
    return Path(path).stem


class PolicyRunner:
    """Loads and runs policies through one sandbox host."""

    def __init__(self, host: Host, *, timezone: dt.tzinfo | str = "UTC",
                 limits: RunLimits | None = None):
        self.host = host
        self.timezone = ZoneInfo(timezone) if isinstance(timezone, str) \
            else timezone
        self.limits = limits or RunLimits()

    def local_now(self, now: dt.datetime | None = None) -> dt.datetime:
        """``now`` (or the current time) as naive wall time of the app."""
        now = now or dt.datetime.now(dt.timezone.utc)
        if now.tzinfo is None:
            return now
        return now.astimezone(self.timezone).replace(tzinfo=None)

    def load(self, source: str | bytes, filename: str, *,
             name: str | None = None, tenant: Tenant | None = None,
             now: dt.datetime | None = None) -> LoadedPolicy:
        """Check, compile and evaluate the schedule section.

        Raises PolicySyntaxError or PolicyLoadError.
        """
        compiled = check_and_compile(source, filename)
        tenant = tenant or unrestricted()
        limits = tenant.limits.replace(wall_timeout_s=min(
            tenant.limits.wall_timeout_s, SCHEDULE_WALL_TIMEOUT_S))
        outcome = self.host.run(
            compiled.wire(), handler=_no_calls, mode="schedule",
            limits=limits, policy=name or policy_name(filename),
            now=self.local_now(now), fixed_clock=now is not None)
        line = next((s.first_line for s in compiled.sections
                     if s.name == "schedule"), None)
        if not outcome.ok:
            error = outcome.error
            raise PolicyLoadError(describe_run_error(error), filename=filename,
                                  line=error.line or line)
        try:
            schedule = build_schedule(outcome.schedule, self.timezone)
        except ScheduleError as exc:
            raise PolicyLoadError(str(exc), filename=filename,
                                  line=line) from exc
        text = source.decode("utf-8", "replace") if isinstance(source, bytes) \
            else source
        return LoadedPolicy(name or policy_name(filename), filename, text,
                            compiled, schedule, tenant.name)

    def run(self, policy: LoadedPolicy, *, cluster: Cluster,
            stats: StatsSource, mailer: Mailer | None,
            tenant: Tenant | None = None, now: dt.datetime | None = None,
            fixed_clock: bool | None = None) -> RunReport:
        """Run conditions and apply once, for real, in a fresh child."""
        tenant = tenant or unrestricted()
        operations = Operations(cluster, stats, mailer,
                                timezone=self.timezone, policy=policy.name,
                                tenant=tenant)
        started = (now.astimezone(dt.timezone.utc)
                   if now is not None and now.tzinfo is not None
                   else dt.datetime.now(dt.timezone.utc))
        outcome = self.host.run(
            policy.compiled.wire(), handler=operations,
            limits=tenant.limits, policy=policy.name,
            now=self.local_now(now),
            fixed_clock=(now is not None) if fixed_clock is None
            else fixed_clock)
        report = RunReport(uuid.uuid4().hex, policy.name, tenant.name,
                           started, outcome)
        _log_run_details(report)
        if outcome.ok:
            logger.info("policy %s (tenant %s, run %s): condition %s, %s,"
                        " %d call(s) in %.1f ms", policy.name, tenant.name,
                        report.run_id, outcome.condition,
                        "applied" if outcome.applied else "not applied",
                        len(outcome.calls), outcome.duration_s * 1000,
                        extra={"policy": policy.name, "tenant": tenant.name,
                               "run_id": report.run_id})
        else:
            logger.error("policy %s (tenant %s, run %s): %s", policy.name,
                         tenant.name, report.run_id,
                         printable(describe_run_error(outcome.error), 2000),
                         extra={"policy": policy.name, "tenant": tenant.name,
                                "run_id": report.run_id})
        return report


# Calls that change the cluster or send mail; reads are logged at debug.
_CHANGING_OPS = frozenset({"tasks.set", "workers.change", "workers.queues",
                           "send_email"})


MAX_LOGGED_CHARS = 500
MAX_LOGGED_LINES = 50


def printable(text, limit: int = MAX_LOGGED_CHARS) -> str:
    """Text from a policy, safe for a log line or a terminal: control
    characters escaped (no fake log lines, no escape sequences), bounded."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    return "".join(c if c.isprintable() or c == "\t" else
                   c.encode("unicode_escape").decode("ascii") for c in text)


def _log_run_details(report: RunReport) -> None:
    extra = {"policy": report.policy, "tenant": report.tenant,
             "run_id": report.run_id}
    for call in report.outcome.calls:
        level = logging.INFO if call.op in _CHANGING_OPS else logging.DEBUG
        if not logger.isEnabledFor(level):
            continue
        result = call.value if call.ok else f"refused: {call.error}"
        args = ", ".join(f"{k}={v!r}" for k, v in call.args.items())
        logger.log(level, "policy %s: %s(%s) -> %s", report.policy, call.op,
                   printable(args), printable(result), extra=extra)
    lines = "".join(report.outcome.output).splitlines()
    for line in lines[:MAX_LOGGED_LINES]:
        logger.info("policy %s says: %s", report.policy, printable(line),
                    extra=extra)
    if len(lines) > MAX_LOGGED_LINES:
        logger.info("policy %s: %d more output lines in its history",
                    report.policy, len(lines) - MAX_LOGGED_LINES, extra=extra)


def _no_calls(op: str, args: dict):
    from sandboxhost.errors import OperationError
    raise OperationError("the schedule section cannot make calls")


def load_file(runner: PolicyRunner, path: str | Path, **kw) -> LoadedPolicy:
    data = Path(path).read_bytes()
    return runner.load(data, str(path), **kw)


__all__ = ["LoadedPolicy", "PolicyLoadError", "PolicyRunner", "RunReport",
           "PolicySyntaxError", "describe_run_error", "load_file",
           "outcome_word", "policy_name"]
