"""What the bundle scripts share: their common arguments, the record's "training" block, and writing the model's JSON
record beside it in restoration/weights/."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from restoration.checkpoint import WEIGHTS_DIR


def parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every bundle script takes: the run's model file, the bundled name, what made it, and a note."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_file", type=Path)
    p.add_argument("name")
    p.add_argument("--command", required=True, help="the training command(s) that made the model")
    p.add_argument("--wall-seconds", type=float, default=None, help="training wall time, all stages together")
    p.add_argument("--device", default=None, help="what trained it (default: a 2-core CPU, as the config says)")
    p.add_argument("--note", default=None)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parsed arguments; the measurements that follow use the two threads of the project's CPU machines."""
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    return args


def destination(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.pt"


def training(args: argparse.Namespace, loaded) -> dict:
    """The record's "training" block: the command, the run's training config and best epoch, wall time, device."""
    train_config = loaded.meta.get("train_config") or {}
    bf16 = train_config.get("precision") == "bf16"
    return {
        "command": args.command,
        "train_config": train_config or None,
        "best_epoch": loaded.meta.get("epoch"),
        "wall_seconds": args.wall_seconds,
        "device": args.device or ("CPU (2 cores, bfloat16 autocast)" if bf16 else "CPU"),
    }


def bench_metrics(bench_module, result: dict, measured: dict) -> dict:
    """The record's "metrics" block for a `restoration.bench.quality` task: its protocol (the module docstring's
    second paragraph, whitespace folded), the evaluation images and precision of `result`, then `measured`."""
    doc = bench_module.__doc__ or ""
    return {
        "protocol": " ".join(doc.split("\n\n", 1)[-1].split()) or None,
        "eval_images": result["description"],
        "precision": result["precision"],
        **measured,
    }


def write_record(args: argparse.Namespace, record: dict, sha256: str) -> None:
    """Writes NAME.json (with --note, when given) beside the bundled NAME.pt and says so."""
    if args.note:
        record["note"] = args.note
    (WEIGHTS_DIR / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"bundled {destination(args.name)} sha256 {sha256}")
