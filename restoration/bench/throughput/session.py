"""What the sections of one benchmark run share: its images, where it writes, and what was started for it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from restoration.bench.throughput.work import Work

Progress = Callable[[str], None]  # called with one line per step


@dataclass(frozen=True)
class Session:
    work: Work
    root: str  # s3:// prefix or local folder this run writes under
    tag: str  # the run's unique name (UTC time + random suffix)
    ray_startup_s: float | None  # None when Ray was already up
    default_threads: int  # torch threads of this process before any section changed them
    extra_pids: dict[str, int] = field(default_factory=dict)  # processes outside Ray whose CPU counts (the S3 server)
