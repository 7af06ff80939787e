"""The throughput report: the table printed and written to `throughput.md`, the notes, and `throughput.json`.

Every row gives the work per CPU second beside the rate: on a shared machine other load slows the rate, not that.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

from restoration.bench.summary import jsonable
from restoration.bench.throughput.config import ThroughputConfig
from restoration.bench.throughput.restore import RestoreResult
from restoration.bench.throughput.result import ThroughputResult
from restoration.bench.throughput.sampler import Resources, SteadyCpu
from restoration.bench.throughput.synthesis import SynthesisResult
from restoration.bench.throughput.timing import MIN_STEADY_BATCHES, LoopTiming
from restoration.bench.throughput.training import TrainingResult


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


def _header(rate: str, work: str) -> str:
    return f"  {'measure':<46} {rate:>9} {'seconds':>8} {'CPU s':>8} {work:>12}  ratio"


def _row(label: str, rate, seconds: float, cpu_s: float | None = None, work: float | None = None, ratio="") -> str:
    """One table line; `work` (MP or images) over `cpu_s` gives the work per CPU second (robust to other load)."""
    per_cpu = work / cpu_s if work is not None and cpu_s else None
    cpu_text = f"{cpu_s:.1f}" if cpu_s is not None else "-"
    return f"  {label:<46} {_num(rate):>9} {seconds:>8.1f} {cpu_text:>8} {_num(per_cpu):>12}  {ratio}".rstrip()


def _loop_row(label: str, loop: LoopTiming, rate: float, work: float) -> str:
    return _row(label, rate, loop.seconds, loop.cpu_s, work)


def _steady_row(label: str, rate: float, span: float, valid: bool, ratio: str) -> str:
    """A steady-state line: rate and ratio only when the span makes a rate (see `timing.Steady`)."""
    return _row(label, rate if valid else None, span, ratio=ratio if valid else "")


def _phases(phases: dict[str, float]) -> str:
    """`{"setup": 2.1, "write": 120.4, ...}` -> "setup 2.1 s, write 120.4 s, ..." (what the report's seconds hold)."""
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items()) or "not reported"


def _top_roles(by_role: dict[str, float], top: int, per: float = 1.0, digits: int = 1) -> str:
    """The `top` largest entries of a CPU split, each divided by `per`: "MapWorker(...) 291.9, driver 9.2, the rest 3.1"."""
    split = list(by_role.items())
    shown = ", ".join(f"{role} {cpu / per:.{digits}f}" for role, cpu in split[:top])
    rest = sum(cpu for _, cpu in split[top:]) / per
    return shown + (f", the rest {rest:.{digits}f}" if len(split) > top else "")


def _cpu_split(resources: Resources, top: int = 6) -> str:
    return f"  CPU s by process: {_top_roles(resources.cpu_s_by_role, top)}"


def _steady_cpu_line(cpu: SteadyCpu, unit: str, raw_rate: float, raw_per_cpu_s: float, raw_name: str) -> str:
    """Where the cores went in the steady state, and the model actors' work per CPU second and cores against the raw
    loop's: a steady state below the raw loop is either CPU the actors did not get (the driver, the writes, Ray's own
    processes took it) or CPU they spent on more than the model."""
    seconds, busy = cpu.window.seconds, cpu.window.machine_busy_cores
    return (
        f"  steady state's cores ({seconds:.0f} s of it): {_top_roles(cpu.window.cpu_s_by_role, 5, seconds, 2)}"
        + (f"; machine {busy:.2f} busy" if busy is not None else "")
        + f"; the model actors {_num(cpu.work_per_model_cpu_s)} {unit}/CPU-s on {cpu.model_cores:.2f} cores, "
        f"the {raw_name} {_num(raw_per_cpu_s)} on {raw_rate / raw_per_cpu_s:.2f}"
    )


def _restore_lines(restore: RestoreResult, config: ThroughputConfig) -> list[str]:
    """The restore or upscale section's table: rates in megapixels of output a second, ratios against the mean of
    the limit loop's two runs."""
    limit, ours, naive, runner, ratios = restore.limit, restore.ours, restore.naive, restore.runner, restore.ratios
    pool, again = restore.pool, restore.limit_again
    startup = f"{restore.ray_startup_s:.1f} s" if restore.ray_startup_s else "not measured"
    res = ours.resources
    what = f" (x{restore.scale}, megapixels of the output)" if restore.scale > 1 else ""
    lines = [
        f"{restore.section.upper()}  {restore.model}{what}: {restore.images} images, {restore.megapixels:.1f} MP, "
        f"batch {restore.batch_size}, {pool.actors} actor(s) x {pool.threads} thread(s) "
        f"(data share {_num(pool.data_share)}), {'bf16' if runner.bf16 else 'fp32'}"
        f"{', compiled' if runner.compiled else ''}, {'GPU' if pool.gpu else 'CPU'}",
        _header("MP/s", "MP/CPU-s"),
        _loop_row(f"limit: raw model loop, {limit.streams} at once", limit, limit.mp_per_s, limit.megapixels),
        _loop_row("limit loop again at the end", again, again.mp_per_s, again.megapixels),
        _row("limit: the mean of the two", restore.limit_mean_mp_per_s, (limit.seconds + again.seconds) / 2),
        _steady_row(
            "ours: steady state (restored_at span)",
            ours.steady.work_per_s,
            ours.steady.span_s,
            restore.steady_valid,
            f"{_num(ratios['ours_steady_over_limit_mean'])} x limit",
        ),
        _row(
            "ours: run_restore (Ray already up)",
            ours.mp_per_s,
            ours.seconds,
            ours.cpu_s,
            ours.megapixels,
            f"{_num(ratios['ours_run_over_limit_mean'])} x limit",
        ),
        _row(
            f"ours: end to end (Ray start-up {startup})",
            restore.end_to_end_mp_per_s,
            restore.end_to_end_s,
            ratio=f"{_num(ratios['ours_end_to_end_over_limit_mean'])} x limit, "
            f"{_num(ratios['ours_end_to_end_over_naive'])} x naive",
        ),
        _row(
            "naive: boto3+Pillow+torch, 1 image at a time",
            naive.mp_per_s,
            naive.seconds,
            naive.cpu_s,
            naive.megapixels,
            f"{naive.threads} torch threads, fp32",
        ),
        f"  the limit loop's drift: the second ran at {_num(ratios['limit_again_over_limit'])} x the first; ours' "
        f"steady state over the first alone: {_num(ratios['ours_steady_over_limit'])}",
        f"  run_restore phases: {_phases(ours.phase_seconds)}; the write: {_phases(ours.write_split_seconds)}",
        f"  memory (ours): driver peak {res.driver_peak_mb:.0f} MB; {res.workers} Ray workers, "
        f"largest peak {res.worker_peak_mb_max:.0f} MB (anon {res.worker_anon_mb_max:.0f} MB), "
        f"sum of peaks {res.worker_peak_mb_sum:.0f} MB; limit driver peak {restore.limit_driver_peak_mb:.0f} MB",
        _cpu_split(res),
    ]
    if ours.steady.cpu and not pool.gpu:  # on a GPU the model's work is not CPU work
        per_cpu_s = limit.megapixels / limit.cpu_s
        lines.append(_steady_cpu_line(ours.steady.cpu, "MP", limit.mp_per_s, per_cpu_s, "limit loop"))
    if res.gpu_util_mean is not None:
        lines.append(f"  GPU utilisation (ours): mean {res.gpu_util_mean:.0f}%, max {res.gpu_util_max:.0f}%")
    scale = restore.scale_check
    if scale:
        n, n10, grow = scale.small, scale.large, scale.growth

        def change(name: str) -> str:
            return f"{n.figure(name):.0f} -> {n10.figure(name):.0f} MB ({grow[name]:+.0%})"

        lines += [
            f"  scale check: {n.images} -> {n10.images} images: driver peak {change('driver_peak_mb')}, largest "
            f"worker peak {change('worker_peak_mb_max')}, sum of worker peaks {change('worker_peak_mb_sum')}; "
            f"target <= +{scale.target_growth:.0%}",
            f"  scale check, private memory (RssAnon; RSS also counts the pages of Ray's shared object store a "
            f"worker touched): restore actor {change('actor_anon_mb')}, largest worker "
            f"{change('worker_anon_mb_max')}, sum {change('worker_anon_mb_sum')}, all workers at once "
            f"{change('worker_anon_mb_concurrent')}",
        ]
        largest = n10.ours.resources.largest_worker
        if largest:
            lines.append(f"  scale check: the largest worker at {n10.images} images ran {', '.join(largest.roles)}")
    return lines


def _synthesis_lines(synthesis: SynthesisResult, config: ThroughputConfig) -> list[str]:
    raw, again, pipe, ratios = synthesis.raw, synthesis.raw_again, synthesis.pipeline, synthesis.ratios
    lines = [
        f"SYNTHESIS  {config.synth_model}: {raw.images} images, batch {config.synth_batch_size}, "
        f"{synthesis.precision}, {synthesis.pool.actors} actor(s) x {synthesis.pool.threads} thread(s) "
        f"(data share {_num(synthesis.pool.data_share)})",
        _header("images/s", "images/CPU-s"),
        _loop_row(f"raw generator loop, {raw.streams} at once", raw, raw.images_per_s, raw.images),
        _row(
            "run_synthesize -> Parquet on S3 (Ray up)",
            pipe.images_per_s,
            pipe.seconds,
            pipe.cpu_s,
            pipe.images,
            f"{_num(ratios['pipeline_over_raw'])} x raw",
        ),
        _steady_row(
            "run_synthesize, steady state (generated_at span)",
            pipe.steady.work_per_s,
            pipe.steady.span_s,
            pipe.steady.valid,
            f"{_num(ratios['steady_over_raw'])} x raw",
        ),
        f"  run_synthesize phases: {_phases(pipe.phase_seconds)}; first image {pipe.first_image_s:.1f} s"
        " after the start",
        _cpu_split(pipe.resources) + f"; the raw loop {raw.cpu_s:.1f}",
        f"  raw loop again at the end ({again.images} images): {_num(again.images_per_s)} images/s, "
        f"{_num(ratios['raw_again_over_raw'])} x the first (the machine's drift); the steady state "
        f"over the mean of the two: {_num(ratios['steady_over_raw_mean'])}",
    ]
    if pipe.steady.cpu and not synthesis.pool.gpu:
        per_cpu_s = raw.images / raw.cpu_s
        lines.append(_steady_cpu_line(pipe.steady.cpu, "images", raw.images_per_s, per_cpu_s, "raw loop"))
    return lines


def _training_lines(training: TrainingResult) -> list[str]:
    ray_train, plain, cfg = training.ray_train, training.plain, training.config
    return [
        f"TRAINING  {training.preset}: {len(plain.epochs)} epochs x {cfg.steps_per_epoch} steps, batch "
        f"{cfg.batch_size}, patch {cfg.patch_size}, {plain.threads} thread(s), {cfg.precision} "
        "(step loops only: start-up, data loading, validation and checkpoints excluded)",
        f"  {'Ray Train, 1 worker':<44} {ray_train.samples_per_s:>9.1f} samples/s "
        f"(whole run {ray_train.run_seconds:.0f} s)",
        f"  {'plain PyTorch':<44} {plain.samples_per_s:>9.1f} samples/s  {_num(training.ratio_ray_over_plain)} x plain",
    ]


def format_table(result: ThroughputResult) -> str:
    """The human-readable summary: the machine, then one line per measurement, ratios, memory."""
    env = result.environment
    bf16 = "bf16 units (AMX or AVX512-BF16)" if env.cpu_bf16_units else "no bf16 units (fp32)"
    lines = [f"MACHINE  {env.cpu}, {env.cpus} cores, {bf16}; GPU: {env.cuda or 'none'}"]
    for section in (result.restore, result.upscale):
        if section:
            lines += _restore_lines(section, result.config)
    if result.synthesis:
        lines += _synthesis_lines(result.synthesis, result.config)
    if result.training:
        lines += _training_lines(result.training)
    return "\n".join(lines)


def notes(result: ThroughputResult) -> list[str]:
    """Plain-language notes on what the numbers show (where time and memory went)."""
    out = []
    for restore in (result.restore, result.upscale):
        if restore:
            out += _restore_notes(restore)
    if result.ray_startup_s is None:
        out.append("Ray was already running: end to end numbers exclude Ray's start-up")
    return out


def _restore_notes(restore: RestoreResult) -> list[str]:
    """The notes on the restore or upscale section, each starting with the section's name."""
    out, name = [], restore.section
    ours, res = restore.ours, restore.ours.resources
    fused = sorted({r for w in res.top_workers for r in w.roles if "->" in r})
    if fused:
        out.append(f"{name}: fused operators seen in the workers' titles: {', '.join(fused)}")
    actors = [w for w in res.top_workers if any("RestoreActor" in r for r in w.roles)]
    if actors:
        busy = ", ".join(f"{w.cpu_s / res.wall_s:.2f}" for w in actors)
        out.append(
            f"{name}: the {len(actors)} model actor process(es) used {busy} cores "
            f"over the run ({sum(w.cpu_s for w in actors):.0f} CPU s in {res.wall_s:.0f} s, "
            f"{restore.pool.threads} torch thread(s) each; decoding and encoding run in tasks of their own); "
            f"the limit loop needed {restore.limit.cpu_s:.0f} CPU s for the same images"
        )
    if res.machine_busy_cores is not None:
        out.append(
            f"{name}: the machine was {res.machine_busy_cores:.2f} of {res.cpus} cores busy during ours, "
            f"{res.our_busy_cores:.2f} of them this run's driver, Ray workers and S3 server; the rest is "
            "Ray's own processes (raylet, GCS, dashboard) and other load"
        )
    if restore.steady_over_limit:
        out.append(
            f"{name}: steady state is not meaningful here: the restored_at span gives "
            f"{ours.steady.work_per_s:.3g} MP/s, faster than the limit loop; the machine was busier while the "
            "limit was measured, or the run is too short; measure on an idle machine with more images"
        )
    elif not restore.steady_valid:
        out.append(
            f"{name}: steady state is not meaningful here: the model restored the images in "
            f"{ours.steady.batches} batch(es), fewer than {MIN_STEADY_BATCHES}; use more images"
        )
    driver_nice, actor_nice = res.driver_nice, actors[0].nice if actors else None
    if driver_nice is not None and actor_nice is not None and actor_nice > driver_nice:
        out.append(
            f"{name}: the model actor ran at nice {actor_nice} (Ray's RAY_worker_niceness; lowering it needs "
            f"CAP_SYS_NICE), this driver at nice {driver_nice}: on a busy machine the limit and naive loops (in the "
            "driver) get the CPU before the model does"
        )
    if restore.naive.threads != restore.pool.threads:
        out.append(
            f"{name}: naive runs with {restore.naive.threads} torch threads, each of the "
            f"{restore.pool.actors} actor(s) with {restore.pool.threads} (actor_resources splits the cores by "
            f"the measured data share, {_num(restore.pool.data_share)})"
        )
    return out


def to_json(result: ThroughputResult) -> dict:
    """The result as JSON-ready dicts and lists (non-finite numbers as null)."""
    return jsonable(result)


def write_report(result: ThroughputResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write `throughput.json` (every number) and `throughput.md` (the table, notes and environment).

    Returns:
        {"json": path, "md": path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "throughput.json", "md": out / "throughput.md"}
    paths["json"].write_text(json.dumps(to_json(result), indent=2) + "\n")
    env = result.environment
    section = result.restore or result.upscale
    method = section.ours.resources.method if section else "see JSON"
    md = [
        "# Throughput: pipelines vs raw models vs a naive script",
        "",
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}; CPU: {env.cpu} ({env.cpus} cores, "
        f"bf16 units: {env.cpu_bf16_units}); GPU: {env.cuda or 'none'}; torch {env.torch}, Ray {env.ray}; "
        f"load average at start {', '.join(f'{v:.2f}' for v in env.load_average_at_start)}, at the end "
        f"{', '.join(f'{v:.2f}' for v in result.load_average_at_end)}.",
        "",
        "```",
        format_table(result),
        "```",
        "",
        "How each number is taken (see `restoration/bench/throughput/`):",
        "- limit: the raw model forward over pre-decoded tensors in memory (BN folded; the actor's batch, threads, "
        "precision and memory format).",
        "- ours, steady state: megapixels after the first model batch / (last - first `restored_at`), the time "
        "the actor's model finished each row; "
        "end to end: the whole `run_restore` plus Ray's start-up, timed on its own before the run.",
        "- naive: boto3 get -> Pillow decode -> fp32 forward -> PNG -> boto3 put, one image at a time.",
        "- synthesis: the generator forward alone vs `run_synthesize` (latents, generator, PNG, Parquet on S3); "
        "steady state: images after the first generator batch / (last - first `generated_at`).",
        "- training: samples/s of the step loops (the Ray Train loop's own per-epoch timings).",
        f"- memory: driver peak from getrusage after resetting the peak; workers: VmHWM of the Ray worker processes "
        f"({method}).",
        "",
    ]
    if result.notes:
        md += ["Notes:", *(f"- {n}" for n in result.notes), ""]
    paths["md"].write_text("\n".join(md))
    return paths
