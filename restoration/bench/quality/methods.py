"""The methods a quality run compares: classical denoisers (each maps a degraded (H, W, C) float32 image and sigma on
the 0-255 scale to a restored image) and the bundled restorers, run as the restore pipeline runs them.

- BM3D: K. Dabov, A. Foi, V. Katkovnik, K. Egiazarian, "Image Denoising by Sparse 3-D Transform-Domain Collaborative
  Filtering", IEEE TIP 16(8), 2007; colour (CBM3D): Dabov et al., "Color Image Denoising via Sparse 3D Collaborative
  Filtering with Grouping Constraint in Luminance-Chrominance Space", ICIP 2007. Implementation: the `bm3d` package
  of Makinen, Azzari and Foi ("Collaborative Filtering of Correlated Noise", IEEE TIP 2020), default profile.
- Non-local means: A. Buades, B. Coll, J.-M. Morel, "A non-local algorithm for image denoising", CVPR 2005, in
  scikit-image's fast mode (J. Darbon et al., "Fast nonlocal filtering applied to electron cryomicroscopy", ISBI 2008).
- Total variation: A. Chambolle, "An Algorithm for Total Variation Minimization and Applications", JMIV 20, 2004.
- Wavelet BayesShrink: S. G. Chang, B. Yu, M. Vetterli, "Adaptive Wavelet Thresholding for Image Denoising and
  Compression", IEEE TIP 9(9), 2000.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Classical methods per mode, in table order. "noisy" is the degraded input itself (clipped like every output).
GRAY_METHODS = ("noisy", "bm3d", "nl_means", "tv", "wavelet")
COLOR_METHODS = ("noisy", "cbm3d", "nl_means", "tv", "wavelet")
INPUT_METHOD = "input"  # the unrestored JPEG/blurred input, on the rows of those degradations

# Parameters of the classical methods, written into the report. NL-means follows scikit-image's documented example
# for a known sigma with fast_mode (patch 5, distance 6, h = 0.6 sigma); the TV weight 0.8 sigma was the best of
# {0.5, 0.75, 1, 1.25, 1.5, 2} x sigma on 8 Train400 images (not on the test set); BayesShrink is scikit-image's
# documented default (db1, soft, rescale_sigma), with YCbCr conversion for colour as in its gallery.
METHOD_PARAMS = {
    "bm3d": "bm3d.bm3d(noisy, sigma_psd=sigma/255), default 'np' profile, num_threads = threads",
    "cbm3d": "bm3d.bm3d_rgb(noisy, sigma_psd=sigma/255), default 'np' profile, opponent colour space",
    "nl_means": "skimage denoise_nl_means(patch_size=5, patch_distance=6, h=0.6*sigma, sigma=sigma, fast_mode=True)",
    "tv": "skimage denoise_tv_chambolle(weight=0.8*sigma) (sigma on the [0, 1] scale)",
    "wavelet": "skimage denoise_wavelet(sigma=sigma, method='BayesShrink', mode='soft', wavelet='db1', "
    "rescale_sigma=True; colour: convert2ycbcr=True)",
}


def _bm3d(noisy: np.ndarray, sigma: float, threads: int) -> np.ndarray:
    import bm3d

    profile = bm3d.BM3DProfile()
    profile.num_threads = threads  # 0 (the default) would use every core
    z = noisy.astype(np.float64)
    if z.shape[2] == 3:
        return bm3d.bm3d_rgb(z, sigma_psd=sigma / 255.0, profile=profile)
    return bm3d.bm3d(z[..., 0], sigma_psd=sigma / 255.0, profile=profile)[..., None]


def _skimage_call(fn: Callable, noisy: np.ndarray, **kwargs) -> np.ndarray:
    """Run a scikit-image denoiser on a 2-D gray image or an (H, W, 3) colour one."""
    z = noisy.astype(np.float64)
    if z.shape[2] == 1:
        return fn(z[..., 0], **kwargs)[..., None]
    return fn(z, channel_axis=-1, **kwargs)


def _nl_means(noisy: np.ndarray, sigma: float, threads: int) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    s = sigma / 255.0
    return _skimage_call(denoise_nl_means, noisy, patch_size=5, patch_distance=6, h=0.6 * s, sigma=s, fast_mode=True)


def _tv(noisy: np.ndarray, sigma: float, threads: int) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return _skimage_call(denoise_tv_chambolle, noisy, weight=0.8 * sigma / 255.0)


def _wavelet(noisy: np.ndarray, sigma: float, threads: int) -> np.ndarray:
    from skimage.restoration import denoise_wavelet

    extra = {"convert2ycbcr": True} if noisy.shape[2] == 3 else {}
    return _skimage_call(
        denoise_wavelet, noisy, sigma=sigma / 255.0, method="BayesShrink", mode="soft", rescale_sigma=True, **extra
    )


CLASSICAL = {
    "noisy": lambda noisy, sigma, threads: noisy,
    "bm3d": _bm3d,
    "cbm3d": _bm3d,
    "nl_means": _nl_means,
    "tv": _tv,
    "wavelet": _wavelet,
}


class ModelMethod:
    """One restorer run exactly as the restore pipeline runs it (ModelRunner.restore_array)."""

    def __init__(self, name: str, threads: int, color: bool, ensemble: bool = False) -> None:
        import torch

        from restoration.checkpoint import model_label
        from restoration.inference import ModelRunner

        torch.set_num_threads(threads)
        self.actor = ModelRunner(name, ensemble=ensemble)
        self.label = model_label(name)
        model_channels = self.actor.channels
        self.method = self.label
        if color and model_channels == 1:
            self.method = f"{self.label} (per channel)"
        elif not color and model_channels == 3:
            self.method = f"{self.label} (gray replicated)"
        if ensemble:
            self.method = f"{self.method} x8"
        # One call on a small image first, so one-off allocations and kernel selection are not timed.
        self(np.zeros((64, 64, 3 if color else 1), dtype=np.float32))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.actor.restore_array(np.ascontiguousarray(image, dtype=np.float32)[None])[0]


def bundled_restorers() -> dict[str, int]:
    """Bundled restorer names (restoration/weights/*.pt of kind "restorer") and their channel counts.

    Returns:
        {name: channels}, sorted by name.
    """
    from restoration.checkpoint import WEIGHTS_DIR, ModelFileError, load_model

    found = {}
    for path in sorted(WEIGHTS_DIR.glob("*.pt")):
        try:
            loaded = load_model(str(path), expected_kind="restorer")
        except ModelFileError:
            continue  # a GAN/VAE/classifier file, not a restorer
        found[path.stem] = int(loaded.config.channels)
    return found


def default_models(color: bool) -> tuple[str, ...]:
    """The restorers a run benchmarks when none are named.

    Args:
        color: colour mode: every bundled colour restorer plus `denoise-gray` per channel; gray mode: every bundled
            gray restorer.
    Returns:
        Bundled model names, gray ones first.
    """
    bundled = bundled_restorers()
    if not color:
        return tuple(n for n, c in bundled.items() if c == 1)
    gray = ("denoise-gray",) if bundled.get("denoise-gray") == 1 else ()
    return gray + tuple(n for n, c in bundled.items() if c == 3)
