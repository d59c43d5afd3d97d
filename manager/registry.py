"""The policies the manager runs: from the store and a policy directory.

``cmpolicy add`` puts a policy in the store; ``--policies DIR`` keeps the
store in step with a directory of ``.policy`` files (files at the top
belong to the default tenant, files in ``DIR/<tenant>/`` to that tenant).
The registry compiles each policy and evaluates its schedule section in a
child when its text changes. A file whose new text does not check, or
whose schedule section fails, is reported once and its policy keeps running
in its last good version (the store keeps that text); a removed file
removes its policy.

Each stored policy remembers, in its ``schedule`` column, the schedule data
a child returned for its text (with the text's hash) and, for files, where
it came from.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from sandboxhost.errors import PolicySyntaxError

from manager.errors import ConfigurationError, StoreError
from manager.runner import (LoadedPolicy, PolicyLoadError, PolicyRunner,
                            printable)
from manager.schedules import ScheduleError, build_schedule
from manager.store import Policy, Store
from manager.tenants import DEFAULT_TENANT, Tenants

logger = logging.getLogger(__name__)

UTC = dt.timezone.utc


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class Entry:
    """One policy as the scheduler sees it."""

    name: str
    tenant: str
    loaded: LoadedPolicy | None
    enabled: bool
    source_sha: str
    last_run_at: dt.datetime | None
    next_due: dt.datetime | None
    error: str | None = None

    def schedule_next(self, after: dt.datetime) -> None:
        if self.loaded is None:
            self.next_due = None
            return
        self.next_due = self.loaded.schedule.next_after(after)


class Registry:
    """Compiled, scheduled policies, kept in step with their sources."""

    def __init__(self, runner: PolicyRunner, store: Store, tenants: Tenants,
                 policies_dir: str | Path | None = None):
        self.runner = runner
        self.store = store
        self.tenants = tenants
        self.policies_dir = Path(policies_dir) if policies_dir else None
        self.entries: dict[str, Entry] = {}
        self._seen: dict[str, tuple] = {}  # file path -> (mtime_ns, size)
        self._reported: dict[str, str] = {}
        self._modified: dict[str, float] = {}

    # -- sources ---------------------------------------------------------------

    def refresh(self, now: dt.datetime) -> bool:
        """Bring the registry in step with the directory and the store."""
        changed = False
        if self.policies_dir is not None:
            changed |= self._sync_directory(now)
        changed |= self._sync_store(now)
        return changed

    def _sync_directory(self, now: dt.datetime) -> bool:
        found: dict[str, tuple[Path, str]] = {}
        if not self.policies_dir.is_dir():
            self._report("<dir>", f"the policy directory {self.policies_dir}"
                         " does not exist")
            return False
        for path in sorted(self.policies_dir.glob("*.policy")):
            found[path.stem] = (path, DEFAULT_TENANT)
        for path in sorted(self.policies_dir.glob("*/*.policy")):
            found[f"{path.parent.name}.{path.stem}"] = (path,
                                                        path.parent.name)
        changed = False
        for name, (path, tenant) in found.items():
            try:
                stat = path.stat()
            except OSError:
                continue
            key = (stat.st_mtime_ns, stat.st_size)
            if self._seen.get(str(path)) == key:
                continue
            self._seen[str(path)] = key
            try:
                source = path.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                self._report(name, f"cannot read {path}: {exc.strerror}")
                continue
            stored = self.store.get_policy(name)
            if stored is not None and stored.source == source:
                continue
            # The store keeps the last good text, so the good version also
            # survives a restart of the manager: a new text is stored only
            # once it checks and its schedule section gives a schedule.
            keeps = "; its last good version keeps running" if stored else ""
            try:
                loaded = self.runner.load(source, str(path), name=name,
                                          tenant=self.tenants.get(tenant))
            except (PolicySyntaxError, PolicyLoadError, ConfigurationError,
                    ScheduleError) as exc:
                self._report(name, f"{exc}{keeps}")
                continue
            origin = dict((stored.schedule or {}) if stored else {})
            # The schedule a child just gave for this text, so that loading
            # it from the store runs no second child.
            origin.update(origin=str(path), sha=source_hash(source),
                          data=loaded.schedule.data)
            self.store.upsert_policy(name, source, tenant=tenant,
                                     schedule=origin, now=now.timestamp())
            logger.info("policy %s: %s %s", name,
                        "changed in" if stored else "added from", path)
            changed = True
        for policy in self.store.list_policies():
            origin = (policy.schedule or {}).get("origin")
            if origin and Path(origin).is_relative_to(self.policies_dir) \
                    and policy.name not in found:
                self.store.delete_policy(policy.name)
                self._seen.pop(origin, None)
                logger.info("policy %s: removed (its file %s is gone)",
                            policy.name, origin)
                changed = True
        return changed

    def _sync_store(self, now: dt.datetime) -> bool:
        policies = {p.name: p for p in self.store.list_policies()}
        changed = False
        for name in list(self.entries):
            if name not in policies:
                del self.entries[name]
                self._modified.pop(name, None)
                changed = True
        for name, policy in policies.items():
            if self._modified.get(name) == policy.modified:
                continue
            self._modified[name] = policy.modified
            self._load(policy, now)
            changed = True
        return changed

    # -- loading -----------------------------------------------------------------

    def _load(self, policy: Policy, now: dt.datetime) -> None:
        sha = source_hash(policy.source)
        entry = self.entries.get(policy.name)
        last_run = (dt.datetime.fromtimestamp(policy.last_run_at, UTC)
                    if policy.last_run_at else None)
        if entry is not None and entry.source_sha == sha:
            entry.enabled = policy.enabled
            return
        try:
            tenant = self.tenants.get(policy.tenant)
            loaded = self._compile(policy, sha, tenant)
        except Exception as exc:  # noqa: BLE001 - one policy, never the loop
            # Expected: syntax, schedule and tenant errors. Anything else is
            # a bug, but it must stay this policy's problem.
            if not isinstance(exc, (PolicySyntaxError, PolicyLoadError,
                                    ConfigurationError, ScheduleError)):
                logger.exception("policy %s: could not be loaded",
                                 policy.name)
            self._report(policy.name, str(exc))
            if entry is not None:
                entry.enabled = policy.enabled
                entry.error = str(exc)
                logger.warning("policy %s: keeps running its last good"
                               " version", policy.name)
            else:
                self.entries[policy.name] = Entry(
                    policy.name, policy.tenant, None, policy.enabled, sha,
                    last_run, None, str(exc))
            return
        self._reported.pop(policy.name, None)
        anchor = last_run or dt.datetime.fromtimestamp(policy.modified, UTC)
        fresh = Entry(policy.name, policy.tenant, loaded, policy.enabled, sha,
                      last_run, None)
        fresh.schedule_next(min(anchor, now))
        self.entries[policy.name] = fresh
        logger.info("policy %s (tenant %s): loaded, %s, next run %s",
                    policy.name, policy.tenant, loaded.schedule.describe(),
                    fresh.next_due.isoformat() if fresh.next_due else "never")

    def _compile(self, policy: Policy, sha: str, tenant) -> LoadedPolicy:
        """Compile; reuse schedule data a child returned for this text."""
        cached = policy.schedule or {}
        filename = cached.get("origin") or f"<policy {policy.name}>"
        if cached.get("sha") == sha and cached.get("data"):
            from sandboxhost.language import check_and_compile
            compiled = check_and_compile(policy.source, filename)
            schedule = build_schedule(cached["data"], self.runner.timezone)
            return LoadedPolicy(policy.name, filename, policy.source,
                                compiled, schedule, tenant.name)
        loaded = self.runner.load(policy.source, filename, name=policy.name,
                                  tenant=tenant)
        try:
            self.store.upsert_policy(
                policy.name, policy.source, tenant=policy.tenant,
                schedule={**cached, "sha": sha,
                          "data": loaded.schedule.data},
                now=policy.modified)
        except StoreError as exc:
            logger.warning("policy %s: could not cache its schedule: %s",
                           policy.name, exc)
        return loaded

    def _report(self, name: str, message: str) -> None:
        """Log a policy's problem once, not on every refresh."""
        if self._reported.get(name) != message:
            self._reported[name] = message
            # Policy text and its errors, one escaped line each.
            logger.error("policy %s: %s", name, "\n".join(
                printable(line, 2000) for line in message.splitlines()))

    # -- queries -------------------------------------------------------------------

    def due(self, now: dt.datetime, busy: set[str]) -> list[Entry]:
        return sorted((e for e in self.entries.values()
                       if e.enabled and e.loaded is not None
                       and e.next_due is not None and e.next_due <= now
                       and e.name not in busy),
                      key=lambda e: (e.next_due, e.name))

    def next_due(self, busy: set[str]) -> dt.datetime | None:
        times = [e.next_due for e in self.entries.values()
                 if e.enabled and e.loaded is not None and e.next_due
                 and e.name not in busy]
        return min(times) if times else None
