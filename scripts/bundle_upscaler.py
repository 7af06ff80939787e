"""Bundle a trained upscaler: copy a run's exported model into restoration/weights/ with its JSON record.

    python scripts/bundle_upscaler.py RUN_MODEL_FILE NAME --command "restoration train upscaler ..." \
        [--wall-seconds S] [--note "..."]

The record holds what made the model (training config, command, wall time) and what it measures on Set5 and Set14
with the super-resolution protocol of `restoration bench quality --task upscale` (modcrop, `lr:F` bicubic, PSNR/SSIM
on Y with `scale` border pixels cropped), beside Pillow's bicubic on the same inputs.
"""

from __future__ import annotations

import json
import shutil
import sys

import bundle_common

from restoration.bench.quality import upscale
from restoration.checkpoint import load_model


def main(argv: list[str] | None = None) -> int:
    args = bundle_common.parse(bundle_common.parser(__doc__), argv)
    loaded = load_model(args.model_file, expected_kind="upscaler")
    scale = int(loaded.config.scale)
    dest = bundle_common.destination(args.name)
    shutil.copyfile(args.model_file, dest)
    result = upscale.benchmark(upscale.UpscaleConfig(scales=(scale,), models=(str(dest),), sheet_images=1))
    measured = {}
    for row in result["rows"]:
        if row["method"] in ("bicubic", upscale.ModelUpscaler(str(dest)).label):
            who = "bicubic" if row["method"] == "bicubic" else "model"
            measured.setdefault(row["set"], {})[who] = {"psnr_db": round(row["psnr"], 3), "ssim": round(row["ssim"], 4)}
    train_config = loaded.meta.get("train_config") or {}
    record = {
        "name": args.name,
        "file": dest.name,
        "sha256": loaded.sha256,
        "task": f"x{scale} super-resolution of gray images, and of the Y channel of colour images (CbCr bicubic)",
        "model": {"kind": "upscaler", **loaded.config.__dict__},
        "trained_on": "Train400 (400 gray 180x180 PNG; 1 in 20 held out for validation), low-resolution inputs made "
        f"by `degrade` lr:{scale} (modcrop + Pillow bicubic in float), aligned {train_config.get('patch_size')} px "
        "low-resolution crops with the 8 dihedral transforms, L1 loss",
        "training": bundle_common.training(args, loaded),
        "metrics": {
            "protocol": upscale.PROTOCOL,
            "eval_images": "Set5, Set14" if result["full_sets"] else result["description"],
            "scale": scale,
            **measured,
        },
    }
    print(json.dumps(record["metrics"], indent=2))
    bundle_common.write_record(args, record, loaded.sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main())
