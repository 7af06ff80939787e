"""Bundle a trained inpainter: copy a run's exported model into restoration/weights/ with its JSON record.

    python scripts/bundle_inpainter.py RUN_MODEL_FILE NAME --command "restoration train inpainter ..." \
        [--wall-seconds S] [--note "..."]

The record holds what made the model (training config, command, wall time) and what it measures with the protocol
of `restoration bench quality --task inpaint` (fixed seeded free-form holes at 10/25/40 %, the 8-bit composite, PSNR
over the whole image and inside the holes), beside the classical fills on the same holes: on Set12 for a gray model,
on the colour sample photos (`--color`) for an RGB one.
"""

from __future__ import annotations

import shutil
import sys

import bundle_common

from restoration.bench.quality import inpaint
from restoration.checkpoint import load_model

TRAINED_ON = {
    False: "Train400 (400 gray 180x180 PNG; 1 in 20 held out for validation)",
    True: "LIVE1 (29 colour photos; Set5 for validation)",
}


def main(argv: list[str] | None = None) -> int:
    args = bundle_common.parse(bundle_common.parser(__doc__), argv)
    loaded = load_model(args.model_file, expected_kind="inpainter")
    dest = bundle_common.destination(args.name)
    shutil.copyfile(args.model_file, dest)
    color = loaded.config.channels == 3
    result = inpaint.benchmark(inpaint.InpaintConfig(models=(str(dest),), color=color, sheet_images=1))
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
        "task": "fill the masked pixels of "
        + ("colour images" if color else "gray images (colour: each channel with the same mask)")
        + "; the unmasked pixels are kept exactly",
        "model": {"kind": "inpainter", **loaded.config.__dict__},
        "trained_on": TRAINED_ON[color] + ", "
        f"{train_config.get('patch_size')} px patches with the 8 dihedral transforms and a fresh free-form mask each "
        f"(coverage {train_config.get('coverage_min')}-{train_config.get('coverage_max')}), L1 in the holes plus "
        f"{train_config.get('outside_weight')} x L1 outside",
        "training": bundle_common.training(args, loaded),
        "metrics": bundle_common.bench_metrics(inpaint, result, measured),
    }
    print(inpaint.format_table(result))
    bundle_common.write_record(args, record, loaded.sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main())
