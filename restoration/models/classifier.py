"""A small CNN classifier for 28x28 gray images, whose penultimate layer is the feature space of our FID.

FID (M. Heusel, H. Ramsauer, T. Unterthiner, B. Nessler, S. Hochreiter, "GANs Trained by a Two Time-Scale Update
Rule Converge to a Local Nash Equilibrium", NeurIPS 2017) compares Gaussian fits of network features of real and
generated images. The usual network is Inception v3 trained on ImageNet; for 28x28 gray Fashion-MNIST a classifier
trained on the dataset itself is the common substitute (as the "FID on MNIST" of many GAN papers): its features
separate the ten garment classes, so a generator that misses classes or makes ambiguous garments is penalised.

The net is VGG-style (K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015): 3x3 convolutions with BatchNorm (S. Ioffe, C. Szegedy, ICML 2015) and ReLU, 2x2 max
pooling, then one hidden fully connected layer (the features) and dropout (N. Srivastava et al., JMLR 2014):

    x (B, 1, 28, 28) -> conv (B, w0, 28, 28) -> pool (B, w0, 14, 14)
                     -> conv (B, w1, 14, 14) -> pool (B, w1, 7, 7)
                     -> conv (B, w2, 7, 7)   -> pool (B, w2, 3, 3)
                     -> flatten (B, 9 w2) -> linear + ReLU: features (B, D) -> dropout -> linear: logits (B, classes)

In eval mode BatchNorm uses its running statistics, so an image's features do not depend on the rest of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

IMAGE_SIZE = 28  # Fashion-MNIST / MNIST
CHANNELS = 1


@dataclass(frozen=True)
class ClassifierConfig:
    widths: tuple[int, ...] = (32, 64, 64)  # channels of each conv stage; each stage halves H and W
    feature_dim: int = 128  # D: size of the penultimate layer, the FID embedding
    num_classes: int = 10
    dropout: float = 0.3  # between the features and the logits, training only

    def __post_init__(self) -> None:
        # A JSON round trip (model files store the config as JSON) turns the tuple into a list.
        object.__setattr__(self, "widths", tuple(self.widths))
        if not 1 <= len(self.widths) <= 4:
            raise ValueError(
                f"ClassifierConfig.widths={self.widths!r}: expected 1 to 4 stages (28 -> 14 -> 7 -> 3 -> 1)"
            )
        for w in self.widths:
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                raise ValueError(f"ClassifierConfig.widths={self.widths!r}: expected ints >= 1")
        for name in ("feature_dim", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClassifierConfig.{name}={value!r}: expected an int >= 1")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ValueError(f"ClassifierConfig.dropout={self.dropout!r}: expected a number in [0, 1)")


def final_side(stages: int, side: int = IMAGE_SIZE) -> int:
    """Side of the feature map after `stages` 2x2 max pools (floor division: 28 -> 14 -> 7 -> 3 -> 1)."""
    for _ in range(stages):
        side //= 2
    return side


class ConvStage(nn.Module):
    """Conv 3x3 (same padding, no bias: BatchNorm follows) + BatchNorm + ReLU + 2x2 max pool: (B, Cin, H, W) ->
    (B, Cout, H // 2, W // 2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


class Classifier(nn.Module):
    """(B, 1, 28, 28) images in [0, 1] -> (B, num_classes) logits; `features` gives the (B, feature_dim) embedding."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise TypeError(f"Classifier expects a ClassifierConfig, got {type(config).__name__}")
        self.config = config
        widths = (CHANNELS, *config.widths)
        self.stages = nn.Sequential(*[ConvStage(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        side = final_side(len(config.widths))
        self.fc = nn.Linear(config.widths[-1] * side * side, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations, the FID embedding.

        Args:
            x: (B, 1, 28, 28) float images in [0, 1].
        Returns:
            (B, feature_dim) non-negative features (after the ReLU, before dropout).
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != (CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"Classifier expects images of shape (B, {CHANNELS}, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(x.shape)}"
            )
        h = self.stages(x)  # (B, widths[-1], side, side)
        return torch.relu(self.fc(h.flatten(1)))  # (B, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, num_classes)
