"""Random training patches for the restorer.

Patch-based training with the eight dihedral augmentations (four 90° rotations, each with or without a flip)
follows DnCNN: K. Zhang, W. Zuo, Y. Chen, D. Meng, L. Zhang, "Beyond a Gaussian Denoiser: Residual Learning of
Deep CNN for Image Denoising", IEEE TIP 2017 (arXiv:1608.03981).
"""

from __future__ import annotations

import numpy as np


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
