"""What the sections time: a raw model loop, and a pipeline run's steady state from its rows' completion stamps.

A pipeline's end-to-end rate includes filling and draining it; its steady state is the rate in between: the work
after the first model batch over the span from that batch's stamp to the last one (`restored_at`, `generated_at`:
when the model finished each row). Only that compares with the raw loop, which has no start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from restoration.bench.throughput.sampler import ResourceSampler, SteadyCpu, steady_cpu

MIN_STEADY_BATCHES = 3  # model batches (distinct stamps) a steady-state figure needs at the least


@dataclass
class LoopTiming:
    """A timed raw loop: `images` images (`megapixels` of them) in `seconds`, by `streams` loops at once."""

    images: int
    megapixels: float  # 0 where the work is not counted in pixels (generators)
    seconds: float
    cpu_s: float  # this process's, all threads
    streams: int

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.seconds

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


@dataclass
class Steady:
    """A pipeline run's steady state (see the module docstring)."""

    span_s: float  # from the first batch's stamp to the last
    batches: int  # distinct stamps
    valid: bool  # at least MIN_STEADY_BATCHES batches over a span > 0: the span makes a rate
    work_per_s: float  # work (megapixels or images) after the first batch over the span; nan without a span
    rows_per_s: float
    cpu: SteadyCpu | None  # where the CPU went meanwhile, when the sampler saw enough of it


def steady_state(stamps: np.ndarray, work: np.ndarray, sampler: ResourceSampler, model: str) -> Steady:
    """The steady state of a run from its rows' completion stamps.

    Args:
        stamps: per-row Unix seconds when the model finished the row (one stamp per model batch).
        work: per-row work (megapixels or images) in the same order.
        sampler: the sampler that watched the run.
        model: a name in the model actors' role ("RestoreActor", "GeneratorActor").
    """
    cpu = steady_cpu(sampler, stamps, work, model)
    if not len(stamps):
        return Steady(0.0, 0, False, float("nan"), float("nan"), cpu)
    span = float(stamps.max() - stamps.min())
    batches = len(np.unique(stamps))
    after_first = stamps > stamps.min()
    return Steady(
        span_s=span,
        batches=batches,
        valid=batches >= MIN_STEADY_BATCHES and span > 0,
        work_per_s=float(work[after_first].sum()) / span if span > 0 else float("nan"),
        rows_per_s=int(after_first.sum()) / span if span > 0 else float("nan"),
        cpu=cpu,
    )


def split(total: int, parts: int) -> list[int]:
    """`total` items in `parts` shares as equal as can be."""
    return [total // parts + (k < total % parts) for k in range(parts)]


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPUs), so that a timer around it sees it done."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
