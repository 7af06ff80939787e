"""Training images and random patches for the restorer.

Patch-based training with the eight dihedral augmentations (four 90° rotations, each with or without a flip)
follows DnCNN: K. Zhang, W. Zuo, Y. Chen, D. Meng, L. Zhang, "Beyond a Gaussian Denoiser: Residual Learning of
Deep CNN for Image Denoising", IEEE TIP 2017 (arXiv:1608.03981).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Lower-case suffixes read by `load_images`.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _to_array(image: Image.Image, channels: int) -> np.ndarray:
    """One decoded image -> float32 (H, W, channels) in [0, 1]."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L"):
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them, so scale here.
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        array = gray[:, :, None] if channels == 1 else np.repeat(gray[:, :, None], 3, axis=2)
        return np.ascontiguousarray(array)
    # "L" uses the ITU-R 601-2 luma transform: L = 0.299 R + 0.587 G + 0.114 B.
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(array.reshape(array.shape[0], array.shape[1], channels))


def load_images(folder: str | Path, channels: int = 1, limit: int | None = None) -> list[np.ndarray]:
    """Read every image file under a folder (recursively) into memory.

    Args:
        folder: directory to search; files ending in .png, .jpg, .jpeg, .bmp, .tif or .tiff (any case) are read,
            in the order of their sorted relative paths.
        channels: 1 converts to gray (Pillow "L", ITU-R 601-2 luma), 3 converts to RGB.
        limit: read at most this many files (the first ones in sorted order); None reads all.

    Returns:
        A list of float32 arrays of shape (H, W, channels) with values in [0, 1].
    """
    folder = Path(folder)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist or is not a directory")
    paths = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {str(folder)!r}")
    images = []
    for path in paths[:limit]:
        with Image.open(path) as image:
            images.append(_to_array(image, channels))
    return images


class PatchSampler:
    """Random patches (size p) from a list of images, with random flips and 90° rotations (8 dihedral transforms).

    An image is picked with probability proportional to its area (H * W), so every pixel of the training set is
    about equally likely to be seen; then a uniform patch position and a uniform dihedral transform are drawn.
    Images smaller than the patch in either side are skipped.
    """

    def __init__(self, images: list[np.ndarray], patch_size: int, rng: np.random.Generator):
        """
        Args:
            images: float32 arrays of shape (H, W, C), all with the same C.
            patch_size: side p of the square patches.
            rng: the only source of randomness of this sampler.
        """
        if int(patch_size) != patch_size or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
        if not images:
            raise ValueError("images is empty; expected at least one (H, W, C) array")
        channels = None
        for i, image in enumerate(images):
            if image.ndim != 3:
                raise ValueError(f"images[{i}] has shape {image.shape}; expected (H, W, C)")
            if channels is None:
                channels = image.shape[2]
            elif image.shape[2] != channels:
                raise ValueError(f"images[{i}] has {image.shape[2]} channels; images[0] has {channels}")
        self.patch_size = int(patch_size)
        self.channels = int(channels)
        self.rng = rng
        self.images = [
            np.asarray(image, dtype=np.float32) for image in images if min(image.shape[:2]) >= self.patch_size
        ]
        if not self.images:
            largest = max(images, key=lambda image: min(image.shape[:2]))
            raise ValueError(
                f"no image is at least {self.patch_size}x{self.patch_size} (patch_size={self.patch_size}); "
                f"the largest image is {largest.shape[0]}x{largest.shape[1]}"
            )
        areas = np.array([image.shape[0] * image.shape[1] for image in self.images], dtype=np.float64)
        self.probabilities = areas / areas.sum()

    def sample(self, n: int) -> np.ndarray:
        """Draw n random patches.

        Args:
            n: number of patches.

        Returns:
            float32 array (n, C, p, p), C-contiguous.
        """
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        p = self.patch_size
        out = np.empty((n, self.channels, p, p), dtype=np.float32)
        which = self.rng.choice(len(self.images), size=n, p=self.probabilities)
        # Dihedral transform t in 0..7: rotate by (t % 4) * 90°, then flip left-right when t >= 4.
        transforms = self.rng.integers(0, 8, size=n)
        for i, (index, t) in enumerate(zip(which, transforms, strict=True)):
            image = self.images[index]
            top = self.rng.integers(0, image.shape[0] - p + 1)
            left = self.rng.integers(0, image.shape[1] - p + 1)
            patch = np.rot90(image[top : top + p, left : left + p], k=int(t) % 4, axes=(0, 1))
            if t >= 4:
                patch = patch[:, ::-1]
            out[i] = patch.transpose(2, 0, 1)  # (p, p, C) -> (C, p, p)
        return out
