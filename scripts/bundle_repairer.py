"""Bundle a trained repairer: its detection threshold chosen on held-out images, then the model copied into
restoration/weights/ with its JSON record.

    python scripts/bundle_repairer.py RUN_MODEL_FILE NAME --held-out FOLDER [--color] \
        --command "restoration train repairer ..." [--wall-seconds S] [--thresholds 0,0.5,1,...] [--note "..."]

The threshold: the lowest of `--thresholds` (logits; 0 is probability 1/2) at which the repairer leaves the undamaged
held-out images at `--clean-psnr` dB or more against themselves (pooled PSNR, the protocol of `restoration bench quality
--task repair`). A higher threshold finds fewer false scratches on clean texture and also misses more faint damage,
so the lowest that keeps clean images clean is taken. Give the held-out split of the training data (the images
`restoration.data.held_out` keeps out of training), not the evaluation images.

The record holds what made the model, the threshold sweep on the held-out images and what the bundled model measures
on the evaluation images (Set12, or the colour photos with --color), beside the damaged input and a 3x3 median filter.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import bundle_common

from restoration.bench.quality import repair
from restoration.checkpoint import load_model, save_model


def _with_threshold(source: Path, threshold: float, dest: Path) -> None:
    loaded = load_model(source, expected_kind="repairer")
    config = dataclasses.replace(loaded.config, logit_threshold=threshold)
    loaded.module.config = config
    save_model(dest, "repairer", config, loaded.module, loaded.meta)


def _measured(result: dict, label: str) -> dict:
    """{damage or "clean": {"psnr_db", ...}} for one model's rows, and the baselines' under their own names."""
    out: dict[str, dict] = {}
    for row in result["rows"]:
        who = "model" if row["method"] == label else row["method"]
        cell = {"psnr_db": round(row["psnr"], 3), "seconds_per_mp": round(row["seconds_per_mp"], 3)}
        if row["damage"] == "none":
            cell = {"psnr_vs_input_db": round(row["psnr"], 3), "worst_image_db": round(row["worst_psnr"], 3)}
        else:
            cell["damage_psnr_db"] = round(row["psnr_damage"], 3)
        out.setdefault("clean" if row["damage"] == "none" else row["damage"], {})[who] = cell
    return out


def main(argv: list[str] | None = None) -> int:
    p = bundle_common.parser(__doc__)
    p.add_argument("--held-out", required=True, type=Path, help="folder of held-out training images")
    p.add_argument("--color", action="store_true", help="a colour repairer: evaluated on the colour photos")
    p.add_argument("--thresholds", default="0,0.5,1,1.5,2,2.5,3,3.5,4", help="logit thresholds to try")
    p.add_argument("--clean-psnr", type=float, default=40.0, help="dB the undamaged images must keep")
    args = bundle_common.parse(p, argv)

    loaded = load_model(args.model_file, expected_kind="repairer")
    thresholds = sorted(float(t) for t in args.thresholds.split(","))
    sweep = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for t in thresholds:
            files[t] = Path(tmp) / f"threshold{t:+g}.pt"
            _with_threshold(args.model_file, t, files[t])
        result = repair.benchmark(
            repair.RepairConfig(images=str(args.held_out), color=args.color, models=tuple(map(str, files.values())))
        )
        by_key = {(r["method"], r["damage"]): r for r in result["rows"]}
        for t, path in files.items():
            label = path.stem
            sweep[f"{t:g}"] = {
                "damaged_psnr_db": round(by_key[(label, result["damage"])]["psnr"], 3),
                "clean_psnr_db": round(by_key[(label, "none")]["psnr"], 3),
            }
    chosen = next((t for t in thresholds if sweep[f"{t:g}"]["clean_psnr_db"] >= args.clean_psnr), None)
    if chosen is None:
        print(f"no threshold of {thresholds} keeps the held-out clean images at {args.clean_psnr} dB: {sweep}")
        return 1
    print(f"held-out sweep ({result['description']}): {sweep}; chosen threshold {chosen:g}")

    dest = bundle_common.destination(args.name)
    _with_threshold(args.model_file, chosen, dest)
    bundled = load_model(dest, expected_kind="repairer")
    result = repair.benchmark(repair.RepairConfig(models=(str(dest),), color=args.color, sheet_images=1))
    data = "LIVE1 (29 colour photos)" if args.color else "Train400 (400 gray 180x180 PNG)"
    record = {
        "name": args.name,
        "file": dest.name,
        "sha256": bundled.sha256,
        "task": "find and fill thin scratches, dust and spots with no mask given ("
        + ("colour" if args.color else "gray")
        + " images); every pixel outside the found mask is kept exactly",
        "model": {"kind": "repairer", **dataclasses.asdict(bundled.config)},
        "trained_on": f"{data}, 1 in 20 held out for validation; damage drawn on the fly (scratches, spots), the "
        "detector trained on the damage mask (BCE) and the fill on the grown mask (L1)",
        "training": bundle_common.training(args, loaded),
        "threshold": {
            "rule": f"the lowest logit threshold keeping the held-out clean images at >= {args.clean_psnr:g} dB",
            "held_out_images": f"the held-out split of the training set ({args.held_out.name})",
            "damage": result["damage"],
            "sweep": sweep,
            "chosen": chosen,
        },
        "metrics": bundle_common.bench_metrics(repair, result, _measured(result, result["models"][0])),
    }
    print(repair.format_table(result))
    bundle_common.write_record(args, record, bundled.sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main())
