"""FID with a Fashion-MNIST classifier as the feature network, and the image sets it is calibrated with.

Fréchet Inception Distance: M. Heusel, H. Ramsauer, T. Unterthiner, B. Nessler, S. Hochreiter, "GANs Trained by a
Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017. Real and generated images are
embedded by a fixed network, each set of embeddings is fitted by a Gaussian N(mu, Sigma), and

    FID = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2)).

The statistics and the distance come from torchmetrics' `FrechetInceptionDistance` (sums kept in float64); here the
network is the penultimate layer of `restoration.models.classifier.Classifier` trained on Fashion-MNIST (bundled as
`fmnist-classifier`), because Inception v3 features of 28x28 gray images upscaled to 299x299 say little about them.
`inception_metric` gives the usual Inception FID when its weights are supplied, for comparison with the literature.

Numbers from different feature networks, or from different sample counts, are not comparable: FID is biased upwards
at small N. `pixelate2x` and `add_noise` make the disturbed real sets a benchmark reports beside its generators
(`restoration bench fid`, in `restoration.bench.fid`).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from restoration.checkpoint import LoadedModel, load_named
from restoration.errors import UserError
from restoration.models.classifier import CHANNELS, IMAGE_SIZE, Classifier
from restoration.sources import read_fashion_mnist

DEFAULT_EXTRACTOR = "fmnist-classifier"  # bundled in restoration/weights
GENERATOR_KINDS = ("dcgan", "vae")
TEST_SPLIT_SIZE = 10000  # images in the Fashion-MNIST test split, the most one row can compare against


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


def add_images(metric: FrechetInceptionDistance, images: Tensor, real: bool, batch_size: int) -> None:
    """Feed `images` to the real or the generated side of `metric`, `batch_size` at a time."""
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
    add_images(metric, real, True, batch_size)
    add_images(metric, fake, False, batch_size)
    return float(metric.compute())


def inception_metric(weights_path: str) -> FrechetInceptionDistance:
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


def to_rgb_uint8(images: Tensor) -> Tensor:
    """(N, 1, H, W) float in [0, 1] -> (N, 3, H, W) uint8, what the Inception network takes (it resizes to 299)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


# --- Generators ---------------------------------------------------------------------------------------------------


def check_generator(loaded: LoadedModel, name: str) -> LoadedModel:
    """Refuse a model file that is not a generator of 1-channel 28x28 images."""
    if loaded.kind not in GENERATOR_KINDS:
        raise UserError(f"{name} is a {loaded.kind} model: expected one of {', '.join(GENERATOR_KINDS)}")
    config = loaded.config
    if (config.channels, config.image_size) != (CHANNELS, IMAGE_SIZE):
        raise UserError(
            f"{name} makes {config.channels}-channel {config.image_size}x{config.image_size} images: "
            f"expected {CHANNELS}-channel {IMAGE_SIZE}x{IMAGE_SIZE} (Fashion-MNIST)"
        )
    return loaded


def latent_source(loaded: LoadedModel) -> str:
    """Where a generator's latents come from, for the tables."""
    k = getattr(loaded.config, "prior_components", 0)
    if k and class_names(loaded):  # a conditional VAE: one mixture per class
        return f"a {k}-component mixture per class fitted to q(z|x, y)"
    return f"a {k}-component mixture fitted to q(z)" if k else "N(0, I)"


def class_names(loaded: LoadedModel) -> tuple[str, ...]:
    """The class names of a class-conditional generator (index = class id); empty for an unconditional one."""
    return tuple(getattr(loaded.config, "labels", ()))


def sample_images(
    loaded: LoadedModel, n: int, seed: int, batch_size: int, name: str, labels: Tensor | None = None
) -> Tensor:
    """`generate` for a model file already loaded (`name` is what errors call it); a class-conditional generator
    makes image i of class `labels[i]` ((n,) int64, required for it, refused for an unconditional one)."""
    check_generator(loaded, name)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or batch_size < 1:
        raise UserError(f"n={n!r}, batch_size={batch_size!r}: expected ints >= 1")
    if bool(class_names(loaded)) != (labels is not None):
        raise UserError(f"{name}: class labels are needed for a class-conditional generator and only for one")
    if labels is not None and labels.shape != (n,):
        raise UserError(f"{name}: expected {n} class labels, got shape {tuple(labels.shape)}")
    module = loaded.module.eval()
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    with torch.no_grad():
        for first in range(0, n, batch_size):
            # Both sample APIs return images in [0, 1]: DCGAN maps its tanh output by (x + 1) / 2, the VAE decodes
            # the Bernoulli mean sigmoid(logits). No truncation; the VAE draws from its sampling prior.
            k = min(batch_size, n - first)
            asked = {} if labels is None else {"labels": labels[first : first + k]}
            chunks.append(module.sample(k, generator=generator, **asked).float().cpu())
    return torch.cat(chunks).clamp(0, 1)  # (n, 1, 28, 28)


@torch.no_grad()
def classify(images: Tensor, extractor: FeatureExtractor) -> Tensor:
    """The classes the extractor's classifier gives (N, 1, 28, 28) images in [0, 1]: (N,) int64."""
    classifier = extractor.classifier.eval()
    device = next(classifier.parameters()).device
    chunks = [
        classifier(images[i : i + extractor.batch_size].to(device)).argmax(1).cpu()
        for i in range(0, images.shape[0], extractor.batch_size)
    ]
    return torch.cat(chunks)


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
    return sample_images(load_named(model_name_or_path), n, seed, batch_size, model_name_or_path)
