"""FID of the bundled Fashion-MNIST generators, with a Fashion-MNIST classifier as the feature network.

Fréchet Inception Distance: M. Heusel, H. Ramsauer, T. Unterthiner, B. Nessler, S. Hochreiter, "GANs Trained by a
Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017. Real and generated images are
embedded by a fixed network, each set of embeddings is fitted by a Gaussian N(mu, Sigma), and

    FID = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2)).

The statistics and the distance come from torchmetrics' `FrechetInceptionDistance` (sums kept in float64); here the
network is the penultimate layer of `restoration.models.classifier.Classifier` trained on Fashion-MNIST (bundled as
`fmnist-classifier`), because Inception v3 features of 28x28 gray images upscaled to 299x299 say little about them.
When Inception weights are supplied the usual Inception FID is computed as well, for comparison with the literature.

Numbers from different feature networks, or from different sample counts, are not comparable: FID is biased upwards
at small N. So every benchmark reports, with the same extractor and N, calibration rows against the same reference
(the Fashion-MNIST test split): the real-vs-real floor (train-split images vs the test split), and the test images
themselves pixelated 2x and with Gaussian noise (sigma 25/255), the kind of disturbance Heusel et al. used to show
that FID grows with visible damage. A generator near the floor is as good as this metric can tell; one above the
disturbed rows makes images that look worse to this network than visibly damaged real ones.

    python -m restoration.fid --models dcgan-fmnist,vae-fmnist -n 10000 --out fid-report/
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from restoration.checkpoint import LoadedModel, load_named, model_label
from restoration.metrics import image_grid
from restoration.models.classifier import CHANNELS, IMAGE_SIZE, Classifier
from restoration.sources import FASHION_MNIST_DIR, FASHION_MNIST_ENV, read_fashion_mnist

DEFAULT_EXTRACTOR = "fmnist-classifier"  # bundled in restoration/weights
DEFAULT_MODELS = ("dcgan-fmnist", "vae-fmnist")
GENERATOR_KINDS = ("dcgan", "vae")
TEST_SPLIT_SIZE = 10000  # images in the Fashion-MNIST test split, the most one row can compare against
GRID_SAMPLES = 64  # images in each <model>_samples.png, 8 x 8


# --- Data ---------------------------------------------------------------------------------------------------------


def load_fashion_mnist(split: str, folder: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Read one split of Fashion-MNIST from its idx files.

    Args:
        split: "train" (60,000 images) or "test" (10,000).
        folder: the idx files' folder; None reads $RESTORATION_FASHION_MNIST or /usr/share/datasets/fashion-mnist.
    Returns:
        (images, labels): (N, 1, 28, 28) float32 in [0, 1] and (N,) int64 class indices.
    Raises:
        FileNotFoundError: naming the folder and how to install the dataset.
    """
    images, labels = read_fashion_mnist(split, folder)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]  # (N, 1, 28, 28)
    return x, torch.from_numpy(labels.astype(np.int64))


def _check_images(images: Tensor, name: str) -> None:
    shape = (CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != shape:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} is {got}: expected a tensor of shape (N, {', '.join(map(str, shape))})")
    if not images.is_floating_point():
        raise ValueError(f"{name} has dtype {images.dtype}: expected float images in [0, 1]")


# --- Calibration sets ---------------------------------------------------------------------------------------------


def pixelate2x(images: Tensor) -> Tensor:
    """Halve the resolution by keeping every other pixel, then repeat each kept pixel 2x2.

    Args:
        images: (N, C, H, W) with even H and W.
    Returns:
        (N, C, H, W): out[..., i, j] = images[..., 2 (i // 2), 2 (j // 2)].
    """
    if images.ndim != 4 or images.shape[-1] % 2 or images.shape[-2] % 2:
        raise ValueError(f"images have shape {tuple(images.shape)}: expected (N, C, H, W) with even H and W")
    kept = images[..., ::2, ::2]  # (N, C, H / 2, W / 2)
    return kept.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def add_noise(images: Tensor, sigma: float = 25.0, seed: int = 0) -> Tensor:
    """Add Gaussian noise N(0, (sigma/255)^2) and clip to [0, 1] (these stand in for images, which live there).

    Args:
        images: (N, C, H, W) float in [0, 1].
        sigma: standard deviation on the 0-255 scale.
        seed: seeds the noise (drawn on CPU, so the same on any device).
    Returns:
        The noisy images, same shape, dtype and device.
    """
    if not images.is_floating_point():
        raise ValueError(f"images have dtype {images.dtype}: expected float images in [0, 1]")
    if not sigma >= 0:
        raise ValueError(f"sigma={sigma!r}: expected a standard deviation >= 0 on the 0-255 scale")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32).to(images.device, images.dtype)
    return (images + noise * (sigma / 255.0)).clamp(0, 1)


# --- Features and the distance ------------------------------------------------------------------------------------


class FeatureExtractor(nn.Module):
    """The classifier's penultimate activations as a torchmetrics feature network.

    Always in eval mode (torchmetrics' `Metric.train()` cannot switch dropout or BatchNorm statistics on), runs
    without gradients in chunks of `batch_size`, and returns float64 so the metric's result stays float64.
    Input: (B, 1, 28, 28) float in [0, 1], or uint8 in [0, 255]. Output: (B, D) float64, on the input's device.
    """

    def __init__(self, classifier: Classifier, batch_size: int = 500):
        super().__init__()
        if not isinstance(classifier, Classifier):
            raise TypeError(f"FeatureExtractor wraps a Classifier, got {type(classifier).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
        self.classifier = classifier
        self.batch_size = batch_size
        self.num_features = classifier.config.feature_dim  # read by torchmetrics instead of a dummy forward pass
        self.classifier.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        device = next(self.classifier.parameters()).device
        chunks = [
            self.classifier.features(x[i : i + self.batch_size].to(device)).double()  # (b, D)
            for i in range(0, x.shape[0], self.batch_size)
        ]
        return torch.cat(chunks).to(x.device)  # (B, D)


def load_extractor(name_or_path: str | None = None, batch_size: int = 500) -> tuple[FeatureExtractor, LoadedModel]:
    """Load a classifier model file as a `FeatureExtractor`.

    Args:
        name_or_path: a bundled name, a local path or an s3:// URI; None is the bundled `fmnist-classifier`.
        batch_size: images per forward pass.
    Returns:
        (extractor on CPU, the loaded model file for its sha256 and meta).
    """
    loaded = load_named(name_or_path or DEFAULT_EXTRACTOR, expected_kind="classifier")
    return FeatureExtractor(loaded.module, batch_size=batch_size), loaded


def _update(metric: FrechetInceptionDistance, images: Tensor, real: bool, batch_size: int) -> None:
    for i in range(0, images.shape[0], batch_size):
        metric.update(images[i : i + batch_size], real=real)


def fid(real: Tensor, fake: Tensor, extractor: nn.Module, batch_size: int = 500) -> float:
    """FID between two image sets in the feature space of `extractor`, computed by torchmetrics in float64.

    Args:
        real, fake: (N, 1, 28, 28) float images in [0, 1], N >= 2 each (the counts may differ).
        extractor: maps a batch of images to (B, D) features, e.g. a `FeatureExtractor`.
        batch_size: images per metric update.
    Returns:
        The Fréchet distance, >= 0 up to rounding.
    """
    _check_images(real, "real")
    _check_images(fake, "fake")
    metric = FrechetInceptionDistance(feature=extractor)
    _update(metric, real, True, batch_size)
    _update(metric, fake, False, batch_size)
    return float(metric.compute())


def _inception_metric(weights_path: str) -> FrechetInceptionDistance:
    """torchmetrics' Inception FID (2048-d pool features, torch-fidelity's FID Inception v3) from local weights."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError("Inception FID needs the torch-fidelity package: pip install torch-fidelity")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"Inception weights {weights_path} not found: expected the pt_inception-2015-12-05 file"
        )
    return FrechetInceptionDistance(
        feature=2048, feature_extractor_weights_path=weights_path, reset_real_features=False
    )


def _to_rgb_uint8(images: Tensor) -> Tensor:
    """(N, 1, H, W) float in [0, 1] -> (N, 3, H, W) uint8, what the Inception network takes (it resizes to 299)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


# --- Generators ---------------------------------------------------------------------------------------------------


def _check_generator(loaded: LoadedModel, name: str) -> LoadedModel:
    """Refuse a model file that is not a generator of 1-channel 28x28 images."""
    if loaded.kind not in GENERATOR_KINDS:
        raise ValueError(f"{name} is a {loaded.kind} model: expected one of {', '.join(GENERATOR_KINDS)}")
    config = loaded.config
    if (config.channels, config.image_size) != (CHANNELS, IMAGE_SIZE):
        raise ValueError(
            f"{name} makes {config.channels}-channel {config.image_size}x{config.image_size} images: "
            f"expected {CHANNELS}-channel {IMAGE_SIZE}x{IMAGE_SIZE} (Fashion-MNIST)"
        )
    return loaded


def latent_source(loaded: LoadedModel) -> str:
    """Where a generator's latents come from, for the tables."""
    k = getattr(loaded.config, "prior_components", 0)
    return f"a {k}-component mixture fitted to q(z)" if k else "N(0, I)"


def _generate(loaded: LoadedModel, n: int, seed: int, batch_size: int, name: str) -> Tensor:
    _check_generator(loaded, name)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or batch_size < 1:
        raise ValueError(f"n={n!r}, batch_size={batch_size!r}: expected ints >= 1")
    module = loaded.module.eval()
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    with torch.no_grad():
        for first in range(0, n, batch_size):
            # Both sample APIs return images in [0, 1]: DCGAN maps its tanh output by (x + 1) / 2, the VAE decodes
            # the Bernoulli mean sigmoid(logits). No truncation; the VAE draws from its sampling prior.
            chunks.append(module.sample(min(batch_size, n - first), generator=generator).float().cpu())
    return torch.cat(chunks).clamp(0, 1)  # (n, 1, 28, 28)


def generate(model_name_or_path: str, n: int, seed: int = 0, batch_size: int = 500) -> Tensor:
    """Draw n images from a bundled or saved Fashion-MNIST generator (a "dcgan" or "vae" model file).

    Args:
        model_name_or_path: a bundled name (`dcgan-fmnist`, `vae-fmnist`), a local path or an s3:// URI.
        n: number of images.
        seed: seeds the latents; the same (model, n, seed, batch_size) gives the same images.
        batch_size: images per forward pass.
    Returns:
        (n, 1, 28, 28) float32 images in [0, 1], on CPU.
    """
    return _generate(load_named(model_name_or_path), n, seed, batch_size, model_name_or_path)


# --- The benchmark ------------------------------------------------------------------------------------------------


def _save_grid(path: Path, images: Tensor) -> None:
    Image.fromarray(image_grid(images[:GRID_SAMPLES], nrow=8)).save(path)


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
        models: generator names or paths (see `generate`); may be empty for the calibration rows alone.
        n: images per set, 2 to 10,000 (the size of the test split).
        seed: seeds the subsets, the latents and the noise.
        extractor_path: classifier model file (name, path or s3:// URI); None is the bundled `fmnist-classifier`.
        inception_weights: path to torch-fidelity's FID Inception v3 weights; when given, every row also gets the
            usual Inception FID (needs `pip install torch-fidelity`; slow on CPU).
        out_dir: when given, `fid.md`, `fid.json`, `<model>_samples.png` (64 samples each) and `real_samples.png`
            are written there.
        fashion_mnist: the idx files' folder (see `load_fashion_mnist`).
        log: called with a progress line after each row.
    Returns:
        {"n", "seed", "reference", "extractor": {...}, "rows": [{"name", "kind", "description", "n", "fid",
        "fid_over_floor", ["inception_fid"], ["model_sha256"], "seconds"}, ...], "seconds", "table"}.
    """
    start = time.perf_counter()
    say = log or (lambda line: None)
    inception = _inception_metric(os.fspath(inception_weights)) if inception_weights is not None else None
    # Check the arguments and load every model before the data and the slow part, so a bad one fails at once.
    if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= TEST_SPLIT_SIZE:
        raise ValueError(f"n={n!r}: expected an int in [2, {TEST_SPLIT_SIZE}] (the size of the test split)")
    loaded = {name: _check_generator(load_named(name), name) for name in models}
    extractor, extractor_file = load_extractor(extractor_path)
    test_x, _ = load_fashion_mnist("test", fashion_mnist)
    train_x, _ = load_fashion_mnist("train", fashion_mnist)
    rng = torch.Generator().manual_seed(seed)
    reference = test_x if n == test_x.shape[0] else test_x[torch.randperm(test_x.shape[0], generator=rng)[:n]]
    floor_set = train_x[torch.randperm(train_x.shape[0], generator=rng)[:n]]

    # Reference statistics, once: reset() keeps them (reset_real_features=False) and clears the generated side.
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    _update(metric, reference, True, extractor.batch_size)
    if inception is not None:
        _update(inception, _to_rgb_uint8(reference), True, extractor.batch_size)

    def score(images: Tensor) -> dict:
        metric.reset()
        _update(metric, images, False, extractor.batch_size)
        out = {"fid": float(metric.compute())}
        if inception is not None:
            inception.reset()
            _update(inception, _to_rgb_uint8(images), False, extractor.batch_size)
            out["inception_fid"] = float(inception.compute())
        return out

    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
        _save_grid(out_path / "real_samples.png", reference)
    rows = []
    for name, model in loaded.items():
        t0 = time.perf_counter()
        images = _generate(model, n, seed, extractor.batch_size, name)
        label = model_label(name)
        if out_path is not None:
            _save_grid(out_path / f"{label}_samples.png", images)
        rows.append(
            {
                "name": label,
                "kind": "generated",
                "description": f"{model.kind} samples, z ~ {latent_source(model)}, seed {seed}",
                "n": n,
                **score(images),
                "model_sha256": model.sha256,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        say(f"{label}: FID {rows[-1]['fid']:.4g} ({rows[-1]['seconds']}s)")
    calibration = [
        ("floor", "real vs real: train-split images vs the test reference", lambda: floor_set),
        ("pixelated 2x", "the reference images, every other pixel repeated 2x2", lambda: pixelate2x(reference)),
        ("noise sigma=25", "the reference images + N(0, (25/255)^2), clipped", lambda: add_noise(reference, 25, seed)),
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
            "model": extractor_path or DEFAULT_EXTRACTOR,
            "sha256": extractor_file.sha256,
            "feature_dim": extractor.num_features,
            "test_accuracy": extractor_file.meta.get("test_accuracy"),
        },
        "inception_weights": os.fspath(inception_weights) if inception_weights is not None else None,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    result["table"] = format_table(result)
    if out_path is not None:
        (out_path / "fid.json").write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
        (out_path / "fid.md").write_text(_markdown(result, [model_label(name) for name in loaded]))
    return result


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
        "Samples (64 each): " + ", ".join(f"`{label}_samples.png`" for label in labels + ["real"]) + ".",
        "",
    ]
    return "\n".join(lines)


# --- Command line -------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `restoration bench fid` (and `python -m restoration.fid`)."""
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated generator names or paths")
    parser.add_argument("-n", type=int, default=10000, help="images per set (at most 10000, the test split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for fid.md, fid.json and the sample grids")
    parser.add_argument("--extractor", default=None, help=f"classifier model file (default: {DEFAULT_EXTRACTOR})")
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
    print(f"{result['seconds']:.0f}s" + (f"; wrote {args.out}/fid.md, fid.json and sample grids" if args.out else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m restoration.fid [options]`: see `add_arguments`."""
    parser = argparse.ArgumentParser(
        prog="python -m restoration.fid", description="FID of the Fashion-MNIST generators"
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
