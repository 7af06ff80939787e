"""Residual CNN restorers: DnCNN, a faster FFDNet-style variant and a U-Net.

DnCNN: K. Zhang, W. Zuo, Y. Chen, D. Meng, L. Zhang, "Beyond a Gaussian Denoiser: Residual Learning of Deep CNN for
Image Denoising", IEEE Transactions on Image Processing 26(7), 2017. A plain stack of `depth` 3x3 convolutions
(Conv+ReLU, (depth-2) x Conv+BN+ReLU, Conv) predicts the residual v (the noise), and the restored image is x - v.

FFDNet: K. Zhang, W. Zuo, L. Zhang, "FFDNet: Toward a Fast and Flexible Solution for CNN-Based Image Denoising",
IEEE Transactions on Image Processing 27(9), 2018. The image is pixel-unshuffled into 4C channels at half resolution,
the same conv stack runs there (4x fewer positions per layer, about twice the receptive field), and the output is
pixel-shuffled back. Two departures from the paper, both deliberate: the noise-level-map input is left out (the model
is blind, like DnCNN-B), and the network predicts the residual like DnCNN instead of the clean image.

U-Net: a multi-scale body in the manner of DRUNet (K. Zhang, Y. Li, W. Zuo, L. Zhang, L. Van Gool, R. Timofte,
"Plug-and-Play Image Restoration with Deep Denoiser Prior", IEEE TPAMI 44(10), 2022): `depth` levels, the width
doubling at each level; residual blocks, strided 2x2 convolutions down, transposed 2x2 convolutions up and additive
skip connections. Its receptive field grows with 2^levels instead of with the layer count, which matters for strong
noise and for JPEG blocks. Again blind (no noise-level map) and predicting the residual.

All three are fully convolutional, so any H, W works, and translation-equivariant (on their `downscale` grid) up to
their receptive field radius (`Restorer.receptive_radius`), which is what makes exact tiled inference possible (see
`restoration.tiling`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHS = ("dncnn", "fast", "unet")
UNET_LEVELS = (2, 6)  # fewest and most levels of the "unet" arch


@dataclass(frozen=True)
class RestorerConfig:
    arch: str = "dncnn"  # "dncnn": full resolution; "fast": FFDNet-style body at half resolution; "unet": U-Net
    channels: int = 1  # 1 (gray) or 3 (RGB)
    depth: int = 17  # conv layers (DnCNN-S uses 17, FFDNet 15 gray / 12 colour); for "unet", its levels (2-6)
    width: int = 64  # feature channels of the hidden layers; for "unet", those of the full-resolution level
    batch_norm: bool = True  # BN in the middle layers (DnCNN; in the residual blocks of "unet"); foldable

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"RestorerConfig.arch={self.arch!r}: expected one of {', '.join(ARCHS)}")
        if self.channels not in (1, 3):
            raise ValueError(f"RestorerConfig.channels={self.channels!r}: expected 1 (gray) or 3 (RGB)")
        if self.arch == "unet":
            lo, hi = UNET_LEVELS
            if not isinstance(self.depth, int) or not lo <= self.depth <= hi:
                raise ValueError(f"RestorerConfig.depth={self.depth!r}: expected {lo} to {hi} levels for arch 'unet'")
        elif not isinstance(self.depth, int) or self.depth < 3:
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


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad the bottom/right of (B, C, H, W) with reflected rows/columns up to multiples of `multiple`.

    Args:
        x: (B, C, H, W).
        multiple: the grid size, e.g. 2 for a pixel-unshuffle by 2.
    Returns:
        (B, C, H', W') with H', W' the next multiples; `x` itself when H and W are multiples already.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    # Reflection needs more pixels than it pads along each axis; a short axis is replicated instead.
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def pad_to_even(x: Tensor) -> Tensor:
    """Pad the bottom/right of (B, C, H, W) by one reflected row/column where H/W is odd (see `pad_to_multiple`)."""
    return pad_to_multiple(x, 2)


class ResBlock(nn.Module):
    """x + Conv(ReLU(Conv(x))): two 3x3 `ConvBlock`s (BN optional) around an identity skip."""

    def __init__(self, width: int, batch_norm: bool):
        super().__init__()
        self.first = ConvBlock(width, width, batch_norm=batch_norm, relu=True)
        self.second = ConvBlock(width, width, batch_norm=batch_norm, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.second(self.first(x))


class UNetBody(nn.Module):
    """The "unet" body: in_channels -> out_channels at the same resolution, through `levels` scales.

    head 3x3 conv -> per level: residual block, 2x2 stride-2 conv down (width doubles) -> residual block at the
    bottom -> per level back up: 2x2 stride-2 transposed conv, + the skip of that level, residual block -> tail 3x3
    conv. H and W must be multiples of 2^(levels-1) (`Restorer` pads to them).
    """

    def __init__(self, in_channels: int, out_channels: int, levels: int, width: int, batch_norm: bool):
        super().__init__()
        widths = [width * 2**level for level in range(levels)]
        self.head = nn.Conv2d(in_channels, width, 3, padding=1)
        self.encoders = nn.ModuleList(ResBlock(w, batch_norm) for w in widths[:-1])
        self.downs = nn.ModuleList(nn.Conv2d(w, 2 * w, 2, stride=2) for w in widths[:-1])
        self.bottom = ResBlock(widths[-1], batch_norm)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(2 * w, w, 2, stride=2) for w in widths[:-1])
        self.decoders = nn.ModuleList(ResBlock(w, batch_norm) for w in widths[:-1])
        self.tail = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(x)
        skips = []
        for encode, down in zip(self.encoders, self.downs, strict=True):
            x = encode(x)
            skips.append(x)
            x = down(x)
        x = self.bottom(x)
        for up, decode, skip in zip(reversed(self.ups), reversed(self.decoders), reversed(skips), strict=True):
            x = decode(up(x) + skip)
        return self.tail(x)

    @staticmethod
    def receptive_radius(levels: int) -> int:
        """An upper bound of the one-sided receptive field in input pixels.

        A 3x3 conv at level l reaches 2^l pixels further; so, at most, do a 2x2 stride-2 conv down from level l and a
        transposed conv up to it. Head and tail: 1 each; level l < levels-1: 2 + 1 convs down and 1 + 2 up; the
        bottom: 2. Total 2 + 6 (2^(levels-1) - 1) + 2^levels = 2^(levels+2) - 4.
        """
        return 2 ** (levels + 2) - 4


class Restorer(nn.Module):
    """Residual restorer: restored = x - body(x), the body at full ("dncnn") or half ("fast") resolution, or a U-Net."""

    def __init__(self, config: RestorerConfig):
        super().__init__()
        if not isinstance(config, RestorerConfig):
            raise TypeError(f"Restorer expects a RestorerConfig, got {type(config).__name__}")
        self.config = config
        c = config.channels
        if config.arch == "dncnn":
            self.body = conv_stack(c, c, config.depth, config.width, config.batch_norm)
        elif config.arch == "fast":
            # Pixel-unshuffle by 2 puts each 2x2 block into channels: C -> 4C, and back on the way out.
            self.body = conv_stack(4 * c, 4 * c, config.depth, config.width, config.batch_norm)
        else:
            self.body = UNetBody(c, c, config.depth, config.width, config.batch_norm)
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. 2015 init keeps activation variance through the ReLU stack; the last conv is scaled down so the
        # untrained model starts close to the identity (residual ~ 0), which Adam trains away from quickly. So is the
        # last conv of every residual block, which then starts close to the identity too.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.last_conv.weight.mul_(0.1)
            for m in self.modules():
                if isinstance(m, ResBlock):
                    m.second.conv.weight.mul_(0.1)

    @property
    def last_conv(self) -> nn.Conv2d:
        """The conv that outputs the predicted residual."""
        return self.body.tail if self.config.arch == "unet" else self.body[-1].conv

    @property
    def downscale(self) -> int:
        """Grid of the body (1, 2, or 2^(levels-1) for "unet"); tiles must start on it for exact tiled inference."""
        if self.config.arch == "unet":
            return 2 ** (self.config.depth - 1)
        return 1 if self.config.arch == "dncnn" else 2

    @property
    def receptive_radius(self) -> int:
        """Pixels of context on each side that one output pixel depends on (`depth` 3x3 convs, each adding 1).

        For "fast", `depth` half-resolution pixels cover 2*depth full-resolution ones, plus 1 for the position of a
        pixel inside its 2x2 block. For "unet", an upper bound (`UNetBody.receptive_radius`).
        """
        d = self.config.depth
        if self.config.arch == "unet":
            return UNetBody.receptive_radius(d)
        return d if self.config.arch == "dncnn" else 2 * d + 1

    def forward(self, x: Tensor) -> Tensor:
        c = self.config.channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"Restorer expects input of shape (B, {c}, H, W), got {tuple(x.shape)}")
        if self.config.arch == "dncnn":
            return x - self.body(x)  # (B, C, H, W)
        h, w = x.shape[-2:]
        if self.config.arch == "unet":
            return x - self.body(pad_to_multiple(x, self.downscale))[..., :h, :w]  # (B, C, H, W)
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
        for block in self.modules():
            if isinstance(block, ConvBlock):
                block.fold_batch_norm()
        self.config = dataclasses.replace(self.config, batch_norm=False)
        return self
