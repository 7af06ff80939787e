"""What one run of `restoration bench throughput` measured: the environment and a result per section."""

from __future__ import annotations

from dataclasses import dataclass, field

from restoration.bench.throughput.config import ThroughputConfig
from restoration.bench.throughput.restore import RestoreResult
from restoration.bench.throughput.synthesis import SynthesisResult
from restoration.bench.throughput.training import TrainingResult


@dataclass
class Environment:
    cpu: str
    cpus: int | None
    cpu_bf16_units: bool
    cuda: str | None  # the GPU's name
    torch: str
    ray: str
    python: str
    default_torch_threads: int
    load_average_at_start: tuple[float, float, float]


@dataclass
class ThroughputResult:
    """Every number one run measured (`write_report` writes it as JSON); a section not run is None."""

    config: ThroughputConfig
    environment: Environment
    store: str  # where the run wrote
    ray_startup_s: float | None  # None when Ray was already up
    ray_started_here: bool
    restore: RestoreResult | None
    upscale: RestoreResult | None
    synthesis: SynthesisResult | None
    training: TrainingResult | None
    driver_peak_rss_mb_lifetime: float
    load_average_at_end: tuple[float, float, float]
    wall_seconds: float
    notes: list[str] = field(default_factory=list)  # plain-language notes on what the numbers show
