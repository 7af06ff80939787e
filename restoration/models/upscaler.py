"""A compact super-resolution net: a conv body on the low-resolution image, a pixel-shuffle tail, a global skip.

ESPCN: W. Shi, J. Caballero, F. Huszár, J. Totz, A. P. Aitken, R. Bishop, D. Rueckert, Z. Wang, "Real-Time Single
Image and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network", CVPR 2016. Every layer
runs at the low resolution and the last one predicts `scale`^2 * C channels that the pixel shuffle ("sub-pixel
convolution") rearranges into the high-resolution image, so a layer costs 1/scale^2 of what it would cost on the
upsampled image (SRCNN, VDSR).

VDSR: J. Kim, J. K. Lee, K. M. Lee, "Accurate Image Super-Resolution Using Very Deep Convolutional Networks",
CVPR 2016. A deeper plain 3x3 stack learning only the residual between the bicubic upsampling and the original; here
the residual is added to a bilinear upsampling of the input computed inside the net (the global skip), so the body
starts from a sensible image and learns the high frequencies.

Fully convolutional, so any H, W works; translation-equivariant on the low-resolution grid up to `receptive_radius`
input pixels, which is what makes tiled inference exact (see `restoration.tiling`): a tile with that much context on
every side gives the same output pixels as the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

SCALES = (2, 3, 4)


@dataclass(frozen=True)
class UpscalerConfig:
    scale: int = 2  # output size / input size: 2, 3 or 4
    channels: int = 1  # 1 (gray, or the Y channel of colour images) or 3 (RGB)
    width: int = 48  # feature channels of the body
    depth: int = 8  # 3x3 conv layers at low resolution, the head and the tail included (>= 2)

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"UpscalerConfig.scale={self.scale!r}: expected one of {', '.join(map(str, SCALES))}")
        if self.channels not in (1, 3):
            raise ValueError(f"UpscalerConfig.channels={self.channels!r}: expected 1 (gray) or 3 (RGB)")
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"UpscalerConfig.width={self.width!r}: expected an int >= 1")
        if not isinstance(self.depth, int) or self.depth < 2:
            raise ValueError(f"UpscalerConfig.depth={self.depth!r}: expected an int >= 2 (head and tail)")


class Upscaler(nn.Module):
    """(B, C, H, W) in [0, 1] -> (B, C, scale*H, scale*W): bilinear upsampling + the body's pixel-shuffled residual."""

    def __init__(self, config: UpscalerConfig):
        super().__init__()
        self.config = config
        self.scale = config.scale
        c, w, s = config.channels, config.width, config.scale
        layers: list[nn.Module] = [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(config.depth - 2):
            layers += [nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.tail = nn.Conv2d(w, c * s * s, 3, padding=1)  # the only layer whose shape depends on the scale
        self.shuffle = nn.PixelShuffle(s)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.tail.weight, std=1e-3)  # start as the plain bilinear upsampling

    @property
    def receptive_radius(self) -> int:
        """Input pixels of context each output pixel depends on: one per 3x3 conv; the bilinear skip needs one."""
        return max(self.config.depth, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.channels:
            raise ValueError(f"expected (B, {self.config.channels}, H, W), got {tuple(x.shape)}")
        base = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)  # (B, C, sH, sW)
        residual = self.shuffle(self.tail(self.body(x)))  # (B, C*s*s, H, W) -> (B, C, sH, sW)
        return base + residual
