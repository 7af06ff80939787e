"""The images a quality run measures on: a folder, Set12 (gray) or the colour sample photos, cropped and limited."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from restoration import samples, sources
from restoration.bench.quality.config import QualityConfig
from restoration.errors import UserError


def _read(path: Path, channels: int) -> np.ndarray:
    with Image.open(path) as image:
        return sources.image_to_float(image, channels)


def _read_folder(folder: Path, channels: int, limit: int | None) -> tuple[list[str], list[np.ndarray]]:
    """The first `limit` image files under `folder` in `sources.image_paths` order, named by relative path."""
    paths = sources.image_paths(folder)[:limit]
    return [p.relative_to(folder).as_posix() for p in paths], [_read(p, channels) for p in paths]


def _from_arrays(arrays: tuple[np.ndarray, ...], channels: int, color: bool) -> list[np.ndarray]:
    images = []
    for i, image in enumerate(arrays):
        a = np.asarray(image)
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3 or a.shape[2] != channels or not np.issubdtype(a.dtype, np.floating):
            raise UserError(
                f"images[{i}] has shape {np.asarray(image).shape} and dtype {a.dtype}: expected float "
                f"(H, W, {channels}) in [0, 1] for {'colour' if color else 'gray'} mode"
            )
        images.append(a.astype(np.float32))
    return images


def load_benchmark_images(config: QualityConfig) -> tuple[str, list[str], list[np.ndarray]]:
    """The images a run uses, cropped and limited.

    Args:
        config: the run's config.
    Returns:
        (description of the image set, names, float32 (H, W, C) images in [0, 1]).
    """
    channels = 3 if config.color else 1
    gray_folder = sources.datasets_dir(config.datasets) / "Set12"
    if isinstance(config.images, tuple):
        images = _from_arrays(config.images, channels, config.color)
        names = [f"array-{i}" for i in range(len(images))]
        description = f"{len(images)} arrays given by the caller"
    elif config.images is not None:
        folder = Path(config.images)
        if not folder.is_dir():
            raise UserError(f"images folder {str(folder)!r} does not exist: expected a folder of images")
        names, images = _read_folder(folder, channels, config.limit)
        description = f"folder {folder}"
    elif config.color:
        names = list(samples.COLOR_PHOTOS)
        images = [_read(samples.sample_photo(n), 3) for n in names]
        description = "colour sample photos from scikit-image and scikit-learn (" + ", ".join(names) + ")"
    elif gray_folder.is_dir():
        names, images = _read_folder(gray_folder, 1, config.limit)
        description = f"Set12 ({gray_folder})"
    else:
        names = list(samples.GRAY_PHOTOS)
        images = [_read(samples.sample_photo(n), 1) for n in names]
        description = f"gray sample photos ({', '.join(names)}): Set12 not found at {gray_folder}"
    if not images:
        raise UserError(f"no images in {description}: expected at least one")
    names, images = names[: config.limit], images[: config.limit]
    if config.crop is not None:
        images = [center_crop(a, config.crop) for a in images]
        description += f", central {config.crop}x{config.crop} crops"
    return description, names, images


def center_crop(image: np.ndarray, side: int) -> np.ndarray:
    """The central `side` x `side` window of an (H, W, C) image (all of a side shorter than that)."""
    h, w = image.shape[:2]
    ch, cw = min(side, h), min(side, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(image[top : top + ch, left : left + cw])
