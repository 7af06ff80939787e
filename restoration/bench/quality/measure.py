"""One quality run: every method on every image and degradation, measured as the DnCNN/KAIR protocol asks."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from restoration import degrade, metrics
from restoration.bench.quality.config import QualityConfig, QualityResult
from restoration.bench.quality.images import load_benchmark_images
from restoration.bench.quality.methods import (
    CLASSICAL,
    COLOR_METHODS,
    GRAY_METHODS,
    INPUT_METHOD,
    ModelMethod,
    default_models,
)
from restoration.bench.summary import cpu_name
from restoration.errors import UserError

JPEG_QUALITIES = (10, 20)
BLUR_SIGMA = 1.0
SHEET_SIGMA = 25.0  # the contact sheet shows the sigma closest to this one


def _threads_available() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _device_info(threads: int) -> dict:
    import torch

    from restoration.device import default_device

    device = default_device()
    info = {"cpu": cpu_name(), "cpus_available": _threads_available(), "threads": threads, "models_on": str(device)}
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
        raise UserError("no methods and no models to run: expected at least one of either")
    description, names, images = load_benchmark_images(config)
    notes = []
    if config.methods is not None and set(allowed) - set(methods):
        notes.append(f"methods left out by request: {', '.join(m for m in allowed if m not in methods)}")

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _thread_limits(threads, notes):
            models = [ModelMethod(n, threads, config.color) for n in model_names]  # load (and fail) before any work
            if config.ensemble:
                models += [ModelMethod(n, threads, config.color, ensemble=True) for n in model_names]
            seen = [m.method for m in models]
            if len(set(seen)) != len(seen) or set(seen) & {*CLASSICAL, INPUT_METHOD}:
                raise UserError(f"models {list(model_names)} give the method names {seen}: expected unique names")
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
