"""Residual CNN restorers: DnCNN and a faster FFDNet-style variant.

DnCNN: K. Zhang, W. Zuo, Y. Chen, D. Meng, L. Zhang, "Beyond a Gaussian Denoiser: Residual Learning of Deep CNN for
Image Denoising", IEEE Transactions on Image Processing 26(7), 2017. A plain stack of `depth` 3x3 convolutions
(Conv+ReLU, (depth-2) x Conv+BN+ReLU, Conv) predicts the residual v (the noise), and the restored image is x - v.

FFDNet: K. Zhang, W. Zuo, L. Zhang, "FFDNet: Toward a Fast and Flexible Solution for CNN-Based Image Denoising",
IEEE Transactions on Image Processing 27(9), 2018. The image is pixel-unshuffled into 4C channels at half resolution,
the same conv stack runs there (4x fewer positions per layer, about twice the receptive field), and the output is
pixel-shuffled back. Two departures from the paper, both deliberate: the noise-level-map input is left out (the model
is blind, like DnCNN-B), and the network predicts the residual like DnCNN instead of the clean image.

Both are fully convolutional, so any H, W works, and translation-equivariant up to their receptive field radius
(`Restorer.receptive_radius`), which is what makes exact tiled inference possible (see `restoration.tiling`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHS = ("dncnn", "fast")


@dataclass(frozen=True)
class RestorerConfig:
    arch: str = "dncnn"  # "dncnn": full resolution; "fast": FFDNet-style body at half resolution
    channels: int = 1  # 1 (gray) or 3 (RGB)
    depth: int = 17  # number of conv layers; DnCNN-S uses 17, FFDNet 15 (gray) / 12 (colour)
    width: int = 64  # feature channels of the hidden layers
    batch_norm: bool = True  # BN in the middle layers (DnCNN); foldable into the convs for inference

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"RestorerConfig.arch={self.arch!r}: expected one of {', '.join(ARCHS)}")
        if self.channels not in (1, 3):
            raise ValueError(f"RestorerConfig.channels={self.channels!r}: expected 1 (gray) or 3 (RGB)")
        if not isinstance(self.depth, int) or self.depth < 3:
            raise ValueError(f"RestorerConfig.depth={self.depth!r}: expected an int >= 3 (first, middle, last layer)")
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"RestorerConfig.width={self.width!r}: expected an int >= 1")
        if not isinstance(self.batch_norm, bool):
            raise ValueError(f"RestorerConfig.batch_norm={self.batch_norm!r}: expected a bool")


class ConvBlock(nn.Module):
    """3x3 conv (stride 1, zero padding 1), optional BatchNorm, optional ReLU: DnCNN's only layer type."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool, relu: bool):
        super().__init__()
        # A bias directly before BN is redundant (BN subtracts the mean), so BN layers get a bias-free conv.
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x

    @torch.no_grad()
    def fold_batch_norm(self) -> None:
        """Fold an eval-mode BN into the conv: BN(W*x + b) = (s W)*x + s (b - mean) + beta, s = gamma / sqrt(var + eps)."""
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):
            return
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (out,)
        bias = self.conv.bias if self.conv.bias is not None else torch.zeros_like(bn.running_mean)
        self.conv.weight.mul_(scale.view(-1, 1, 1, 1))  # (out, in, 3, 3)
        self.conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * scale)
        self.bn = nn.Identity()


def conv_stack(in_channels: int, out_channels: int, depth: int, width: int, batch_norm: bool) -> nn.Sequential:
    """DnCNN body: Conv+ReLU, (depth-2) x Conv+BN+ReLU, Conv.

    Args:
        in_channels: channels of the input; out_channels: channels of the predicted residual.
        depth: number of conv layers (>= 3); width: hidden channels; batch_norm: BN in the middle layers.
    Returns:
        An `nn.Sequential` of `depth` `ConvBlock`s.
    """
    blocks = [ConvBlock(in_channels, width, batch_norm=False, relu=True)]
    blocks += [ConvBlock(width, width, batch_norm=batch_norm, relu=True) for _ in range(depth - 2)]
    blocks.append(ConvBlock(width, out_channels, batch_norm=False, relu=False))
    return nn.Sequential(*blocks)


def pad_to_even(x: Tensor) -> Tensor:
    """Pad the bottom/right of (B, C, H, W) by one reflected row/column where H/W is odd.

    Args:
        x: (B, C, H, W).
    Returns:
        (B, C, H + H % 2, W + W % 2); `x` itself when both are even.
    """
    h, w = x.shape[-2:]
    if h % 2 == 0 and w % 2 == 0:
        return x
    # Reflection needs at least 2 pixels along the padded axis; a 1-pixel-wide image can only be replicated.
    mode = "reflect" if min(h, w) > 1 else "replicate"
    return F.pad(x, (0, w % 2, 0, h % 2), mode=mode)


class Restorer(nn.Module):
    """Residual restorer: restored = x - body(x), with the body at full ("dncnn") or half ("fast") resolution."""

    def __init__(self, config: RestorerConfig):
        super().__init__()
        if not isinstance(config, RestorerConfig):
            raise TypeError(f"Restorer expects a RestorerConfig, got {type(config).__name__}")
        self.config = config
        c = config.channels
        if config.arch == "dncnn":
            self.body = conv_stack(c, c, config.depth, config.width, config.batch_norm)
        else:
            # Pixel-unshuffle by 2 puts each 2x2 block into channels: C -> 4C, and back on the way out.
            self.body = conv_stack(4 * c, 4 * c, config.depth, config.width, config.batch_norm)
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. 2015 init keeps activation variance through the ReLU stack; the last conv is scaled down so the
        # untrained model starts close to the identity (residual ~ 0), which Adam trains away from quickly.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.body[-1].conv.weight.mul_(0.1)

    @property
    def downscale(self) -> int:
        """Resolution factor of the body (1 or 2); tiles must start at multiples of it for exact tiled inference."""
        return 1 if self.config.arch == "dncnn" else 2

    @property
    def receptive_radius(self) -> int:
        """Pixels of context on each side that one output pixel depends on (`depth` 3x3 convs, each adding 1).

        For "fast", `depth` half-resolution pixels cover 2*depth full-resolution ones, plus 1 for the position of a
        pixel inside its 2x2 block.
        """
        d = self.config.depth
        return d if self.config.arch == "dncnn" else 2 * d + 1

    def forward(self, x: Tensor) -> Tensor:
        c = self.config.channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"Restorer expects input of shape (B, {c}, H, W), got {tuple(x.shape)}")
        if self.config.arch == "dncnn":
            return x - self.body(x)  # (B, C, H, W)
        h, w = x.shape[-2:]
        z = F.pixel_unshuffle(pad_to_even(x), 2)  # (B, 4C, ceil(H/2), ceil(W/2))
        residual = F.pixel_shuffle(self.body(z), 2)  # (B, C, H + H % 2, W + W % 2)
        return x - residual[..., :h, :w]  # (B, C, H, W)

    @torch.no_grad()
    def fold_batch_norm(self) -> Restorer:
        """Fold every BatchNorm into the conv before it, using the running statistics (eval-mode behaviour).

        The folded model computes what the eval-mode model computed (to float rounding), in train and eval mode
        alike, and is structurally a `batch_norm=False` restorer: `self.config` is updated to say so, so that
        `save_model(kind, model.config, model)` writes a file that loads back.

        Returns:
            self, modified in place.
        """
        for block in self.body:
            block.fold_batch_norm()
        self.config = dataclasses.replace(self.config, batch_norm=False)
        return self


def build(config: RestorerConfig) -> Restorer:
    """Build a restorer on CPU in float32.

    Args:
        config: the architecture.
    Returns:
        A freshly initialised `Restorer` in training mode.
    """
    return Restorer(config)
