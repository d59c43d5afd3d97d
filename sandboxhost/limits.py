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
    # All frames from the child in one run: what the manager holds for it
    # (calls and output are kept until the run ends).
    channel_bytes: int = 8 * MIB
    # Kernel layers; each is skipped (and reported once) where unavailable.
    seccomp: bool = True
    landlock: bool = True
    # When the host runs as root, children run as this user.
    run_as_user: str = "nobody"

    def __post_init__(self) -> None:
        for name, low, high in _BOUNDS:
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"{name} must be a whole number from {low}"
                                 f" to {high}, not {value!r}")
        timeout = self.wall_timeout_s
        if type(timeout) not in (int, float) or not 0 < timeout <= MAX_WALL_S:
            raise ValueError(f"wall_timeout_s must be a number of seconds"
                             f" above 0 and at most {MAX_WALL_S}, not"
                             f" {timeout!r}")
        if not isinstance(self.run_as_user, str):
            raise ValueError("run_as_user must be a user name")
        for name in ("seccomp", "landlock"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be True or False")

    def replace(self, **changes) -> "RunLimits":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


# (field, lowest, highest): what the kernel and the protocol can take. The
# child's channel is fd 3, so it needs at least 4 descriptors.
_BOUNDS = (
    ("cpu_time_s", 1, 24 * 3600),
    ("memory_bytes", 16 * MIB, 1 << 46),
    ("open_files", 4, 1 << 16),
    ("max_calls", 0, 1 << 31),
    ("output_bytes", 0, 1 << 31),
    ("frame_bytes", 1024, 1 << 30),
    ("channel_bytes", 1024, 1 << 34),
)
MAX_WALL_S = 24 * 3600

DEFAULT_LIMITS = RunLimits()
