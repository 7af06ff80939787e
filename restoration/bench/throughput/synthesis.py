"""The synthesis section: the raw generator loop (same batch, threads and precision as `GeneratorActor`, one loop per
actor, all at once) against `run_synthesize` writing Parquet, end to end and in steady state."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from restoration import runs, schemas, storage
from restoration.bench.throughput.config import ThroughputConfig
from restoration.bench.throughput.sampler import Resources, ResourceSampler, own_cpu
from restoration.bench.throughput.session import Progress, Session
from restoration.bench.throughput.timing import LoopTiming, Steady, split, steady_state, sync
from restoration.cluster import Pool, actor_resources


@dataclass
class SynthesisRun:
    """One `run_synthesize`, measured."""

    images: int  # rows written without an error
    errors: int
    complete: bool
    seconds: float
    cpu_s: float  # the driver, every Ray worker of this node and the embedded S3 server
    phase_seconds: dict[str, float]
    output: str
    resources: Resources
    first_image_s: float  # from the start of `run_synthesize` to the first generator batch
    steady: Steady

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


@dataclass
class SynthesisResult:
    precision: str
    pool: Pool  # the generator actors as `run_synthesize` sizes them; the raw loops run on as many threads
    raw: LoopTiming
    raw_again: LoopTiming  # shorter, at the end: the machine's drift (see the restore section's limit loop again)
    pipeline: SynthesisRun

    @property
    def ratios(self) -> dict[str, float]:
        raw, steady = self.raw.images_per_s, self.pipeline.steady.work_per_s
        return {
            "pipeline_over_raw": self.pipeline.images_per_s / raw,
            "steady_over_raw": steady / raw,
            "raw_again_over_raw": self.raw_again.images_per_s / raw,
            "steady_over_raw_mean": steady / ((raw + self.raw_again.images_per_s) / 2),
        }


def bench_synthesis(config: ThroughputConfig, session: Session, progress: Progress) -> SynthesisResult:
    """Raw generator loop vs `run_synthesize`, images/s."""
    import torch

    from restoration.inference import GeneratorActor
    from restoration.pipelines.synthesize import SynthesizeConfig, data_share, run_synthesize

    synth_config = SynthesizeConfig(
        model=config.synth_model,
        output=storage.join(session.root, "synthesis"),
        count=config.synth_count,
        batch_size=config.synth_batch_size,
        run_id=f"bench-{session.tag}",
    )
    pool = actor_resources(None, None, lambda: data_share(synth_config))
    actor = GeneratorActor(synth_config, run_id="raw", threads=pool.threads)
    latent_dim = actor.loaded.config.latent_dim
    generator = actor.module.generator if actor.loaded.kind == "dcgan" else actor.module.decode
    z = torch.randn(config.synth_batch_size, latent_dim, generator=torch.Generator().manual_seed(config.seed))
    z = z.to(actor.device, actor.dtype)
    bf16, device = synth_config.precision == "bf16", actor.device

    def raw_loop(images: int) -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            done = 0
            while done < images:
                n = min(config.synth_batch_size, images - done)
                generator(z[:n])
                done += n

    def timed_raw_loops(images: int) -> LoopTiming:
        """`images` images, one loop per actor of the pipeline, each on its threads (after a warm-up, whose CPU
        time counts)."""
        cpu0 = own_cpu()
        torch.set_num_threads(pool.threads)
        raw_loop(config.synth_batch_size)
        sync(device)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(pool.actors) as threads:
            list(threads.map(raw_loop, split(images, pool.actors)))
        sync(device)
        timing = LoopTiming(images, 0.0, time.perf_counter() - t0, own_cpu() - cpu0, pool.actors)
        torch.set_num_threads(session.default_threads)
        return timing

    progress(f"synthesis: raw generator loop, {config.synth_count} images, {pool.actors} at once")
    raw = timed_raw_loops(config.synth_count)

    progress(f"synthesis: run_synthesize, {config.synth_count} images")
    with ResourceSampler(extra=session.extra_pids) as sampler:
        started_at = time.time()
        report = run_synthesize(synth_config)
    written = runs.read_output(report.output, ["generated_at", "error"], schemas.SYNTH_OUTPUT_SCHEMA)
    ok = np.array([e is None for e in written.column("error").to_pylist()], bool)
    stamps = np.asarray(written.column("generated_at").to_pylist(), dtype=np.float64)[ok]
    pipeline = SynthesisRun(
        images=report.rows_out - report.errors,
        errors=report.errors,
        complete=report.complete,
        seconds=report.seconds,
        cpu_s=sampler.result.run_cpu_s,
        phase_seconds=report.phase_seconds,
        output=report.output,
        resources=sampler.result,
        first_image_s=float(stamps.min()) - started_at if len(stamps) else float("nan"),
        steady=steady_state(stamps, np.ones(len(stamps)), sampler, "GeneratorActor"),
    )

    progress("synthesis: raw generator loop again")
    raw_again = timed_raw_loops(max(pool.actors * config.synth_batch_size, config.synth_count // 8))
    return SynthesisResult(
        precision=synth_config.precision,
        pool=pool,
        raw=raw,
        raw_again=raw_again,
        pipeline=pipeline,
    )
