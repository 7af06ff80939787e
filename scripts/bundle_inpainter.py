"""Bundle a trained inpainter: copy a run's exported model into restoration/weights/ with its JSON record.

    python scripts/bundle_inpainter.py RUN_MODEL_FILE NAME --command "restoration train inpainter ..." \
        [--wall-seconds S] [--note "..."]

The record holds what made the model (training config, command, wall time) and what it measures on Set12 with the
protocol of `restoration bench quality --task inpaint` (fixed seeded free-form holes at 10/25/40 %, the 8-bit
composite, PSNR over the whole image and inside the holes), beside the classical fills on the same holes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from restoration.bench.quality import inpaint
from restoration.checkpoint import WEIGHTS_DIR, load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_file", type=Path)
    p.add_argument("name")
    p.add_argument("--command", required=True, help="the training command(s) that made the model")
    p.add_argument("--wall-seconds", type=float, default=None, help="training wall time, all stages together")
    p.add_argument("--note", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    loaded = load_model(args.model_file, expected_kind="inpainter")
    dest = WEIGHTS_DIR / f"{args.name}.pt"
    shutil.copyfile(args.model_file, dest)
    result = inpaint.benchmark(inpaint.InpaintConfig(models=(str(dest),), sheet_images=1))
    measured: dict[str, dict] = {}
    for row in result["rows"]:
        who = "model" if row["method"] == args.name else row["method"]
        measured.setdefault(f"{row['coverage']:.0%}", {})[who] = {
            "psnr_db": round(row["psnr"], 3),
            "hole_psnr_db": round(row["psnr_hole"], 3),
            "seconds_per_mp": round(row["seconds_per_mp"], 3),
        }
    train_config = loaded.meta.get("train_config") or {}
    record = {
        "name": args.name,
        "file": dest.name,
        "sha256": loaded.sha256,
        "task": "fill the masked pixels of gray images (colour: each channel with the same mask); the unmasked pixels "
        "are kept exactly",
        "model": {"kind": "inpainter", **loaded.config.__dict__},
        "trained_on": "Train400 (400 gray 180x180 PNG; 1 in 20 held out for validation), "
        f"{train_config.get('patch_size')} px patches with the 8 dihedral transforms and a fresh free-form mask each "
        f"(coverage {train_config.get('coverage_min')}-{train_config.get('coverage_max')}), L1 in the holes plus "
        f"{train_config.get('outside_weight')} x L1 outside",
        "training": {
            "command": args.command,
            "train_config": train_config or None,
            "best_epoch": loaded.meta.get("epoch"),
            "wall_seconds": args.wall_seconds,
            "device": "CPU (2 cores, bfloat16 autocast on AVX512-BF16)"
            if train_config.get("precision") == "bf16"
            else "CPU",
        },
        "metrics": {
            "protocol": " ".join(inpaint.__doc__.split("\n\n", 1)[1].split()),
            "eval_images": result["description"],
            "precision": result["precision"],
            **measured,
        },
    }
    if args.note:
        record["note"] = args.note
    (WEIGHTS_DIR / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(inpaint.format_table(result))
    print(f"bundled {dest} sha256 {loaded.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
