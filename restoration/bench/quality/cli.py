"""The options of `restoration bench quality`, and the command."""

from __future__ import annotations

import argparse
import sys

from restoration.bench.quality import inpaint, repair, upscale
from restoration.bench.quality.config import QualityConfig
from restoration.bench.quality.measure import benchmark
from restoration.bench.quality.report import format_table, write_report
from restoration.bench.quality.upscale import UpscaleConfig
from restoration.bench.summary import print_summary
from restoration.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `restoration bench quality`.

    Args:
        parser: the (sub)parser to add them to.
    """
    parser.add_argument(
        "--task",
        choices=("denoise", "upscale", "inpaint", "repair"),
        default="denoise",
        help="denoise (default): restorers vs BM3D on Set12; upscale: upscalers vs bicubic on Set5/Set14; inpaint: "
        "inpainters vs biharmonic, Telea and Navier-Stokes on Set12 with seeded free-form holes; repair: repairers "
        "vs the damaged input and a 3x3 median filter on Set12 with seeded scratches and spots, and on clean images",
    )
    parser.add_argument(
        "--damage", default=repair.DAMAGE, help=f"repair task: the seeded damage (default {repair.DAMAGE})"
    )
    parser.add_argument(
        "--coverages", default="0.1,0.25,0.4", help="inpaint task: hole coverages (default 0.1,0.25,0.4)"
    )
    parser.add_argument("--scales", default="2,3,4", help="upscale task: scale factors (default 2,3,4)")
    parser.add_argument("--color", action="store_true", help="colour mode: the 7 colour sample photos, CBM3D")
    parser.add_argument("--images", default=None, help="folder of images (default: Set12, or the colour photos)")
    parser.add_argument(
        "--datasets", default=None, help="folder of Set12 (default: $RESTORATION_DATASETS or ../shared/datasets)"
    )
    parser.add_argument("--sigmas", default="15,25,50", help="noise levels on the 0-255 scale (default 15,25,50)")
    parser.add_argument(
        "--models", default=None, help="models, comma-separated (default: the bundled restorers, or upscalers)"
    )
    parser.add_argument("--methods", default=None, help="classical methods subset, comma-separated (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images")
    parser.add_argument("--crop", type=int, default=None, help="central crop side in px (fast checks)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    parser.add_argument("--out", default="bench-output", help="output folder (default ./bench-output)")
    parser.add_argument(
        "--ensemble", action="store_true", help="also run each model with the 8-orientation self-ensemble (x8 rows)"
    )


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def config_from_args(args: argparse.Namespace) -> QualityConfig:
    """Build the config from parsed `add_arguments` options; a `UserError` names a bad value.

    Args:
        args: parsed arguments.
    Returns:
        The config.
    """
    sigmas = []
    for part in _split(args.sigmas) or ():
        try:
            sigmas.append(float(part))
        except ValueError:
            raise UserError(f"--sigmas value {part!r}: expected numbers in (0, 255], e.g. 15,25,50") from None
    return QualityConfig(
        color=args.color,
        images=args.images,
        datasets=args.datasets,
        sigmas=tuple(sigmas),
        models=_split(args.models),
        methods=_split(args.methods),
        limit=args.limit,
        crop=args.crop,
        threads=args.threads,
        out_dir=args.out,
        ensemble=args.ensemble,
    )


def upscale_config_from_args(args: argparse.Namespace) -> UpscaleConfig:
    """The `--task upscale` config from parsed `add_arguments` options; a `UserError` names a bad value."""
    scales = []
    for part in _split(args.scales) or ():
        try:
            scales.append(int(part))
        except ValueError:
            raise UserError(f"--scales value {part!r}: expected integers among 2, 3, 4, e.g. 2,3,4") from None
    return UpscaleConfig(
        scales=tuple(scales),
        datasets=args.datasets,
        models=_split(args.models),
        limit=args.limit,
        threads=args.threads,
        out_dir=args.out,
    )


def run_upscale(args: argparse.Namespace) -> int:
    """`restoration bench quality --task upscale`: run, print the table, write the report files."""
    if args.images:
        raise UserError(f"--images {args.images}: --task upscale measures Set5 and Set14 (found under --datasets)")
    config = upscale_config_from_args(args)
    result = upscale.benchmark(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    paths = upscale.write_report(result, config.out_dir)
    table = "\n".join([f"images: {result['description']}; threads: {result['threads']}", upscale.format_table(result)])
    return print_summary(table, [], paths.values(), result["wall_seconds"])


def run_inpaint(args: argparse.Namespace) -> int:
    """`restoration bench quality --task inpaint`: run, print the table, write the report files."""
    coverages = []
    for part in _split(args.coverages) or ():
        try:
            coverages.append(float(part))
        except ValueError:
            raise UserError(f"--coverages value {part!r}: expected numbers in (0, 1), e.g. 0.1,0.25,0.4") from None
    config = inpaint.InpaintConfig(
        coverages=tuple(coverages),
        images=args.images,
        datasets=args.datasets,
        color=args.color,
        models=_split(args.models),
        methods=_split(args.methods),
        limit=args.limit,
        threads=args.threads,
        out_dir=args.out,
    )
    result = inpaint.benchmark(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    paths = inpaint.write_report(result, config.out_dir)
    table = "\n".join([f"images: {result['description']}; threads: {result['threads']}", inpaint.format_table(result)])
    return print_summary(table, [], paths.values(), result["wall_seconds"])


def run_repair(args: argparse.Namespace) -> int:
    """`restoration bench quality --task repair`: run, print the table, write the report files."""
    config = repair.RepairConfig(
        damage=args.damage,
        images=args.images,
        datasets=args.datasets,
        color=args.color,
        models=_split(args.models),
        limit=args.limit,
        threads=args.threads,
        out_dir=args.out,
    )
    result = repair.benchmark(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    paths = repair.write_report(result, config.out_dir)
    table = "\n".join([f"images: {result['description']}; threads: {result['threads']}", repair.format_table(result)])
    return print_summary(table, [], paths.values(), result["wall_seconds"])


def run(args: argparse.Namespace) -> int:
    """`restoration bench quality`: run, print the table and notes, write the report files; exit status 0."""
    if getattr(args, "task", "denoise") == "upscale":
        return run_upscale(args)
    if getattr(args, "task", "denoise") == "inpaint":
        return run_inpaint(args)
    if getattr(args, "task", "denoise") == "repair":
        return run_repair(args)
    config = config_from_args(args)
    result = benchmark(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    paths = write_report(result, config.out_dir)
    table = "\n".join(
        [
            f"images: {len(result.image_names)} from {result.image_set}",
            f"threads: {result.threads}; CPU: {result.device['cpu']}; models on {result.device['models_on']}",
            format_table(result.rows),
        ]
    )
    return print_summary(table, result.notes, paths.values(), result.wall_seconds)
