"""FID of the bundled Fashion-MNIST generators, with a Fashion-MNIST classifier as the feature network.

Numbers from different feature networks, or from different sample counts, are not comparable (see
`restoration.fid`), so every run reports, with the same extractor and N, calibration rows against the same reference
(the Fashion-MNIST test split): the real-vs-real floor (train-split images vs the test split), and the test images
themselves pixelated 2x and with Gaussian noise (sigma 25/255), the kind of disturbance Heusel et al. used to show
that FID grows with visible damage. A generator near the floor is as good as this metric can tell; one above the
disturbed rows makes images that look worse to this network than visibly damaged real ones.

A class-conditional generator is asked for the reference images' own classes, so its overall FID compares like with
like; its row adds the FID per class (its samples of a class against the reference images of that class, beside the
same per-class floor), and the accuracy of the extractor's classifier on its samples (the share classified as the
class asked for) next to the classifier's accuracy on the reference images themselves.

    restoration bench fid --models dcgan-fmnist,vae-fmnist -n 10000 --out fid-report/
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from restoration import fid as F
from restoration.checkpoint import load_named, model_label
from restoration.errors import UserError
from restoration.metrics import image_grid
from restoration.sources import FASHION_MNIST_DIR, FASHION_MNIST_ENV

DEFAULT_MODELS = ("dcgan-fmnist", "vae-fmnist")
NUM_CLASSES = 10  # Fashion-MNIST's, which a conditional model must make


def _save_grid(path: Path, images: Tensor, nrow: int = 8) -> None:
    Image.fromarray(image_grid(images[: nrow * nrow], nrow=nrow)).save(path)


def run_fid_bench(
    models: list[str],
    n: int = 10000,
    seed: int = 0,
    extractor_path: str | None = None,
    inception_weights: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    fashion_mnist: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """FID of each generator against the Fashion-MNIST test split, with calibration rows of the same extractor and N.

    The reference is n test images (all 10,000 for n = 10,000, otherwise a seeded random subset). Rows: each model's
    n samples; "floor": n train-split images (seeded subset); "pixelated 2x" and "noise sigma=25": the reference
    images themselves, disturbed.

    Args:
        models: generator names or paths (see `restoration.fid.generate`); may be empty for the calibration rows alone.
        n: images per set, 2 to 10,000 (the size of the test split).
        seed: seeds the subsets, the latents and the noise.
        extractor_path: classifier model file (name, path or s3:// URI); None is the bundled `fmnist-classifier`.
        inception_weights: path to torch-fidelity's FID Inception v3 weights; when given, every row also gets the
            usual Inception FID (needs `pip install torch-fidelity`; slow on CPU).
        out_dir: when given, `fid.md`, `fid.json`, `<model>_samples.png` (64 samples each) and `real_samples.png`
            are written there.
        fashion_mnist: the idx files' folder (see `restoration.fid.load_fashion_mnist`).
        log: called with a progress line after each row.
    Returns:
        {"n", "seed", "reference", "extractor": {...}, "rows": [{"name", "kind", "description", "n", "fid",
        "fid_over_floor", ["inception_fid"], ["model_sha256"], "seconds"}, ...], "seconds", "table"}.
    """
    start = time.perf_counter()
    say = log or (lambda line: None)
    inception = F.inception_metric(os.fspath(inception_weights)) if inception_weights is not None else None
    # Check the arguments and load every model before the data and the slow part, so a bad one fails at once.
    if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= F.TEST_SPLIT_SIZE:
        raise UserError(f"n={n!r}: expected an int in [2, {F.TEST_SPLIT_SIZE}] (the size of the test split)")
    loaded = {name: F.check_generator(load_named(name), name) for name in models}
    extractor, extractor_file = F.load_extractor(extractor_path)
    for name, model in loaded.items():
        classes = len(F.class_names(model))
        if classes not in (0, NUM_CLASSES):
            raise UserError(f"{name} is conditional on {classes} classes: expected Fashion-MNIST's {NUM_CLASSES}")
    test_x, test_y = F.load_fashion_mnist("test", fashion_mnist)
    train_x, train_y = F.load_fashion_mnist("train", fashion_mnist)
    rng = torch.Generator().manual_seed(seed)
    pick = torch.arange(n) if n == test_x.shape[0] else torch.randperm(test_x.shape[0], generator=rng)[:n]
    reference, reference_y = test_x[pick], test_y[pick]
    pick = torch.randperm(train_x.shape[0], generator=rng)[:n]
    floor_set, floor_y = train_x[pick], train_y[pick]
    by_class = None  # the per-class reference, floor and real accuracy: made for the first conditional model

    # Reference statistics, once: reset() keeps them (reset_real_features=False) and clears the generated side.
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    F.add_images(metric, reference, True, extractor.batch_size)
    if inception is not None:
        F.add_images(inception, F.to_rgb_uint8(reference), True, extractor.batch_size)

    def score(images: Tensor) -> dict:
        metric.reset()
        F.add_images(metric, images, False, extractor.batch_size)
        out = {"fid": float(metric.compute())}
        if inception is not None:
            inception.reset()
            F.add_images(inception, F.to_rgb_uint8(images), False, extractor.batch_size)
            out["inception_fid"] = float(inception.compute())
        return out

    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
        _save_grid(out_path / "real_samples.png", reference)
    rows = []
    for name, model in loaded.items():
        t0 = time.perf_counter()
        names = F.class_names(model)
        asked = reference_y if names else None  # a conditional model is asked for the reference's classes
        images = F.sample_images(model, n, seed, extractor.batch_size, name, asked)
        label = model_label(name)
        if out_path is not None and names:  # one class per row, 10 each
            grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(NUM_CLASSES)
            grid = F.sample_images(model, len(grid_labels), seed, extractor.batch_size, name, grid_labels)
            _save_grid(out_path / f"{label}_samples.png", grid, nrow=NUM_CLASSES)
        elif out_path is not None:
            _save_grid(out_path / f"{label}_samples.png", images)
        conditional = {}
        if names:
            by_class = by_class or _class_reference(reference, reference_y, floor_set, floor_y, extractor, say)
            conditional = _class_scores(images, asked, names, by_class, extractor)
        rows.append(
            {
                "name": label,
                "kind": "generated",
                "description": f"{model.kind} samples, z ~ {F.latent_source(model)}"
                + (", classes of the reference" if names else "")
                + f", seed {seed}",
                "n": n,
                **score(images),
                **conditional,
                "model_sha256": model.sha256,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        accuracy = f", classified as asked {conditional['label_accuracy']:.4f}" if names else ""
        say(f"{label}: FID {rows[-1]['fid']:.4g}{accuracy} ({rows[-1]['seconds']}s)")
    calibration = [
        ("floor", "real vs real: train-split images vs the test reference", lambda: floor_set),
        ("pixelated 2x", "the reference images, every other pixel repeated 2x2", lambda: F.pixelate2x(reference)),
        (
            "noise sigma=25",
            "the reference images + N(0, (25/255)^2), clipped",
            lambda: F.add_noise(reference, 25, seed),
        ),
    ]
    for name, description, make in calibration:
        t0 = time.perf_counter()
        rows.append({"name": name, "kind": "calibration", "description": description, "n": n, **score(make())})
        rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
        say(f"{name}: FID {rows[-1]['fid']:.4g} ({rows[-1]['seconds']}s)")
    floor = next(row["fid"] for row in rows if row["name"] == "floor")
    for row in rows:
        row["fid_over_floor"] = row["fid"] / floor if floor > 0 else float("inf")

    result = {
        "n": n,
        "seed": seed,
        "reference": f"Fashion-MNIST test split ({n} of {test_x.shape[0]} images)",
        "extractor": {
            "model": extractor_path or F.DEFAULT_EXTRACTOR,
            "sha256": extractor_file.sha256,
            "feature_dim": extractor.num_features,
            "test_accuracy": extractor_file.meta.get("test_accuracy"),
        },
        "inception_weights": os.fspath(inception_weights) if inception_weights is not None else None,
        "real_accuracy": by_class["real_accuracy"] if by_class else None,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    result["table"] = format_table(result)
    if out_path is not None:
        (out_path / "fid.json").write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
        (out_path / "fid.md").write_text(_markdown(result, [model_label(name) for name in loaded]))
    return result


def _class_reference(
    reference: Tensor, reference_y: Tensor, floor_set: Tensor, floor_y: Tensor, extractor, say: Callable[[str], None]
) -> dict:
    """What conditional rows are compared with, per class: the reference images of each class, the floor (train-split
    images of the class vs those, as many as there are), and the classifier's accuracy on the reference."""
    t0 = time.perf_counter()
    predicted = F.classify(reference, extractor)
    classes = []
    for c in range(NUM_CLASSES):
        real = reference[reference_y == c]
        floor = floor_set[floor_y == c][: len(real)]
        classes.append(
            {
                "real": real,
                "n": len(real),
                "floor_fid": F.fid(real, floor, extractor) if min(len(real), len(floor)) >= 2 else float("nan"),
                "real_accuracy": float((predicted[reference_y == c] == c).float().mean())
                if len(real)
                else float("nan"),
            }
        )
    real_accuracy = float((predicted == reference_y).float().mean())
    say(f"per-class floor and real accuracy {real_accuracy:.4f} ({time.perf_counter() - t0:.1f}s)")
    return {"classes": classes, "real_accuracy": real_accuracy}


def _class_scores(images: Tensor, asked: Tensor, names: tuple[str, ...], by_class: dict, extractor) -> dict:
    """A conditional row's extra fields: `label_accuracy` (share of samples classified as asked), `real_accuracy`,
    and `per_class`: [{"label", "id", "n", "fid", "floor_fid", "accuracy", "real_accuracy"}, ...] for every class."""
    predicted = F.classify(images, extractor)
    per_class = []
    for c, name in enumerate(names):
        ref = by_class["classes"][c]
        mine = asked == c
        fake = images[mine]
        per_class.append(
            {
                "label": name,
                "id": c,
                "n": int(mine.sum()),
                "fid": F.fid(ref["real"], fake, extractor) if min(len(fake), ref["n"]) >= 2 else float("nan"),
                "floor_fid": ref["floor_fid"],
                "accuracy": float((predicted[mine] == c).float().mean()) if mine.any() else float("nan"),
                "real_accuracy": ref["real_accuracy"],
            }
        )
    return {
        "label_accuracy": float((predicted == asked).float().mean()),
        "real_accuracy": by_class["real_accuracy"],
        "per_class": per_class,
    }


def format_class_table(row: dict) -> str:
    """A conditional row's classes as a Markdown table: FID against the class's reference images (and the floor),
    and the share of its samples the classifier puts in the class (and of the real images)."""
    lines = [
        "| class | n | FID | floor FID | classified as asked | classifier on real |",
        "|---|---|---|---|---|---|",
    ]
    for c in row["per_class"]:
        cells = [f"{c['id']} {c['label']}", str(c["n"]), f"{c['fid']:.3f}", f"{c['floor_fid']:.3f}"]
        lines.append("| " + " | ".join(cells + [f"{c['accuracy']:.4f}", f"{c['real_accuracy']:.4f}"]) + " |")
    lines.append(
        f"| all | {row['n']} | {row['fid']:.3f} | | {row['label_accuracy']:.4f} | {row['real_accuracy']:.4f} |"
    )
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """The rows of a `run_fid_bench` result as a Markdown table."""
    inception = any("inception_fid" in row for row in result["rows"])
    header = ["set", "n", "FID (classifier)", "x floor"] + (["Inception FID"] if inception else []) + ["what"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in result["rows"]:
        cells = [row["name"], str(row["n"]), f"{row['fid']:.4f}", f"{row['fid_over_floor']:.1f}"]
        if inception:
            cells.append(f"{row['inception_fid']:.2f}" if "inception_fid" in row else "")
        cells.append(row["description"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(result: dict, labels: list[str]) -> str:
    extractor = result["extractor"]
    accuracy = extractor["test_accuracy"]
    lines = [
        "# FID on Fashion-MNIST",
        "",
        f"Reference: {result['reference']}. Features: `{extractor['model']}` (sha256 {extractor['sha256'][:12]}, "
        f"{extractor['feature_dim']}-d penultimate layer"
        + (f", test accuracy {accuracy:.4f}" if isinstance(accuracy, float) else "")
        + f"). Seed {result['seed']}. Lower is better; the floor is what real images score at this N.",
        "",
        result["table"],
        "",
    ]
    for row in result["rows"]:
        if "per_class" in row:
            lines += [
                f"`{row['name']}` per class (samples of the reference's classes):",
                "",
                format_class_table(row),
                "",
            ]
    lines += [
        "Samples (64 each; a conditional model: one class per row): "
        + ", ".join(f"`{label}_samples.png`" for label in labels + ["real"])
        + ".",
        "",
    ]
    return "\n".join(lines)


# --- Command line -------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `restoration bench fid` (and `python -m restoration.bench.fid`)."""
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated generator names or paths")
    parser.add_argument("-n", type=int, default=10000, help="images per set (at most 10000, the test split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for fid.md, fid.json and the sample grids")
    parser.add_argument("--extractor", default=None, help=f"classifier model file (default: {F.DEFAULT_EXTRACTOR})")
    parser.add_argument("--inception-weights", default=None, help="FID Inception v3 weights: adds Inception FID")
    parser.add_argument(
        "--fashion-mnist", default=None, help=f"idx files folder (default: ${FASHION_MNIST_ENV} or {FASHION_MNIST_DIR})"
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed `add_arguments` options and print the table.

    Returns:
        The exit status, 0.
    """
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    result = run_fid_bench(
        models,
        n=args.n,
        seed=args.seed,
        extractor_path=args.extractor,
        inception_weights=args.inception_weights,
        out_dir=args.out,
        fashion_mnist=args.fashion_mnist,
        log=lambda line: print(line, flush=True),
    )
    print(result["table"])
    for row in result["rows"]:
        if "per_class" in row:
            print(f"\n{row['name']} per class:\n{format_class_table(row)}")
    print(f"{result['seconds']:.0f}s" + (f"; wrote {args.out}/fid.md, fid.json and sample grids" if args.out else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m restoration.bench.fid [options]`: see `add_arguments`."""
    parser = argparse.ArgumentParser(
        prog="python -m restoration.bench.fid", description="FID of the Fashion-MNIST generators"
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
