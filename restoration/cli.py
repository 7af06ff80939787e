"""The `restoration` command.

    restoration ingest SRC DEST        images (folder, S3 prefix, Fashion-MNIST idx) -> Parquet shards
    restoration restore IN OUT ...     restore images in bulk on Ray Data -> Parquet
    restoration demo                   the main job end to end on embedded defaults
    restoration s3-server              run the embedded S3 server for local development

Bad arguments and unusable inputs end with one line on stderr (`restoration: error: ...`) and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from restoration import __version__
from restoration.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line (no usage block) and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def _ranged(cast: type, valid, expected: str):
    """An argparse `type`: `cast(text)`, refused with one line naming the text unless `valid(value)`."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_float = _ranged(float, lambda v: v > 0, "a number > 0")
_positive_int = _ranged(int, lambda v: v > 0, "an integer > 0")
_quality = _ranged(int, lambda v: 1 <= v <= 100, "an integer in 1..100")


def config_from_args(cls: type, args: argparse.Namespace, **values):
    """A config dataclass from parsed arguments: each field not in `values` from the argument of the same name, when
    given (an argument left at None keeps the field's default). The one place flags become a config."""
    for f in dataclasses.fields(cls):
        if f.name not in values and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


# `restoration bench NAME`: name -> help. Each is a module of restoration.bench with add_arguments(parser) and
# run(args) -> exit code, imported (with torch) only when `bench` is the command.
BENCHMARKS = {
    "quality": "PSNR/SSIM and time of the restorers vs BM3D and classical denoisers",
    "throughput": "megapixels/s: pipeline vs raw model loop vs a naive script",
    "fid": "FID of generated images vs the Fashion-MNIST test split, with calibration rows",
}


def _bench_modules() -> dict:
    from restoration.bench import fid, quality, throughput

    return {"quality": quality, "throughput": throughput, "fid": fid}


def _bench_throughput(args: argparse.Namespace) -> int:
    """`bench throughput` with the training code handed in for its training section (the benchmarks import none)."""
    from restoration import train
    from restoration.bench import throughput
    from restoration.train import restorer

    trainer = throughput.Trainer(
        resolve_config=train.resolve_config,
        launch_config=train.LaunchConfig,
        launch=train.launch,
        train_epoch=restorer.train_epoch,
        decode_rows=restorer.decode_rows,
    )
    return throughput.run(args, trainer)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `restoration` parser. The options of `train` and `bench`, which import torch and the models to list their
    presets, are built only when `command` is that command, or None (all of them)."""
    parser = _Parser(
        prog="restoration",
        description="Distributed batch image restoration and synthesis on Ray.",
        epilog="Storage URIs are local paths or s3://bucket/prefix; S3 settings come from AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION. Ray: RAY_ADDRESS, or a local cluster when unset.",
    )
    parser.add_argument("--version", action="version", version=f"restoration {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("ingest", help="write images as Parquet input shards", description=_doc("ingest"))
    p.add_argument("src", help="folder or S3 prefix of images, or the Fashion-MNIST idx folder")
    p.add_argument("dest", help="folder or S3 prefix for the shards")
    p.add_argument("--shard-mb", type=_positive_float, default=128.0, help="image MiB per shard (default 128)")
    p.add_argument("--split", choices=["train", "test"], default="train", help="idx sources: which split")
    p.add_argument("--executor", choices=["auto", "local", "ray"], default="auto", help="where shards are built")
    p.add_argument("--max-pixels", type=_positive_int, default=None, help="refuse larger images (default 100 MP)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("restore", help="restore images in bulk on Ray Data -> Parquet", description=_doc("restore"))
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_restore_arguments(p)
    p.set_defaults(func=_cmd_restore)

    p = sub.add_parser(
        "export",
        help="write the images of a Parquet restore run as files, keeping the keys' folder tree",
        description="Write the images of a finished Parquet restore run (OUT/run_id=<id>/) as image files under DEST "
        "at their keys' relative paths (extension changed to the format written), then DEST/_errors.parquet (key "
        "and reason of every row without a file) and DEST/_manifest.json. Running it again finishes an interrupted "
        "export.",
    )
    p.add_argument("run", help="the run folder: OUT/run_id=<id> (local or s3://)")
    p.add_argument("dest", help="folder or S3 prefix for the files")
    p.add_argument("--image-format", choices=["png", "jpeg", "webp"], default="png", help="file format (default png)")
    p.add_argument("--quality", type=_quality, default=95, help="JPEG/WebP quality 1-100 (default 95)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "synthesize", help="generate images in bulk (GAN/VAE) on Ray Data -> Parquet", description=_doc("synthesize")
    )
    add_synthesize_arguments(p)
    p.set_defaults(func=_cmd_synthesize)

    p = sub.add_parser("train", help="train a model with Ray Train (DDP), checkpoints on S3", description=_doc("train"))
    if command in (None, "train"):
        add_train_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="run the main job on embedded defaults", description=_doc("demo"))
    p.add_argument("--out", default=None, help="local folder for the demo outputs (default ./demo-output)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "bench", help="benchmarks: restoration quality, throughput, FID of the generators", description=_doc("bench")
    )
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    modules = _bench_modules() if command in (None, "bench") else {}
    for name, help_text in BENCHMARKS.items():
        mod = modules.get(name)
        q = bench.add_parser(name, help=help_text, description=mod.__doc__.split("\n\n")[0] if mod else help_text)
        if mod:
            mod.add_arguments(q)
            q.set_defaults(func=_bench_throughput if name == "throughput" else mod.run)

    p = sub.add_parser("s3-server", help="run the embedded S3 server (SeaweedFS) until interrupted")
    p.add_argument("--data-dir", default=None, help="keep the data here (default: a temporary folder)")
    p.add_argument("--port", type=_positive_int, default=None, help="S3 port (default: a free one)")
    p.add_argument("--bucket", default="restoration", help="bucket to create (default: restoration)")
    p.set_defaults(func=_cmd_s3_server)
    return parser


def add_restore_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `restoration restore` (shared with jobs/restore.py)."""
    p.add_argument("input", help="input shards (Parquet: key, image[, reference]) or a prefix of image files")
    p.add_argument("output", help="output folder or S3 prefix; the run writes OUTPUT/run_id=<id>/")
    p.add_argument(
        "--model",
        default="denoise",
        help="denoise or restore (the gray or colour variant per image, from its mode), upscale (super-resolution by "
        "--scale; colour images on their luma), inpaint (fill each image's mask: a `mask` column, <name>_mask.png "
        "beside <name>.<ext>, or --degrade holes:F; colour images on luma and half-size chroma; unmasked pixels kept "
        "exactly), repair (find and fill scratches, "
        "dust and spots with no mask: the gray or colour variant per image; pixels it does not mark kept exactly), or a "
        "bundled model name (denoise-gray, denoise-color, restore-gray, restore-color, upscale-gray-x2/x3/x4, "
        "inpaint-gray, inpaint-gray-large, repair-gray, repair-color), model file path or s3:// URI; "
        "default denoise",
    )
    p.add_argument(
        "--emit-mask",
        action="store_true",
        help="--model repair: write the mask it found as each row's `mask` column (PNG, 255 = repaired)",
    )
    p.add_argument(
        "--scale",
        type=int,
        choices=[2, 3, 4],
        default=None,
        help="--model upscale: output this many times larger (default 2); for evaluation, --degrade lr:SCALE makes "
        "the low-resolution input from each image and keeps the image as the reference",
    )
    p.add_argument("--degrade", default=None, metavar="SPEC", help="degrade inputs first (evaluation); grammar above")
    p.add_argument("--seed", type=int, default=0, help="run seed for --degrade (per image: seed + key)")
    p.add_argument("--run-id", default=None, help="name of the run (default: UTC time + random suffix)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run: skip keys already written")
    p.add_argument("--workers", type=_positive_int, default=None, help="restorer actors (default: from resources)")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images per batch (default: as many as make 2 megapixels of output, from the first image, 1 to 32)",
    )
    p.add_argument("--tile", type=_positive_int, default=512, help="tile side for large images (default 512)")
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels (default 32)")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="inference precision (default auto: bf16 on GPUs and on CPUs with AMX/AVX512-BF16, else fp32)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model in each actor: faster on long runs, after tens of seconds of compiling",
    )
    _add_format_arguments(p, "image files under the run folder keeping the input's tree")
    p.add_argument(
        "--ensemble",
        action="store_true",
        help="average the model over the 8 flips/rotations of each image: a little better, 8x slower",
    )
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="use GPUs (default: if any)")
    p.add_argument("--max-pixels", type=_positive_int, default=None, help="refuse larger images (default 100 MP)")


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for part in text.split(","):
        if part.count(":") != 1 or not all(part.split(":")):
            raise argparse.ArgumentTypeError(f"expected KEY_A:KEY_B[,KEY_A:KEY_B...], got {part!r}")
        a, b = part.split(":")
        pairs.append((a, b))
    return tuple(pairs)


def _label_counts(text: str) -> tuple[tuple[str, int | None], ...]:
    """`--labels sneaker:10000,bag:5000` (class names or ids) -> (("sneaker", 10000), ("bag", 5000)); a name without
    a count (`--mode interpolate --labels sneaker,bag`) gets None."""
    labels = []
    for part in text.split(","):
        name, colon, count = part.partition(":")
        if not name or (colon and (not count.isdigit() or int(count) < 1)):
            raise argparse.ArgumentTypeError(
                f"expected NAME:COUNT[,NAME:COUNT...] with counts >= 1 (interpolate: NAME,NAME), got {part!r}"
            )
        labels.append((name, int(count) if colon else None))
    return tuple(labels)


def add_synthesize_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `restoration synthesize` (shared with the jobs)."""
    p.add_argument("--model", required=True, help="bundled name (dcgan-fmnist, vae-fmnist), model file or s3:// URI")
    p.add_argument(
        "--out",
        dest="output",
        metavar="OUT",
        required=True,
        help="output folder or S3 prefix; the run writes OUT/run_id=<id>/",
    )
    p.add_argument("--mode", choices=["sample", "interpolate", "reconstruct"], default="sample")
    p.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        help="sample mode: number of images; interpolate --labels: sequences",
    )
    p.add_argument(
        "--labels",
        type=_label_counts,
        default=None,
        metavar="NAME:COUNT,...",
        help="class-conditional models: how many images of each class (names or ids), in index order; "
        "--mode interpolate --labels A,B: a conditional VAE moved from class A to class B, --steps images each",
    )
    p.add_argument("--label", default=None, metavar="NAME", help="class-conditional models: --count images of NAME")
    p.add_argument("--seed", type=int, default=0, help="row i's latent comes from (seed, i) alone")
    p.add_argument("--run-id", default=None, help="name of the run (default: UTC time + random suffix)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run without duplicates")
    p.add_argument("--truncation", type=_positive_float, default=None, metavar="PSI", help="GAN truncation ψ")
    p.add_argument("--inputs", default=None, help="interpolate/reconstruct: input shards or a folder of images")
    p.add_argument("--pairs", type=_pairs, default=(), help="interpolate: KEY_A:KEY_B[,...] input keys to join")
    p.add_argument("--random-pairs", type=_positive_int, default=0, metavar="K", help="interpolate: K random pairs")
    p.add_argument("--steps", type=int, default=8, help="interpolate: images per pair, alpha 0..1 (default 8)")
    p.add_argument("--slerp", action="store_true", help="interpolate on the sphere instead of a straight line")
    p.add_argument("--workers", type=_positive_int, default=None, help="generator actors (default: from resources)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (default 64)")
    p.add_argument(
        "--precision",
        choices=["float64", "float32", "bf16"],
        default="float64",
        help="float64 (default) keeps PNGs byte-identical across batchings; float32/bf16 are faster",
    )
    _add_format_arguments(p, "image files OUT/run_id=<id>/<index>.png")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="use GPUs (default: if any)")
    p.add_argument(
        "--scheduled",
        action="store_true",
        help="a scheduled run: run id defaults to today's UTC date, and reruns resume or do nothing",
    )


def _add_format_arguments(p: argparse.ArgumentParser, files_help: str) -> None:
    """--format, --image-format and --quality of restore and synthesize (see restoration.files)."""
    p.add_argument(
        "--format",
        choices=["parquet", "files", "both"],
        default="parquet",
        help=f"parquet rows (default), {files_help}, or both",
    )
    p.add_argument(
        "--image-format", choices=["png", "jpeg", "webp"], default="png", help="format of the files (default png)"
    )
    p.add_argument("--quality", type=_quality, default=95, help="JPEG/WebP quality of the files, 1-100 (default 95)")


def synthesize_config(args: argparse.Namespace):
    from restoration.pipelines.synthesize import SynthesizeConfig

    label = getattr(args, "label", None)
    if label is not None:
        if args.labels is not None or args.count is None:
            raise UserError("--label NAME takes --count N (and no --labels)")
        return config_from_args(SynthesizeConfig, args, labels=((label, args.count),))
    return config_from_args(SynthesizeConfig, args)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `restoration train` (shared with jobs/train.py)."""
    from restoration.train import TRAINERS

    p.add_argument("kind", choices=sorted(TRAINERS), help="model family")
    p.add_argument("--data", required=True, help="training images: input shards or a folder/prefix of images")
    p.add_argument("--val", default=None, help="validation images (default: 1 in 20 training images held out)")
    p.add_argument("--storage", required=True, help="folder or s3:// prefix for runs (checkpoints, model file)")
    p.add_argument("--name", default=None, help="run name; the same name resumes (default: the preset name)")
    p.add_argument(
        "--preset",
        default=None,
        help="named preset: "
        + "; ".join(f"{kind}: {', '.join(presets)}" for kind, (_, presets, _) in sorted(TRAINERS.items())),
    )
    p.add_argument("--workers", type=_positive_int, default=1, help="training workers (DDP), default 1")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="use GPUs (default: if any)")
    p.add_argument(
        "--cpus-per-worker",
        type=_positive_float,
        default=None,
        help="CPUs (and torch threads) per worker (default: all but one core, up to 4, shared by the workers)",
    )
    p.add_argument("--epochs", type=_positive_int, default=None, help="override the preset's epochs")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any config field")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def train_setup(args: argparse.Namespace):
    """(train config, launch config) from parsed `train` arguments."""
    from restoration import train

    overrides = train.parse_overrides(args.kind, args.set)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    train_config = train.resolve_config(args.kind, args.preset, overrides)
    launch_config = train.LaunchConfig(
        storage=args.storage,
        name=args.name or args.preset or args.kind,
        workers=args.workers,
        gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
    )
    return train_config, launch_config


def restore_config(args: argparse.Namespace):
    from restoration.pipelines.restore import RestoreConfig

    return config_from_args(RestoreConfig, args)


def _doc(command: str) -> str:
    if command == "restore":
        from restoration.degrade import SPEC_HELP

        return (
            "Restore images in bulk: read input shards (or image files), optionally degrade them (then PSNR/SSIM "
            "are measured against the clean image), run a pool of restorer actors, and write one Parquet row per "
            "input row (errors included) under OUTPUT/run_id=<id>/, then _manifest.json.\n\n" + SPEC_HELP
        )
    return {
        "ingest": "Write images as Parquet input shards (key, image bytes, width, height[, label]). Inputs that are "
        "not readable images are listed at the end and in DEST/_errors.parquet.",
        "synthesize": "Generate images in bulk with a DCGAN or VAE: --mode sample draws --count images (row i from "
        "(seed, i) alone, so reruns are byte-identical), --mode interpolate walks between the VAE latents of input "
        "pairs, --mode reconstruct round-trips inputs. Parquet under OUT/run_id=<id>/, then _preview.png and "
        "_manifest.json.",
        "train": "Train a model with Ray Train: DDP over --workers (GPUs when the cluster has them), data from input "
        "shards, checkpoints under STORAGE/NAME (S3 or local). Starting the same NAME again resumes from its latest "
        "checkpoint; the best checkpoint is exported as STORAGE/NAME/model.pt.",
        "bench": "Benchmarks that print a table and write it as Markdown and JSON (plus images to look at) into "
        "--out: how good the bundled models are next to the methods a user would otherwise use.",
        "demo": "Start an embedded S3 server, ingest the sample photos that ship with scikit-image and scikit-learn "
        "into Parquet shards on it, and print what was written.",
    }[command]


def _cmd_ingest(args: argparse.Namespace) -> int:
    from restoration import codec
    from restoration.data import ingest

    report = ingest(
        args.src,
        args.dest,
        shard_mb=args.shard_mb,
        split=args.split,
        executor=args.executor,
        max_pixels=args.max_pixels or codec.DEFAULT_MAX_PIXELS,
    )
    for key, reason in report.errors:
        print(f"error: {key}: {reason}")
    print(report.summary())
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from restoration.pipelines.restore import run_restore

    report = run_restore(restore_config(args))
    print(report.summary())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from restoration.files import export_run

    report = export_run(args.run, args.dest, args.image_format, args.quality)
    print(f"exported {report['files']} files ({report['errors']} errors) of {report['rows']} rows -> {args.dest}")
    return 0


def _cmd_synthesize(args: argparse.Namespace) -> int:
    from restoration.pipelines.synthesize import run_synthesize, scheduled_config

    config = synthesize_config(args)
    report = run_synthesize(scheduled_config(config) if args.scheduled else config)
    print(report.summary())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from restoration import train

    train_config, launch_config = train_setup(args)
    if args.dry_run:
        print(train.dry_run(args.kind, train_config, launch_config, args.data, args.val))
        return 0
    report = train.launch(args.kind, train_config, launch_config, args.data, args.val)
    print(report.summary())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from restoration.demo import run_demo

    run_demo(out=args.out)
    return 0


def _cmd_s3_server(args: argparse.Namespace) -> int:
    import signal
    import threading

    from restoration.s3server import EmbeddedS3

    # Ctrl-C and SIGTERM both mean "stop cleanly"; the handlers are in place before anything is announced.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedS3(data_dir=args.data_dir, port=args.port, bucket=args.bucket) as server:
        print("embedded S3 is up; point clients at it with:")
        for name, value in server.env.items():
            print(f"export {name}={value}")
        print(f"bucket: s3://{server.bucket}   (Ctrl-C stops it)", flush=True)
        stop.wait()
        print("stopping", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from restoration.storage import redact

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no options with values
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args)
    except (UserError, OSError) as e:
        # Errors the user can act on (OSError: a file, the network or the store): one line, no traceback. Anything
        # else is a bug and keeps its traceback.
        print(f"restoration: error: {redact(str(e)).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("restoration: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
