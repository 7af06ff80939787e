"""The options of `restoration bench throughput`, and the command."""

from __future__ import annotations

import argparse
import sys

from restoration.bench.summary import print_summary
from restoration.bench.throughput.config import SECTIONS, ThroughputConfig
from restoration.bench.throughput.harness import benchmark
from restoration.bench.throughput.report import format_table, write_report
from restoration.bench.throughput.training import Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `restoration bench throughput`.

    Args:
        parser: the (sub)parser to add them to.
    """
    d = ThroughputConfig()
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated (default: all)")
    parser.add_argument("--images", default=None, help="folder of images to cut crops from (default: Set12+Train400)")
    parser.add_argument(
        "--datasets",
        default=None,
        help="folder of Set12 and Train400 (default: $RESTORATION_DATASETS or ../shared/datasets)",
    )
    parser.add_argument("--count", type=int, default=d.count, help=f"distinct images (default {d.count})")
    parser.add_argument("--size", type=int, default=d.size, help=f"crop side in px (default {d.size})")
    parser.add_argument("--mixed-sizes", action="store_true", help="crops of 180, 256 and 512 px in turn")
    parser.add_argument("--noise", type=float, default=d.noise, help="sigma of the input noise, 0-255 (default 25)")
    parser.add_argument("--model", default=d.model, help=f"restorer (default {d.model})")
    parser.add_argument(
        "--upscale-model", default=d.upscale_model, help=f"upscaler of the upscale section (default {d.upscale_model})"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="restore batch (default: the pipeline's, from the image size)"
    )
    parser.add_argument(
        "--min-model-seconds",
        type=float,
        default=d.min_model_seconds,
        help="repeat images until the raw model alone needs this long (default 120; 0: exactly --count)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the restorer (limit loop and pipeline alike)"
    )
    parser.add_argument("--shard-mb", type=float, default=d.shard_mb, help="input shard size (default 4 MiB)")
    parser.add_argument("--synth-model", default=d.synth_model, help=f"generator (default {d.synth_model})")
    parser.add_argument("--synth-count", type=int, default=d.synth_count, help="images to synthesize (default 100000)")
    parser.add_argument("--train-preset", default=d.train_preset, help=f"restorer preset (default {d.train_preset})")
    parser.add_argument("--train-epochs", type=int, default=d.train_epochs, help="epochs (default 4)")
    parser.add_argument("--train-steps-per-epoch", type=int, default=d.train_steps_per_epoch, help="(default 50)")
    parser.add_argument("--scale-check", action="store_true", help="also run ours at --count and 10x --count images")
    parser.add_argument("--store", default=None, help="s3://bucket/prefix to use (default: an embedded SeaweedFS)")
    parser.add_argument("--local", default=None, help="work in this local folder instead of S3 (no S3 server)")
    parser.add_argument("--naive-count", type=int, default=None, help="images for the naive script (default: all)")
    parser.add_argument("--out", default=d.out_dir, help="output folder (default ./bench-output)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the crops and the noise (default 0)")


def config_from_args(args: argparse.Namespace) -> ThroughputConfig:
    """Build the config from parsed `add_arguments` options; a `UserError` names a bad value."""
    return ThroughputConfig(
        only=tuple(s.strip() for s in args.only.split(",") if s.strip()),
        images=args.images,
        datasets=args.datasets,
        count=args.count,
        size=args.size,
        mixed_sizes=args.mixed_sizes,
        noise=args.noise,
        model=args.model,
        upscale_model=args.upscale_model,
        batch_size=args.batch_size,
        compile=args.compile,
        min_model_seconds=args.min_model_seconds,
        shard_mb=args.shard_mb,
        synth_model=args.synth_model,
        synth_count=args.synth_count,
        train_preset=args.train_preset,
        train_epochs=args.train_epochs,
        train_steps_per_epoch=args.train_steps_per_epoch,
        scale_check=args.scale_check,
        store=args.store,
        local=args.local,
        naive_count=args.naive_count,
        out_dir=args.out,
        seed=args.seed,
    )


def run(args: argparse.Namespace, trainer: Trainer | None = None) -> int:
    """`restoration bench throughput`: run, print the table and notes, write the report files; exit status 0.

    Args:
        args: parsed `add_arguments` options.
        trainer: the training code, for the training section (see `training.Trainer`).
    """
    config = config_from_args(args)
    result = benchmark(config, lambda line: print(f"[throughput] {line}", file=sys.stderr, flush=True), trainer)
    paths = write_report(result, config.out_dir)
    return print_summary(format_table(result), result.notes, paths.values(), result.wall_seconds)
