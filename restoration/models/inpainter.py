"""A small masked inpainter: a parameter-free pyramid fill of the holes, refined by a U-Net that sees the mask.

The input is the image with its mask as one more channel, (B, C + 1, H, W), mask 1 = missing. What the holes hold
is ignored. Two stages:

1. Push-pull fill (S. J. Gortler, R. Grzeszczuk, R. Szeliski, M. F. Cohen, "The Lumigraph", SIGGRAPH 1996; the
   pyramid form of normalised convolution, H. Knutsson and C.-F. Westin, CVPR 1993): the known pixels and their
   weights are averaged down a pyramid to 1 pixel, then every level is filled from the one below where it has no
   data. It has no parameters, costs a few operations per pixel and gives every hole a smooth, plausible start
   whatever its size.
2. A U-Net (O. Ronneberger, P. Fischer, T. Brox, MICCAI 2015) on the filled image and the mask: `levels` stride-2
   stages, dilated convolutions at the bottom for context (F. Yu, V. Koltun, ICLR 2016), and a residual tail that
   starts at zero, so the untrained net is the push-pull fill and training only has to learn texture and edges.
   The mask as an input channel is the plain form of what partial convolutions (G. Liu et al., ECCV 2018) and
   gated convolutions (J. Yu et al., "Free-Form Image Inpainting with Gated Convolution", ICCV 2019) do inside
   every layer; with the push-pull start the plain form learns as fast per CPU-second at this size.

`forward` returns the composite: the prediction inside the mask, the input outside it, exactly; `predict` (or
`forward(x, composite=False)`) the raw prediction everywhere (what the training loss sees). Any H, W works: the net pads to a multiple of 2^levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class InpainterConfig:
    channels: int = 1  # image channels (1 gray, 3 RGB); the net takes one more, the mask
    width: int = 32  # feature channels at full resolution; doubled at the first stage down, then x1.5 per stage
    levels: int = 3  # stride-2 stages (the net works on multiples of 2^levels, padding as needed)
    bottleneck: int = 4  # dilated 3x3 convs at the lowest resolution, dilations 1, 2, 4, 8, 1, 2, ...

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"InpainterConfig.channels={self.channels!r}: expected 1 (gray) or 3 (RGB)")
        if not isinstance(self.width, int) or self.width < 4:
            raise ValueError(f"InpainterConfig.width={self.width!r}: expected an int >= 4")
        if not isinstance(self.levels, int) or not 1 <= self.levels <= 5:
            raise ValueError(f"InpainterConfig.levels={self.levels!r}: expected an int in 1..5")
        if not isinstance(self.bottleneck, int) or self.bottleneck < 0:
            raise ValueError(f"InpainterConfig.bottleneck={self.bottleneck!r}: expected an int >= 0")

    def widths(self) -> list[int]:
        """Feature channels at each resolution, full first: w, 2w, 3w, 4.5w, ... (rounded to multiples of 8)."""
        out = [self.width]
        for level in range(1, self.levels + 1):
            out.append(int(round(self.width * 2 * 1.5 ** (level - 1) / 8)) * 8 or 8)
        return out


def push_pull(image: Tensor, known: Tensor) -> Tensor:
    """Fill the unknown pixels of `image` from the known ones by a push-pull pyramid.

    Args:
        image: (B, C, H, W); values where `known` is 0 are ignored.
        known: (B, 1, H, W), 1 where a pixel is known, 0 where it is missing (fractions act as weights).
    Returns:
        (B, C, H, W): `image` where known, the pyramid's estimate elsewhere (0 where nothing at all is known).
    """
    values, weights = [image * known], [known]
    while max(values[-1].shape[-2:]) > 1:  # push: weighted averages down to one pixel
        values.append(F.avg_pool2d(values[-1], 2, ceil_mode=True))
        weights.append(F.avg_pool2d(weights[-1], 2, ceil_mode=True))
    fill = values[-1] / weights[-1].clamp_min(1e-8)
    for v, w in zip(reversed(values[:-1]), reversed(weights[:-1]), strict=True):  # pull: fill each level from below
        up = F.interpolate(fill, size=v.shape[-2:], mode="bilinear", align_corners=False)
        confidence = w.clamp(0, 1)
        fill = v / w.clamp_min(1e-8) * confidence + up * (1 - confidence)
    return fill


def _conv(cin: int, cout: int, dilation: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation), nn.LeakyReLU(0.2, inplace=True)
    )


class Inpainter(nn.Module):
    """(B, C + 1, H, W) image + mask (1 = missing) -> (B, C, H, W) with the holes filled and the rest kept."""

    def __init__(self, config: InpainterConfig):
        super().__init__()
        self.config = config
        c, widths = config.channels, config.widths()
        self.head = nn.Sequential(_conv(c + 1, widths[0]), _conv(widths[0], widths[0]))
        self.down = nn.ModuleList(
            nn.Sequential(_conv(widths[i], widths[i + 1], stride=2), _conv(widths[i + 1], widths[i + 1]))
            for i in range(config.levels)
        )
        self.bottom = nn.Sequential(*(_conv(widths[-1], widths[-1], 2 ** (i % 4)) for i in range(config.bottleneck)))
        # Up: upsample the deeper features, 1x1 to this level's width, add the skip, two 3x3 convs.
        self.lateral = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 1) for i in range(config.levels))
        self.up = nn.ModuleList(
            nn.Sequential(_conv(widths[i], widths[i]), _conv(widths[i], widths[i])) for i in range(config.levels)
        )
        self.tail = nn.Conv2d(widths[0], c, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init for leaky ReLU: PyTorch's default shrinks activations ~0.6x a layer, and over this many
                # layers the features (and the gradients) all but vanish.
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.tail.weight)  # start as the push-pull fill

    @property
    def downscale(self) -> int:
        """The net's coarsest grid: tiles aligned to it see the same padding as the whole image."""
        return 2**self.config.levels

    @property
    def receptive_radius(self) -> int:
        """Context, in pixels, that tiles get beyond what they keep: the convolutions' reach at full resolution
        (the push-pull fill reaches further, but only into holes wider than this)."""
        return 64

    def predict(self, x: Tensor) -> Tensor:
        """The raw prediction (B, C, H, W) for every pixel, known ones included (the training loss weighs both)."""
        c = self.config.channels
        if x.ndim != 4 or x.shape[1] != c + 1:
            raise ValueError(f"expected (B, {c + 1}, H, W) image + mask, got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = self.downscale
        x = F.pad(x, (0, -w % m, 0, -h % m), mode="replicate")  # (B, C+1, H', W'), multiples of 2^levels
        missing = (x[:, c:] > 0.5).to(x.dtype)  # (B, 1, H', W')
        coarse = push_pull(x[:, :c], 1 - missing)  # (B, C, H', W')
        skips, f = [], self.head(torch.cat([coarse, missing], 1))  # (B, w0, H', W')
        for down in self.down:
            skips.append(f)
            f = down(f)  # (B, w_{i+1}, H'/2^(i+1), ...)
        f = self.bottom(f)
        for i in reversed(range(self.config.levels)):
            f = F.interpolate(self.lateral[i](f), size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
            f = self.up[i](f + skips[i])  # (B, w_i, ...)
        return (coarse + self.tail(f))[..., :h, :w]

    def forward(self, x: Tensor, composite: bool = True) -> Tensor:
        """The composite (prediction in the holes, `x` elsewhere), or with `composite=False` the raw prediction
        (`predict`; a keyword so that DDP's wrapper, which only runs `forward`, can pass it)."""
        if not composite:
            return self.predict(x)
        c = self.config.channels
        missing = (x[:, c:] > 0.5).to(x.dtype)  # (B, 1, H, W)
        return x[:, :c] * (1 - missing) + self.predict(x) * missing
