"""The restore and upscale sections: the same model file on the same images, three ways.

- limit: the raw model forward loop over pre-decoded tensors already in memory (`ModelRunner.forward`: BN folded,
  the pipeline's batch size, sliced on CPUs as the actor slices it), with the threads, precision and memory format
  that `RestoreActor` chooses on this cluster, one loop per model actor, all at once (threads of this process).
  Nothing but the model runs, so no pipeline can beat it on the same hardware.
- ours: the images as input shards (`data.ingest`), then `run_restore` to Parquet; end to end adds the Ray start-up
  (timed on its own, before the run).
- the limit loop again at the end, as long as the first: the ratios are taken against the mean of the two, so that a
  machine whose speed drifts during the run (a shared VM) does not bias them.
- naive: what a user writes without us: get the object -> Pillow decode -> torch forward (same model, fp32, BN as
  trained, default torch threads, one image at a time) -> PNG encode -> put the object, sequentially.

The restore section runs the restorer (`--model`) on the noisy crops; the upscale section the upscaler
(`--upscale-model`) on the clean ones, which become `scale` times larger. Both count megapixels of the output.
"""

from __future__ import annotations

import io
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image

from restoration import codec, runs, schemas, storage
from restoration.bench.throughput.config import ThroughputConfig
from restoration.bench.throughput.sampler import Resources, ResourceSampler, driver_peak_mb, own_cpu, reset_peak
from restoration.bench.throughput.session import Progress, Session
from restoration.bench.throughput.timing import LoopTiming, Steady, split, steady_state, sync
from restoration.bench.throughput.work import Staged, WorkImage, megapixels, repeat_work, split_s3, stage_inputs
from restoration.cluster import Pool, actor_resources

if TYPE_CHECKING:
    import torch

CALIBRATION_BATCHES = 2  # timed batches (after one warm-up batch) that size the run for --min-model-seconds
# No pipeline outruns the raw model: a steady state more than this factor above the limit says the limit loop ran on
# a busier machine, or too few batches were timed.
STEADY_SLACK = 1.05


class Batch(NamedTuple):
    images: int
    megapixels: float  # of the model's output
    x: torch.Tensor  # (images, C, H, W) on the actor's device; a gray model gets (3 images, 1, H, W) of colour ones


@dataclass
class RunnerSetup:
    """How the model actor runs the model on this cluster, as the limit loop ran it."""

    threads: int
    bf16: bool
    memory_format: str
    compiled: bool
    warm_up_s: float  # one batch; with --compile one of every shape, each compiled on its first


@dataclass
class RestoreRun:
    """One `run_restore` over the staged shards, measured."""

    run_id: str
    output: str
    rows_in: int
    rows_out: int
    errors: int
    every_key_once: bool
    megapixels: float
    seconds: float
    cpu_s: float  # the driver, every Ray worker of this node and the embedded S3 server
    steady: Steady
    workers: int | None
    gpu: bool | None
    phase_seconds: dict[str, float]  # as the report gives them: setup, write, commit, summary
    # The write phase split at the first and last restored row: fill, steady, drain.
    write_split_seconds: dict[str, float]
    resources: Resources

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.seconds


@dataclass
class NaiveRun(LoopTiming):
    """The naive script's loop (one stream), with its torch threads and what the sampler saw."""

    threads: int
    resources: Resources


@dataclass
class ScaleRun:
    images: int
    ours: RestoreRun
    actor_anon_mb: float  # the restore actor's private memory at its peak

    def figure(self, name: str) -> float:
        return self.actor_anon_mb if name == "actor_anon_mb" else getattr(self.ours.resources, name)


SCALE_FIGURES = (
    "driver_peak_mb",
    "worker_peak_mb_max",
    "worker_peak_mb_sum",
    "worker_anon_mb_max",
    "worker_anon_mb_sum",
    "worker_anon_mb_concurrent",
    "actor_anon_mb",
)


@dataclass
class ScaleCheck:
    """Ours at N and at 10 N images: the peak memory may grow by at most `target_growth`."""

    small: ScaleRun
    large: ScaleRun
    target_growth: float = 0.25

    @property
    def growth(self) -> dict[str, float]:
        small, large = self.small.figure, self.large.figure
        return {name: large(name) / small(name) - 1.0 if small(name) else float("nan") for name in SCALE_FIGURES}


@dataclass
class RestoreResult:
    section: str  # "restore" or "upscale"
    model: str
    scale: int  # the model's output is this many times larger than its input a side (1 for the restorers)
    batch_size: int  # images per batch, of the limit loop and the pipeline alike
    images: int
    megapixels: float  # of the outputs
    sizes: list[tuple[int, int]]
    source: str
    pool: Pool  # the model actors as `run_restore` sizes them on this cluster
    calibration: LoopTiming
    staging: Staged
    runner: RunnerSetup
    limit: LoopTiming
    limit_driver_peak_mb: float
    ours: RestoreRun
    naive: NaiveRun
    # A shared VM's speed drifts by tens of percent within minutes, and ours ran minutes after the limit: the limit
    # loop again at the end, as long as the first, brackets the runs; the ratios are taken against their mean.
    limit_again: LoopTiming
    ray_startup_s: float | None
    scale_check: ScaleCheck | None = None

    @property
    def limit_mean_mp_per_s(self) -> float:
        """The raw model's rate: the mean of the limit loop's before and after the pipelines."""
        return (self.limit.mp_per_s + self.limit_again.mp_per_s) / 2

    @property
    def end_to_end_s(self) -> float:
        """Ours plus the Ray start-up."""
        return self.ours.seconds + (self.ray_startup_s or 0.0)

    @property
    def end_to_end_mp_per_s(self) -> float:
        return self.ours.megapixels / self.end_to_end_s

    @property
    def steady_over_limit(self) -> bool:
        """A steady state faster than the limit: a measuring artefact, not a rate (see STEADY_SLACK)."""
        fastest = max(self.limit.mp_per_s, self.limit_again.mp_per_s)
        return self.ours.steady.valid and self.ours.steady.work_per_s > STEADY_SLACK * fastest

    @property
    def steady_valid(self) -> bool:
        return self.ours.steady.valid and not self.steady_over_limit

    @property
    def ratios(self) -> dict[str, float]:
        steady, limit, again = self.ours.steady.work_per_s, self.limit.mp_per_s, self.limit_again.mp_per_s
        mean = self.limit_mean_mp_per_s
        return {
            "ours_steady_over_limit_mean": steady / mean,
            "ours_steady_over_limit": steady / limit,
            "limit_again_over_limit": again / limit,
            "ours_run_over_limit_mean": self.ours.mp_per_s / mean,
            "ours_end_to_end_over_limit_mean": self.end_to_end_mp_per_s / mean,
            "ours_end_to_end_over_naive": self.end_to_end_mp_per_s / self.naive.mp_per_s,
            "ours_run_over_naive": self.ours.mp_per_s / self.naive.mp_per_s,
        }


# ---------------------------------------------------------------------------------------------------------- limit
def limit_batches(actor, work: list[WorkImage], batch_size: int) -> list[Batch]:
    """Pre-decoded model inputs: the distinct images decoded as the pipeline decodes them (`codec.decode`), adapted
    to the model's channels as `ModelRunner.restore_array` does, grouped by shape into batches of `batch_size`, in
    the actor's memory format on its device. A batch's megapixels are its output's (`scale`^2 its input's)."""
    import torch

    by_shape: dict[tuple, list[np.ndarray]] = {}
    for w in work:
        pixels = codec.decode(w.png).pixels  # (H, W, C) float32
        by_shape.setdefault(pixels.shape, []).append(pixels)
    batches = []
    for (h, w, c), arrays in by_shape.items():
        for i in range(0, len(arrays), batch_size):
            stack = np.stack(arrays[i : i + batch_size])  # (N, H, W, C)
            n = len(stack)
            x = torch.from_numpy(np.ascontiguousarray(stack.transpose(0, 3, 1, 2)))  # (N, C, H, W)
            if actor.channels == 1 and c == 3:
                x = x.reshape(n * 3, 1, h, w)
            elif actor.channels == 3 and c == 1:
                x = x.expand(n, 3, h, w)
            x = x.to(actor.device, memory_format=actor.memory_format)
            batches.append(Batch(n, n * h * w * actor.scale**2 / 1e6, x))
    return batches


def run_limit(actor, batches: list[Batch], images: int, streams: int = 1) -> LoopTiming:
    """Time the raw forward loop over `images` images, cycling through the pre-built batches, in `streams` threads
    at once (one per model actor of the pipeline, each on the torch threads of one actor)."""
    sync(actor.device)
    t0, cpu0 = time.perf_counter(), own_cpu()
    with ThreadPoolExecutor(streams) as pool:
        loops = [pool.submit(_limit_loop, actor, batches, n, k) for k, n in enumerate(split(images, streams))]
        results = [loop.result() for loop in loops]
    sync(actor.device)
    seconds, cpu_s = time.perf_counter() - t0, own_cpu() - cpu0
    return LoopTiming(sum(n for n, _ in results), sum(mp for _, mp in results), seconds, cpu_s, streams)


def _limit_loop(actor, batches: list[Batch], images: int, start: int) -> tuple[int, float]:
    """One stream of `run_limit`: `images` images from batch `start` on. Returns (images, megapixels)."""
    import torch

    done, mp_done, i = 0, 0.0, start
    with torch.inference_mode():  # per thread: each stream enters its own
        while done < images:
            n, mp, x = batches[i % len(batches)]
            if done + n > images:  # the last batch: only what is left
                keep = images - done
                x, mp, n = x[: keep * x.shape[0] // n], mp * keep / n, keep
            actor.forward(x)
            done, mp_done, i = done + n, mp_done + mp, i + 1
    return done, mp_done


def _warm_up(actor, batches: list[Batch], every_shape: bool) -> float:
    """Run one batch (`every_shape`: one of every shape, as torch.compile compiles each on its first); the seconds."""
    first_of_shape: dict[tuple, Batch] = {}
    for batch in batches:
        first_of_shape.setdefault(tuple(batch.x.shape), batch)
    t0 = time.perf_counter()
    for batch in list(first_of_shape.values()) if every_shape else batches[:1]:
        run_limit(actor, [batch], batch.images)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------- pipelines
def _restore_config(config: ThroughputConfig, model: str, input_uri: str, out_uri: str, batch_size: int | None = None):
    from restoration.pipelines.restore import RestoreConfig

    return RestoreConfig(input=input_uri, output=out_uri, model=model, batch_size=batch_size, compile=config.compile)


def run_ours(
    config: ThroughputConfig,
    model: str,
    batch_size: int,
    staged: Staged,
    out_root: str,
    keys: list[str],
    extra_pids: dict[str, int],
) -> RestoreRun:
    """`run_restore` over the staged shards, measured: wall time, steady state from `restored_at`, memory, CPU."""
    from restoration.pipelines.restore import run_restore

    with ResourceSampler(extra=extra_pids) as sampler:
        started_at = time.time()
        report = run_restore(_restore_config(config, model, staged.shards, out_root, batch_size))
    columns = ["key", "width", "height", "error", "restored_at"]
    written = runs.read_output(report.output, columns, schemas.RESTORE_OUTPUT_SCHEMA)
    out_keys = written.column("key").to_pylist()
    ok = [e is None for e in written.column("error").to_pylist()]
    widths, heights = written.column("width").to_pylist(), written.column("height").to_pylist()
    pixels = np.array([w * h if good else 0 for w, h, good in zip(widths, heights, ok, strict=True)], np.float64)
    stamps = np.asarray(written.column("restored_at").to_pylist(), dtype=np.float64)
    steady = steady_state(stamps, pixels / 1e6, sampler, "RestoreActor")
    write_start = started_at + report.phase_seconds["setup"]
    write_end = write_start + report.phase_seconds["write"]
    write_split = (
        {"fill": float(stamps.min()) - write_start, "steady": steady.span_s, "drain": write_end - float(stamps.max())}
        if len(stamps)
        else {}
    )
    return RestoreRun(
        run_id=report.run_id,
        output=report.output,
        rows_in=report.rows_in,
        rows_out=written.num_rows,
        errors=report.errors,
        every_key_once=sorted(out_keys) == sorted(keys) and len(set(out_keys)) == len(out_keys),
        megapixels=float(pixels.sum()) / 1e6,
        seconds=report.seconds,
        cpu_s=sampler.result.run_cpu_s,
        steady=steady,
        workers=report.config.get("workers"),
        gpu=report.config.get("gpu"),
        phase_seconds=report.phase_seconds,
        write_split_seconds=write_split,
        resources=sampler.result,
    )


def run_naive(model: str, raw_uri: str, out_uri: str, keys: list[str], threads: int) -> NaiveRun:
    """The script a user writes without the pipeline: one image at a time, get -> decode -> forward -> encode -> put
    (on local folders: read the file -> ... -> write the file)."""
    import torch

    from restoration.device import default_device
    from restoration.inference import load_restorer

    torch.set_num_threads(threads)
    if storage.is_s3(raw_uri):
        bucket, src = split_s3(raw_uri)
        out_bucket, dest = split_s3(out_uri)
        client = storage.boto3_client()

        def get(key: str) -> bytes:
            return client.get_object(Bucket=bucket, Key=f"{src}/{key}")["Body"].read()

        def put(key: str, body: bytes) -> None:
            client.put_object(Bucket=out_bucket, Key=f"{dest}/{key}", Body=body)

    else:
        Path(out_uri).mkdir(parents=True, exist_ok=True)

        def get(key: str) -> bytes:
            return Path(raw_uri, key).read_bytes()

        def put(key: str, body: bytes) -> None:
            Path(out_uri, key).write_bytes(body)

    loaded = load_restorer(model)
    device = default_device()
    net = loaded.module.to(device).eval()
    mode = "L" if loaded.config.channels == 1 else "RGB"
    mp_done = 0.0
    with ResourceSampler(reset_workers=False) as sampler:
        t0, cpu0 = time.perf_counter(), own_cpu()
        for key in keys:
            image = Image.open(io.BytesIO(get(key))).convert(mode)
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            x = (x[None, None] if mode == "L" else x.permute(2, 0, 1)[None]).to(device)  # (1, C, H, W)
            with torch.no_grad():
                y = net(x).clamp(0, 1)
            restored = (y[0] * 255).round().byte().permute(1, 2, 0).squeeze(-1).cpu().numpy()
            buf = io.BytesIO()
            Image.fromarray(restored).save(buf, format="PNG")
            put(key, buf.getvalue())
            mp_done += restored.shape[0] * restored.shape[1] / 1e6  # the output's (an upscaler's is larger)
        seconds, cpu_s = time.perf_counter() - t0, own_cpu() - cpu0
    return NaiveRun(len(keys), mp_done, seconds, cpu_s, 1, threads, sampler.result)


# ------------------------------------------------------------------------------------------------------- section
SECTION_MODELS = {"restore": "model", "upscale": "upscale_model"}  # section -> the config field naming its model


def bench_restore(
    config: ThroughputConfig, session: Session, progress: Progress, section: str = "restore"
) -> RestoreResult:
    """Limit, ours, naive, the limit again (and, for the restore section, the scale check when asked for).

    Args:
        section: "restore" (the restorer on the noisy crops) or "upscale" (the upscaler on the clean ones).
    """
    import torch

    from restoration.inference import RestoreActor, load_restorer, model_scale
    from restoration.pipelines.restore import auto_batch_size, data_share

    model = getattr(config, SECTION_MODELS[section])
    inputs = session.work.noisy if section == "restore" else session.work.clean
    scale = model_scale(load_restorer(model))

    def say(line: str) -> None:
        progress(f"{section}: {line}")

    # The pool `run_restore` sizes, from the share of the CPU decode and encode take next to the model on this image.
    sample = {"key": inputs[0].key, "image": inputs[0].png}
    batch_size = config.batch_size or auto_batch_size(sample, scale)  # as the pipeline chooses it
    share_config = _restore_config(config, model, "-", "-")
    pool = actor_resources(None, None, lambda: data_share(share_config, sample, scale=scale))
    # The channels of these images (gray here), which pick the model of the family the actor runs.
    channels = codec.decode(inputs[0].png).pixels.shape[2]

    def limit_model() -> tuple:
        """The model the pipeline's actor runs on these images (building it sets this process's threads), and the
        pre-decoded batches of the limit loop."""
        restore_actor = RestoreActor(model, threads=pool.threads, precision="auto", compile=config.compile)
        actor = restore_actor.runner(channels)
        return actor, limit_batches(actor, inputs, batch_size)

    # Calibrate: warm up, time a few batches, and raise the count until the model alone needs the minimum.
    actor, batches = limit_model()
    per_batch = max(b.images for b in batches)
    warm_up_s = _warm_up(actor, batches, config.compile)
    calibration = run_limit(actor, batches, CALIBRATION_BATCHES * per_batch * pool.actors, streams=pool.actors)
    count = config.count
    if config.min_model_seconds > 0:
        count = max(count, math.ceil(config.min_model_seconds * calibration.images_per_s))
    work = repeat_work(inputs, count)
    output_mp = megapixels(work) * scale**2
    say(
        f"{count} images ({output_mp:.1f} MP out); calibration {calibration.mp_per_s:.3f} MP/s, "
        f"so the model alone needs about {count / calibration.images_per_s:.0f} s"
    )

    say("limit (raw model loop)")
    reset_peak("self")
    limit = run_limit(actor, batches, count, streams=pool.actors)
    limit_peak = driver_peak_mb()
    runner = RunnerSetup(torch.get_num_threads(), actor.bf16, str(actor.memory_format), actor.compiled, warm_up_s)
    del batches, actor
    if pool.gpu:
        torch.cuda.empty_cache()

    say("staging inputs (objects, then shards)")
    root = storage.join(session.root, section)
    staged = stage_inputs(work, root, config.shard_mb)
    say(f"ours (run_restore over {staged.shard_files} shards)")
    keys = [w.key for w in work]
    ours = run_ours(config, model, batch_size, staged, storage.join(root, "out"), keys, session.extra_pids)

    naive_keys = keys[: config.naive_count]
    threads = session.default_threads
    say(f"naive ({len(naive_keys)} images, sequential, {threads} torch threads)")
    naive = run_naive(model, staged.raw, storage.join(root, "naive"), naive_keys, threads)

    say("limit loop again, as long as the first")
    actor, batches = limit_model()
    _warm_up(actor, batches, config.compile)
    limit_again = run_limit(actor, batches, count, streams=pool.actors)
    del batches, actor
    torch.set_num_threads(threads)

    return RestoreResult(
        section=section,
        model=model,
        scale=scale,
        batch_size=batch_size,
        images=count,
        megapixels=output_mp,
        sizes=sorted({(w.height, w.width) for w in work}),
        source=session.work.origin,
        pool=pool,
        calibration=calibration,
        staging=staged,
        runner=runner,
        limit=limit,
        limit_driver_peak_mb=limit_peak,
        ours=ours,
        naive=naive,
        limit_again=limit_again,
        ray_startup_s=session.ray_startup_s,
        scale_check=scale_check(config, session, inputs, progress)
        if config.scale_check and section == "restore"
        else None,
    )


def scale_check(config: ThroughputConfig, session: Session, noisy: list[WorkImage], progress: Progress) -> ScaleCheck:
    """Ours at N = --count and at 10 N images, for the peak driver and worker memory of each."""
    from restoration.pipelines.restore import auto_batch_size

    batch_size = config.batch_size or auto_batch_size({"image": noisy[0].png})  # as bench_restore's run chose it
    scale_runs = []
    for label, n in (("N", config.count), ("10N", 10 * config.count)):
        work = repeat_work(noisy, n)
        root = storage.join(session.root, f"scale-{label}")
        progress(f"scale check: ours at {label} = {n} images")
        staged = stage_inputs(work, root, config.shard_mb)
        keys = [w.key for w in work]
        ours = run_ours(config, config.model, batch_size, staged, storage.join(root, "out"), keys, session.extra_pids)
        actors = [w for w in ours.resources.top_workers if any("RestoreActor" in r for r in w.roles)]
        scale_runs.append(ScaleRun(n, ours, max((w.peak_anon_mb for w in actors), default=0.0)))
    return ScaleCheck(*scale_runs)
