"""Blind damage repair: find thin scratches, dust and spots with no mask given, and fill only what was found.

Two stages, as old-photo restoration does it (Z. Wan et al., "Bringing Old Photos Back to Life", CVPR 2020: a
scratch detector, then a fill of what it marks):

1. A **detector**: a small fully convolutional net (3x3 convolutions, dilations growing then shrinking for about 12
   pixels of context each side) giving a per-pixel logit that the pixel is damaged. It is trained with binary
   cross-entropy against the mask the degradation recorded (`degrade.apply_masked`). The mask is the logit above
   `logit_threshold`, grown by `grow` pixels (a 3x3 max filter per pixel): a border pixel missed costs far more PSNR
   than a clean one filled from its neighbours.
2. A **fill**: the masked inpainter (`restoration.models.inpainter`: push-pull fill refined by a small U-Net) on the
   image with the found mask as its holes.

The output is the input outside the found mask, exactly, and the fill inside it: an image where nothing is found comes
back as it went in. `forward(x)` returns (B, C + 1, H, W): the repaired image and the found mask (1 = repaired) as
its last channel, so that tiling and the dihedral ensemble treat both alike; `forward(x, damage)` is the training form
(see there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoration.models.inpainter import Inpainter, InpainterConfig

DILATIONS = (1, 2, 4, 2, 1, 1, 1, 1)  # the detector's 3x3 convolutions, in order (the first `detector_depth`)


@dataclass(frozen=True)
class RepairerConfig:
    channels: int = 1  # 1 gray, 3 RGB
    detector_width: int = 16  # feature channels of the detector
    detector_depth: int = 5  # 3x3 convolutions before the 1x1 logit (dilations: DILATIONS)
    fill_width: int = 12  # the fill's InpainterConfig
    fill_levels: int = 2
    fill_bottleneck: int = 1
    logit_threshold: float = 0.0  # a pixel is damaged where the detector's logit is above this (0: probability 1/2)
    grow: int = 1  # pixels the found mask is grown by before the fill

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"RepairerConfig.channels={self.channels!r}: expected 1 (gray) or 3 (RGB)")
        if not isinstance(self.detector_width, int) or self.detector_width < 4:
            raise ValueError(f"RepairerConfig.detector_width={self.detector_width!r}: expected an int >= 4")
        if not isinstance(self.detector_depth, int) or not 1 <= self.detector_depth <= len(DILATIONS):
            raise ValueError(
                f"RepairerConfig.detector_depth={self.detector_depth!r}: expected an int in 1..{len(DILATIONS)}"
            )
        if not isinstance(self.grow, int) or not 0 <= self.grow <= 4:
            raise ValueError(f"RepairerConfig.grow={self.grow!r}: expected an int in 0..4")
        self.fill_config()  # the fill's own checks

    def fill_config(self) -> InpainterConfig:
        return InpainterConfig(self.channels, self.fill_width, self.fill_levels, self.fill_bottleneck)


def grow_mask(mask: Tensor, pixels: int) -> Tensor:
    """(B, 1, H, W) 0/1 mask grown by `pixels` (a (2 pixels + 1)^2 max filter)."""
    return F.max_pool2d(mask, 2 * pixels + 1, stride=1, padding=pixels) if pixels else mask


class Detector(nn.Module):
    """(B, C, H, W) image -> (B, 1, H, W) logits that each pixel is damaged."""

    def __init__(self, config: RepairerConfig):
        super().__init__()
        layers, cin = [], config.channels
        for dilation in DILATIONS[: config.detector_depth]:
            layers += [nn.Conv2d(cin, config.detector_width, 3, padding=dilation, dilation=dilation)]
            layers += [nn.LeakyReLU(0.2, inplace=True)]
            cin = config.detector_width
        self.body = nn.Sequential(*layers)
        self.logit = nn.Conv2d(cin, 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.logit.weight, std=1e-3)
        # Start sure that nothing is damaged: the untrained net changes nothing.
        nn.init.constant_(self.logit.bias, -4.0)

    @property
    def radius(self) -> int:
        return sum(DILATIONS[: len(self.body) // 2])

    def forward(self, x: Tensor) -> Tensor:
        # Centred input: 0 and 1, the values scratches and spots hold, are then symmetric for the first layer.
        return self.logit(self.body(x - 0.5))


class Repairer(nn.Module):
    """(B, C, H, W) damaged image -> (B, C + 1, H, W): the repaired image and the found mask (1 = repaired)."""

    def __init__(self, config: RepairerConfig):
        super().__init__()
        self.config = config
        self.detector = Detector(config)
        self.fill = Inpainter(config.fill_config())

    @property
    def downscale(self) -> int:
        """The fill's coarsest grid: tiles aligned to it see the same padding as the whole image."""
        return self.fill.downscale

    @property
    def receptive_radius(self) -> int:
        """Context tiles need: the detector's, the mask's growth and then the fill's."""
        return self.detector.radius + self.config.grow + self.fill.receptive_radius

    def find(self, x: Tensor) -> Tensor:
        """The found mask (B, 1, H, W), 1 = damaged, grown by `config.grow`, in x's dtype."""
        found = (self.detector(x) > self.config.logit_threshold).to(x.dtype)
        return grow_mask(found, self.config.grow)

    def forward(self, x: Tensor, damage: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Without `damage`: (B, C + 1, H, W), the repaired image (x outside the found mask) and the mask.

        With `damage` (B, 1, H, W), the damage a training batch really holds: (detector logits (B, 1, H, W), the
        fill's raw prediction (B, C, H, W) for holes at `damage` grown by `config.grow`), for the training loss (a
        keyword of `forward`, so that DDP's wrapper, which only runs `forward`, syncs both stages' gradients).
        """
        c = self.config.channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"expected (B, {c}, H, W) images, got {tuple(x.shape)}")
        if damage is not None:
            holes = grow_mask(damage.to(x.dtype), self.config.grow)
            return self.detector(x), self.fill.predict(torch.cat([x, holes], 1))
        mask = self.find(x)  # (B, 1, H, W)
        filled = self.fill.predict(torch.cat([x, mask], 1))  # (B, C, H, W)
        return torch.cat([x * (1 - mask) + filled * mask, mask], 1)
