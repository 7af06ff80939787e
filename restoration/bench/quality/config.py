"""What one `restoration bench quality` run measures, and what it found."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from restoration.bench.quality.methods import COLOR_METHODS, GRAY_METHODS
from restoration.errors import UserError

DEFAULT_SIGMAS = (15.0, 25.0, 50.0)
MIN_CROP = 16  # SSIM needs 11 px; BM3D's 8x8 blocks need room to search


@dataclass(frozen=True)
class QualityConfig:
    """What one benchmark run measures. `images` is a folder, or (for tests) a sequence of (H, W, C) float arrays."""

    color: bool = False
    images: str | Path | tuple[np.ndarray, ...] | None = None  # None: Set12 (gray) or the 7 colour sample photos
    datasets: str | Path | None = None  # folder holding Set12; None: `sources.datasets_dir()`
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS  # noise levels on the 0-255 scale
    models: tuple[str, ...] | None = None  # bundled names or model files; None: the bundled restorers of the mode
    methods: tuple[str, ...] | None = None  # subset of GRAY_METHODS / COLOR_METHODS; None: all of them
    limit: int | None = None  # first N images
    crop: int | None = None  # central crop side in px
    threads: int | None = None  # None: the CPUs this process may use
    out_dir: str = "bench-output"
    seed: int = 0  # noise seed of image `name` at sigma s: degrade.rng_for(seed, f"{name}/noise:{s}")
    sheet_images: int = 3  # images on the contact sheet
    ensemble: bool = False  # also each model with the 8-orientation self-ensemble (rows "MODEL x8")

    def __post_init__(self) -> None:
        if isinstance(self.images, (list, tuple)):
            object.__setattr__(self, "images", tuple(self.images))
        if not self.sigmas:
            raise UserError("sigmas is empty: expected at least one noise level, e.g. 15,25,50")
        for s in self.sigmas:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 < s <= 255:
                raise UserError(f"sigma {s!r}: expected a number in (0, 255] (0-255 scale)")
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        allowed = COLOR_METHODS if self.color else GRAY_METHODS
        for m in self.methods or ():
            if m not in allowed:
                mode = "colour" if self.color else "gray"
                raise UserError(f"method {m!r}: expected one of {', '.join(allowed)} in {mode} mode")
        for name in ("limit", "threads", "sheet_images"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise UserError(f"{name}={value!r}: expected an integer >= 1")
        if self.crop is not None and (
            isinstance(self.crop, bool) or int(self.crop) != self.crop or self.crop < MIN_CROP
        ):
            raise UserError(f"crop={self.crop!r}: expected an integer >= {MIN_CROP} (px)")


@dataclass
class QualityResult:
    """Rows (means over images, per-image values inside) and what the report needs to describe the run."""

    rows: list[dict]
    image_set: str
    image_names: list[str]
    image_sizes: list[tuple[int, int]]
    threads: int
    device: dict
    notes: list[str]
    config: dict
    wall_seconds: float
    sheet: list[dict] = field(default_factory=list)  # per sheet image: name, clean, panels [(label, image)]
    sheet_sigma: float | None = None
