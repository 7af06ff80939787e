"""Bundle a trained restorer: copy a run's exported model into restoration/weights/ with its JSON record.

    python scripts/bundle_restorer.py RUN_MODEL_FILE NAME --task "..." --command "restoration train ..." \
        [--eval-images DIR|color-samples] [--wall-seconds S] [--device "NVIDIA H200 (GPU kit)"]

The record holds what made the model (preset, training config, command, wall time) and what it measures on the
evaluation images with the benchmark protocol (noise added in float with seed 0, not clipped; PSNR on the whole image,
data range 1): Gaussian noise at sigma 15/25/50, and for restore-* models JPEG q 10/20 and Gaussian blur 1.0 too.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import bundle_common
import numpy as np

from restoration import degrade, metrics
from restoration.checkpoint import load_model
from restoration.inference import RestoreActor
from restoration.sources import load_images

COLOR_SAMPLES = "color-samples"


def measure(model_file: Path, images: list[np.ndarray], restore_kinds: bool) -> dict:
    """Mean PSNR of inputs and outputs per degradation, with the production inference path (fp32)."""
    actor = RestoreActor(str(model_file), precision="fp32")
    cases = [f"noise:{s}" for s in (15, 25, 50)]
    if restore_kinds:
        cases += ["jpeg:10", "jpeg:20", "blur:1"]
    out = {}
    for case in cases:
        inputs, outputs = [], []
        for i, clean in enumerate(images):
            rng = np.random.default_rng([0, i])
            kind, value = case.split(":")
            if kind == "noise":
                degraded = clean + rng.standard_normal(clean.shape).astype(np.float32) * np.float32(float(value) / 255)
            elif kind == "jpeg":
                degraded = degrade.jpeg(clean, int(value))
            else:
                degraded = degrade.gaussian_blur(clean, float(value))
            restored = actor.restore_array(degraded[None])[0]
            inputs.append(metrics.psnr(np.clip(degraded, 0, 1) if kind != "noise" else degraded, clean))
            outputs.append(metrics.psnr(restored, clean))
        out[case] = {"input_psnr_db": round(float(np.mean(inputs)), 3), "psnr_db": round(float(np.mean(outputs)), 3)}
        print(f"{case:10s} {out[case]['input_psnr_db']:7.3f} -> {out[case]['psnr_db']:7.3f} dB", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = bundle_common.parser(__doc__)
    p.add_argument("--task", required=True)
    p.add_argument("--trained-on", required=True)
    p.add_argument(
        "--eval-images",
        default=str(Path(__file__).resolve().parents[1].parent / "shared/datasets/Set12"),
        help=f"folder of evaluation images (default: Set12), or {COLOR_SAMPLES!r}: the 7 photos of bench quality --color",
    )
    args = bundle_common.parse(p, argv)

    loaded = load_model(args.model_file, expected_kind="restorer")
    if args.eval_images == COLOR_SAMPLES:
        from restoration.bench.quality import QualityConfig, load_benchmark_images

        _, _, images = load_benchmark_images(QualityConfig(color=True))
    else:
        images = load_images(args.eval_images, channels=loaded.config.channels)
    dest = bundle_common.destination(args.name)
    shutil.copyfile(args.model_file, dest)
    record = {
        "name": args.name,
        "file": dest.name,
        "sha256": loaded.sha256,
        "task": args.task,
        "model": {"kind": "restorer", **loaded.config.__dict__},
        "trained_on": args.trained_on,
        "training": bundle_common.training(args, loaded),
        "metrics": {
            "protocol": "noise N(0, sigma/255) added in float, not clipped, seeded per image; JPEG via Pillow; PSNR "
            "on the whole image, data range 1, output clipped to [0, 1]; fp32 inference",
            "eval_images": Path(args.eval_images).name,
            **measure(dest, images, args.name.startswith("restore")),
        },
    }
    bundle_common.write_record(args, record, loaded.sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main())
