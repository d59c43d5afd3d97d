"""Budgets of one run. Every number carries its unit in its name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

MIB = 1024 * 1024


@dataclass(frozen=True)
class RunLimits:
    """What one child may use; enforced by the child's rlimits and the host."""

    # Wall time from fork to the last frame; the host kills the process
    # group when it runs out (time.sleep and blocking waits end here).
    wall_timeout_s: float = 10.0
    # RLIMIT_CPU soft limit; the hard limit is one second above it so the
    # child is told by SIGXCPU before the kernel's SIGKILL.
    cpu_time_s: int = 2
    # RLIMIT_AS; a forked child starts at about 17 MiB of address space.
    memory_bytes: int = 256 * MIB
    # RLIMIT_NOFILE: the channel, the standard streams and a little slack.
    open_files: int = 8
    # Calls to the manager (tasks, workers, stats, send_email) in one run.
    max_calls: int = 200
    # Bytes of print() output kept for one run.
    output_bytes: int = 64 * 1024
    # Largest frame the host accepts from the child.
    frame_bytes: int = 256 * 1024
    # Kernel layers; each is skipped (and reported once) where unavailable.
    seccomp: bool = True
    landlock: bool = True
    # When the host runs as root, children run as this user.
    run_as_user: str = "nobody"

    def replace(self, **changes) -> "RunLimits":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_LIMITS = RunLimits()
