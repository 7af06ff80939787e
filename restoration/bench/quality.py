"""`restoration bench quality`: the bundled restorers against BM3D and classical denoisers, gray and colour.

Every method sees the same degraded array and runs under the same thread limit; models run through
`ModelRunner.restore_array`, the code path of the production restore pipeline (tiling and channel adaptation
included). The protocol is the DnCNN/KAIR one (see DESIGN.md): clean image in [0, 1], noise N(0, sigma/255) added in
float with a seed fixed per (image, sigma), not clipped before the method; every output is clipped to [0, 1]; PSNR over
the whole image (all channels) with data range 1; SSIM from `restoration.metrics`.

Baselines:
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

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from restoration import degrade, metrics, samples
from restoration.sources import IMAGE_SUFFIXES, load_images

REPO = Path(__file__).resolve().parents[2]
DEFAULT_GRAY_FOLDER = REPO.parent / "shared" / "datasets" / "Set12"
DEFAULT_SIGMAS = (15.0, 25.0, 50.0)
JPEG_QUALITIES = (10, 20)
BLUR_SIGMA = 1.0
SHEET_SIGMA = 25.0  # the contact sheet shows the sigma closest to this one
MIN_CROP = 16  # SSIM needs 11 px; BM3D's 8x8 blocks need room to search

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


@dataclass(frozen=True)
class QualityConfig:
    """What one benchmark run measures. `images` is a folder, or (for tests) a sequence of (H, W, C) float arrays."""

    color: bool = False
    images: str | Path | tuple[np.ndarray, ...] | None = None  # None: Set12 (gray) or the 7 colour sample photos
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
            raise ValueError("sigmas is empty: expected at least one noise level, e.g. 15,25,50")
        for s in self.sigmas:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 < s <= 255:
                raise ValueError(f"sigma {s!r}: expected a number in (0, 255] (0-255 scale)")
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        allowed = COLOR_METHODS if self.color else GRAY_METHODS
        for m in self.methods or ():
            if m not in allowed:
                mode = "colour" if self.color else "gray"
                raise ValueError(f"method {m!r}: expected one of {', '.join(allowed)} in {mode} mode")
        for name in ("limit", "threads", "sheet_images"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        if self.crop is not None and (
            isinstance(self.crop, bool) or int(self.crop) != self.crop or self.crop < MIN_CROP
        ):
            raise ValueError(f"crop={self.crop!r}: expected an integer >= {MIN_CROP} (px)")


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


# --------------------------------------------------------------------------------------------------------------------
# Methods: each maps a degraded (H, W, C) float32 image and sigma (0-255 scale) to a restored (H, W, C) image.


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


class _Model:
    """One restorer run exactly as the restore pipeline runs it (ModelRunner.restore_array)."""

    def __init__(self, name: str, threads: int, color: bool, ensemble: bool = False) -> None:
        import torch

        from restoration.checkpoint import model_label
        from restoration.pipelines.restore import ModelRunner

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


# --------------------------------------------------------------------------------------------------------------------
# Images


def _read_photo(path: Path, channels: int) -> np.ndarray:
    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return array.reshape(array.shape[0], array.shape[1], channels)


def _load_folder(folder: Path, channels: int, limit: int | None) -> tuple[list[str], list[np.ndarray]]:
    # Same files and order as load_images: sorted relative paths, recursively.
    names = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )[:limit]
    images = load_images(folder, channels=channels, limit=limit)
    if len(names) != len(images):
        raise RuntimeError(f"listed {len(names)} image files under {folder} but read {len(images)}")
    return names, images


def load_benchmark_images(config: QualityConfig) -> tuple[str, list[str], list[np.ndarray]]:
    """The images a run uses, cropped and limited.

    Args:
        config: the run's config.
    Returns:
        (description of the image set, names, float32 (H, W, C) images in [0, 1]).
    """
    channels = 3 if config.color else 1
    if isinstance(config.images, tuple):
        images = []
        for i, image in enumerate(config.images):
            a = np.asarray(image)
            if a.ndim == 2:
                a = a[..., None]
            if a.ndim != 3 or a.shape[2] != channels or not np.issubdtype(a.dtype, np.floating):
                raise ValueError(
                    f"images[{i}] has shape {np.asarray(image).shape} and dtype {a.dtype}: expected float "
                    f"(H, W, {channels}) in [0, 1] for {'colour' if config.color else 'gray'} mode"
                )
            images.append(a.astype(np.float32))
        names = [f"array-{i}" for i in range(len(images))]
        description = f"{len(images)} arrays given by the caller"
    elif config.images is not None:
        folder = Path(config.images)
        if not folder.is_dir():
            raise ValueError(f"images folder {str(folder)!r} does not exist: expected a folder of images")
        names, images = _load_folder(folder, channels, config.limit)
        description = f"folder {folder}"
    elif config.color:
        names = list(samples.COLOR_PHOTOS)
        images = [_read_photo(samples.sample_photo(n), 3) for n in names]
        description = "colour sample photos from scikit-image and scikit-learn (" + ", ".join(names) + ")"
    elif DEFAULT_GRAY_FOLDER.is_dir():
        names, images = _load_folder(DEFAULT_GRAY_FOLDER, 1, config.limit)
        description = f"Set12 ({DEFAULT_GRAY_FOLDER})"
    else:
        names = list(samples.GRAY_PHOTOS)
        images = [_read_photo(samples.sample_photo(n), 1) for n in names]
        description = f"gray sample photos ({', '.join(names)}): Set12 not found at {DEFAULT_GRAY_FOLDER}"
    if not images:
        raise ValueError(f"no images in {description}: expected at least one")
    names, images = names[: config.limit], images[: config.limit]
    if config.crop is not None:
        images = [_center_crop(a, config.crop) for a in images]
        description += f", central {config.crop}x{config.crop} crops"
    return description, names, images


def _center_crop(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    ch, cw = min(side, h), min(side, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(image[top : top + ch, left : left + cw])


# --------------------------------------------------------------------------------------------------------------------
# The run


def _threads_available() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _device_info(threads: int) -> dict:
    import torch

    from restoration.device import default_device

    device = default_device()
    info = {"cpu": _cpu_name(), "cpus_available": _threads_available(), "threads": threads, "models_on": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _thread_limits(threads: int, notes: list[str]):
    """Limit BLAS/OpenMP pools of NumPy and SciPy to `threads` (torch and BM3D are limited separately)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it
        notes.append("BLAS/OpenMP threads not limited: threadpoolctl is not installed")
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def degradations(sigmas: Sequence[float], models: Sequence[str], color: bool) -> list[str]:
    """Degradation specs of a run: noise at every sigma, plus JPEG (and blur, gray) when a `restore-*` model runs.

    Args:
        sigmas: noise levels, 0-255 scale.
        models: model labels of the run.
        color: colour mode (no blur rows there).
    Returns:
        Spec strings such as "noise:25", "jpeg:10", "blur:1".
    """
    specs = [f"noise:{s:g}" for s in sigmas]
    if any(m.startswith("restore-") for m in models):
        specs += [f"jpeg:{q}" for q in JPEG_QUALITIES]
        if not color:
            specs.append(f"blur:{BLUR_SIGMA:g}")
    return specs


def _degrade(clean: np.ndarray, spec: str, name: str, seed: int) -> np.ndarray:
    kind, arg = spec.split(":")
    if kind == "noise":
        # One generator per (image, sigma): every method sees the same noisy array, on any machine.
        return degrade.gaussian_noise(clean, float(arg), degrade.rng_for(seed, f"{name}/{spec}"))
    if kind == "jpeg":
        return degrade.jpeg(clean, int(arg))  # 4:2:0 chroma for colour, as the restore pipeline degrades
    return degrade.gaussian_blur(clean, float(arg))


def _measure(fn: Callable, degraded: np.ndarray, clean: np.ndarray, name: str) -> tuple[np.ndarray, dict]:
    """Run one method on one degraded image: (output clipped to [0, 1], per-image values of the report)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(degraded)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    out = np.clip(np.asarray(out, dtype=np.float64).reshape(clean.shape), 0.0, 1.0)
    measured = {
        "image": name,
        "psnr": metrics.psnr(out, clean),
        "ssim": metrics.ssim(out, clean),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "megapixels": clean.shape[0] * clean.shape[1] / 1e6,
    }
    return out, measured


def benchmark(config: QualityConfig, progress: Callable[[str], None] | None = None) -> QualityResult:
    """Run every method on every image and degradation.

    Args:
        config: what to measure.
        progress: called with one line per finished image (e.g. print); None for silence.
    Returns:
        Rows {method, degradation, psnr, ssim, seconds_per_mp, cpu_seconds_per_mp, images, per_image}: PSNR/SSIM are
        means over images; seconds_per_mp is total wall seconds / total megapixels, cpu_seconds_per_mp the same with
        the process's CPU time (all its threads; on a shared machine it does not grow with other processes' load);
        per_image holds {image, psnr, ssim, seconds, cpu_seconds, megapixels}.
    """
    import torch

    t_start = time.perf_counter()
    threads = int(config.threads or _threads_available())
    allowed = COLOR_METHODS if config.color else GRAY_METHODS
    methods = [m for m in allowed if config.methods is None or m in config.methods]
    model_names = default_models(config.color) if config.models is None else tuple(config.models)
    if not methods and not model_names:
        raise ValueError("no methods and no models to run: expected at least one of either")
    description, names, images = load_benchmark_images(config)
    notes = []
    if config.methods is not None and set(allowed) - set(methods):
        notes.append(f"methods left out by request: {', '.join(m for m in allowed if m not in methods)}")

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _thread_limits(threads, notes):
            models = [_Model(n, threads, config.color) for n in model_names]  # load (and fail) before any work
            if config.ensemble:
                models += [_Model(n, threads, config.color, ensemble=True) for n in model_names]
            seen = [m.method for m in models]
            if len(set(seen)) != len(seen) or set(seen) & {*CLASSICAL, INPUT_METHOD}:
                raise ValueError(f"models {list(model_names)} give the method names {seen}: expected unique names")
            specs = degradations(config.sigmas, [m.label for m in models], config.color)
            sheet_sigma = min(config.sigmas, key=lambda s: abs(s - SHEET_SIGMA))
            sheet_spec = f"noise:{sheet_sigma:g}"
            sheet_methods = {"noisy", "bm3d", "cbm3d", *(m.method for m in models)}  # clean | noisy | BM3D | ours
            per: dict[tuple[str, str], list[dict]] = {}
            sheet = []
            for i, (name, clean) in enumerate(zip(names, images, strict=True)):
                t_image = time.perf_counter()
                on_sheet = i < config.sheet_images
                for spec in specs:
                    degraded = _degrade(clean, spec, name, config.seed)
                    if spec.startswith("noise:"):
                        sigma = float(spec.split(":")[1])
                        runs = [(m, lambda x, m=m, s=sigma: CLASSICAL[m](x, s, threads)) for m in methods]
                    else:
                        runs = [(INPUT_METHOD, lambda x: x)]
                    runs += [(m.method, m) for m in models]
                    panels = []
                    for method, fn in runs:
                        out, measured = _measure(fn, degraded, clean, name)
                        per.setdefault((method, spec), []).append(measured)
                        if on_sheet and spec == sheet_spec and method in sheet_methods:
                            panels.append((method, out.astype(np.float32)))
                    if on_sheet and spec == sheet_spec:
                        if "noisy" not in dict(panels):
                            panels.insert(0, ("noisy", np.clip(degraded, 0.0, 1.0)))
                        sheet.append({"name": name, "clean": clean, "panels": panels})
                if progress is not None:
                    progress(
                        f"[{i + 1}/{len(images)}] {name} {clean.shape[1]}x{clean.shape[0]}: "
                        f"{time.perf_counter() - t_image:.1f} s"
                    )
    finally:
        torch.set_num_threads(saved_threads)

    rows = []
    for (method, spec), values in per.items():
        mp = sum(v["megapixels"] for v in values)
        rows.append(
            {
                "method": method,
                "degradation": spec,
                "psnr": float(np.mean([v["psnr"] for v in values])),
                "ssim": float(np.mean([v["ssim"] for v in values])),
                "seconds_per_mp": sum(v["seconds"] for v in values) / mp,
                "cpu_seconds_per_mp": sum(v["cpu_seconds"] for v in values) / mp,
                "images": len(values),
                "per_image": values,
            }
        )
    order = {m: k for k, m in enumerate([*allowed, INPUT_METHOD, *[m.method for m in models]])}
    rows.sort(key=lambda r: (order[r["method"]], specs.index(r["degradation"])))
    config_json = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(config).items()
        if k != "images" or not isinstance(v, tuple)
    }
    if isinstance(config.images, tuple):
        config_json["images"] = f"{len(config.images)} arrays"
    config_json["models"] = list(model_names)
    return QualityResult(
        rows=rows,
        image_set=description,
        image_names=names,
        image_sizes=[(int(a.shape[0]), int(a.shape[1])) for a in images],
        threads=threads,
        device=_device_info(threads),
        notes=notes,
        config=config_json,
        wall_seconds=time.perf_counter() - t_start,
        sheet=sheet,
        sheet_sigma=sheet_sigma,
    )


# --------------------------------------------------------------------------------------------------------------------
# Reports


def _table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the summary table: one row per method, one column per degradation, then s/MP."""
    specs = list(dict.fromkeys(r["degradation"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_key = {(r["method"], r["degradation"]): r for r in rows}
    body = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        # Pixel-weighted over all of the method's rows: total seconds / total megapixels.
        seconds = sum(sum(v["seconds"] for v in r["per_image"]) for r in mine)
        cpu_seconds = sum(sum(v["cpu_seconds"] for v in r["per_image"]) for r in mine)
        mp = sum(sum(v["megapixels"] for v in r["per_image"]) for r in mine)
        cells = [method]
        for spec in specs:
            r = by_key.get((method, spec))
            cells.append("" if r is None else f"{r['psnr']:.2f} / {r['ssim']:.4f}")
        cells += [f"{seconds / mp:.3g}", f"{cpu_seconds / mp:.3g}"]
        body.append(cells)
    return ["method", *specs, "s/MP", "CPU s/MP"], body


def format_table(rows: list[dict]) -> str:
    """Aligned text table: rows = method, columns = degradation ("PSNR / SSIM"), and seconds per megapixel.

    Args:
        rows: rows from `benchmark`.
    Returns:
        The table, one line per method after a header and a rule.
    """
    header, body = _table_cells(rows)
    widths = [max(len(line[j]) for line in [header, *body]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def _markdown(result: QualityResult) -> str:
    header, body = _table_cells(result.rows)
    device = result.device
    where = f"models on {device['models_on']}" + (f" ({device['gpu']})" if "gpu" in device else "")
    sizes = sorted({f"{w}x{h}" for h, w in result.image_sizes})
    lines = [
        f"# Restoration quality: {'colour' if result.config['color'] else 'gray'}",
        "",
        "Protocol: each clean image is a float in [0, 1]; noise N(0, sigma/255) is added in float with a seed fixed "
        f"per (image, sigma) (`degrade.rng_for({result.config['seed']}, '<image>/noise:<sigma>')`), not clipped, "
        "and every method gets that same noisy array; JPEG rows use Pillow at the given quality (4:2:0 chroma for "
        "colour), blur rows an isotropic Gaussian blur. Every output, the unrestored input included, is clipped to "
        "[0, 1]; PSNR is over the whole image and all channels with data range 1; SSIM is `restoration.metrics.ssim` "
        "(Wang et al. 2004, 11x11 Gaussian window). Cells are 'PSNR dB / SSIM', means over the images; s/MP is the "
        "wall time of the method call divided by the megapixels, summed over images and degradations; CPU s/MP is the "
        "same with the process's CPU time (all threads), which other load on a shared machine does not inflate. "
        "Models run through `ModelRunner.restore_array`, the production code path.",
        "",
        f"- Images: {len(result.image_names)} from {result.image_set}; sizes {', '.join(sizes)}",
        f"- Threads: {result.threads} (torch, BLAS and BM3D limited to it); CPU: {device['cpu']} "
        f"({device['cpus_available']} available); {where}",
        f"- Wall time of the whole run: {result.wall_seconds:.0f} s",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        *("| " + " | ".join(b) + " |" for b in body),
        "",
        "Method settings:",
        "",
    ]
    shown = {r["method"] for r in result.rows}
    lines += [f"- `{m}`: {p}" for m, p in METHOD_PARAMS.items() if m in shown]
    if any(" (per channel)" in m for m in shown):
        lines.append("- `(per channel)`: a gray model restoring R, G and B as three gray images")
    lines += [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _detailed_window(clean: np.ndarray, side: int) -> tuple[int, int]:
    """Top-left corner of the `side` x `side` window with the most gradient energy (the most detailed region)."""
    gray = clean.mean(axis=2).astype(np.float64)
    energy = np.zeros_like(gray)
    energy[:, 1:] += np.diff(gray, axis=1) ** 2
    energy[1:, :] += np.diff(gray, axis=0) ** 2
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # (H + 1, W + 1)
    sums = (
        integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side] + integral[:-side, :-side]
    )  # (H - side + 1, W - side + 1): energy of the window at each top-left corner
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(top), int(left)


def quality_sheet(result: QualityResult, height: int = 256, zoom: int = 3) -> np.ndarray:
    """Contact sheet of the sheet images: clean | noisy | BM3D | each model, then a magnified detailed crop row.

    Every cell is labelled with its PSNR (the crop row with the PSNR of the crop). Full images are scaled to
    `height`; the crop (side height // zoom px of the original, at the region with the most gradient energy, boxed
    in red on the full images) is enlarged `zoom` times with nearest neighbour, so pixels stay visible.

    Args:
        result: a benchmark result with `sheet` entries.
        height: display height of the full images in px.
        zoom: magnification of the crop row.
    Returns:
        (H, W, 3) uint8 sheet.
    """
    if not result.sheet:
        raise ValueError("the result has no sheet images: expected a run with sheet_images >= 1")
    gap, font = 4, _font(13)
    label_h = font.getbbox("Ag")[3] + 4
    rows: list[list[tuple[str, Image.Image]]] = []
    for entry in result.sheet:
        clean = entry["clean"]
        h, w = clean.shape[:2]
        side = max(8, min(height // zoom, h, w))
        top, left = _detailed_window(clean, side)
        scale = height / h
        full, crops = [], []
        for label, image in [("clean", clean), *entry["panels"]]:
            u8 = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
            u8 = np.repeat(u8, 3, axis=2) if u8.shape[2] == 1 else u8
            resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
            shown = Image.fromarray(u8).resize((max(1, round(w * scale)), height), resample)
            ImageDraw.Draw(shown).rectangle(
                [left * scale, top * scale, (left + side) * scale - 1, (top + side) * scale - 1], outline=(255, 0, 0)
            )
            crop = Image.fromarray(u8[top : top + side, left : left + side]).resize(
                (side * zoom, side * zoom), Image.Resampling.NEAREST
            )
            if label == "clean":
                full.append((f"{entry['name']}: clean", shown))
                crops.append((f"crop x{zoom}", crop))
                continue
            region = (slice(top, top + side), slice(left, left + side))
            full.append((f"{label} {metrics.psnr(image, clean):.2f} dB", shown))
            crops.append((f"{label} {metrics.psnr(image[region], clean[region]):.2f} dB", crop))
        rows += [full, crops]

    col_w = [max(row[j][1].width for row in rows if j < len(row)) for j in range(max(len(r) for r in rows))]
    title_h = label_h + gap
    row_h = [label_h + max(img.height for _, img in row) for row in rows]
    sheet = Image.new(
        "RGB", (gap + sum(cw + gap for cw in col_w), title_h + gap + sum(rh + gap for rh in row_h)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, gap), f"sigma = {result.sheet_sigma:g} (0-255 scale), PSNR vs clean", fill=(0, 0, 0), font=font)
    y = title_h + gap
    for row, rh in zip(rows, row_h, strict=True):
        x = gap
        for (label, img), cw in zip(row, col_w, strict=False):
            while label and draw.textlength(label, font=font) > cw:
                label = label[:-1]
            draw.text((x, y), label, fill=(0, 0, 0), font=font)
            sheet.paste(img, (x, y + label_h))
            x += cw + gap
        y += rh + gap
    return np.asarray(sheet, dtype=np.uint8).copy()


def write_report(result: QualityResult, out_dir: str | Path) -> dict[str, Path]:
    """Write quality.md, quality.json and quality_sheet.png into `out_dir` (created if needed).

    Args:
        result: from `benchmark`.
        out_dir: output folder.
    Returns:
        {"markdown": path, "json": path, "sheet": path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "quality.md", "json": out / "quality.json", "sheet": out / "quality_sheet.png"}
    paths["markdown"].write_text(_markdown(result))
    payload = {
        "mode": "colour" if result.config["color"] else "gray",
        "image_set": result.image_set,
        "images": [
            {"name": n, "height": h, "width": w}
            for n, (h, w) in zip(result.image_names, result.image_sizes, strict=True)
        ],
        "threads": result.threads,
        "device": result.device,
        "wall_seconds": result.wall_seconds,
        "protocol": "noise N(0, sigma/255) added in float, seed fixed per (image, sigma), not clipped before the "
        "method; outputs clipped to [0, 1]; PSNR over the whole image, data range 1; SSIM restoration.metrics.ssim",
        "method_settings": {m: p for m, p in METHOD_PARAMS.items() if any(r["method"] == m for r in result.rows)},
        "notes": result.notes,
        "config": result.config,
        "rows": result.rows,
    }
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    Image.fromarray(quality_sheet(result)).save(paths["sheet"])
    return paths


# --------------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `restoration bench quality`.

    Args:
        parser: the (sub)parser to add them to.
    """
    parser.add_argument("--color", action="store_true", help="colour mode: the 7 colour sample photos, CBM3D")
    parser.add_argument("--images", default=None, help="folder of images (default: Set12, or the colour photos)")
    parser.add_argument("--sigmas", default="15,25,50", help="noise levels on the 0-255 scale (default 15,25,50)")
    parser.add_argument("--models", default=None, help="restorers, comma-separated (default: the bundled ones)")
    parser.add_argument("--methods", default=None, help="classical methods subset, comma-separated (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images")
    parser.add_argument("--crop", type=int, default=None, help="central crop side in px (fast checks)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    parser.add_argument("--out", default="bench-output", help="output folder (default ./bench-output)")
    parser.add_argument(
        "--ensemble", action="store_true", help="also run each model with the 8-orientation self-ensemble (x8 rows)"
    )


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def config_from_args(args: argparse.Namespace) -> QualityConfig:
    """Build the config from parsed `add_arguments` options; ValueError names a bad value.

    Args:
        args: parsed arguments.
    Returns:
        The config.
    """
    sigmas = []
    for part in _split(args.sigmas) or ():
        try:
            sigmas.append(float(part))
        except ValueError:
            raise ValueError(f"--sigmas value {part!r}: expected numbers in (0, 255], e.g. 15,25,50") from None
    return QualityConfig(
        color=args.color,
        images=args.images,
        sigmas=tuple(sigmas),
        models=_split(args.models),
        methods=_split(args.methods),
        limit=args.limit,
        crop=args.crop,
        threads=args.threads,
        out_dir=args.out,
        ensemble=args.ensemble,
    )


def run(args: argparse.Namespace) -> int:
    """`restoration bench quality`: run, print the table, write the report files.

    Args:
        args: parsed `add_arguments` options.
    Returns:
        Exit code 0.
    """
    config = config_from_args(args)
    result = benchmark(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"images: {len(result.image_names)} from {result.image_set}")
    print(f"threads: {result.threads}; CPU: {result.device['cpu']}; models on {result.device['models_on']}")
    print(format_table(result.rows))
    for note in result.notes:
        print(f"note: {note}")
    paths = write_report(result, config.out_dir)
    print(f"wall time {result.wall_seconds:.1f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0
