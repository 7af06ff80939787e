"""`restoration bench quality --task upscale`: the bundled upscalers against nearest, bicubic and Lanczos on Set5/Set14.

The super-resolution protocol of the literature (see `datasets/README.md`): each original is cropped to a multiple of
the scale (`degrade.modcrop`) and downscaled with antialiased bicubic (`degrade` `lr:F`, Pillow in float); every
method upscales that same low-resolution array back; PSNR and SSIM on the Y channel (`metrics.rgb_to_y`, ITU-R 601 as
MATLAB's rgb2ycbcr; a gray image is its own Y) with `scale` pixels cropped at every border, outputs clipped to
[0, 1]. A gray upscaler runs on the Y channel of colour images, with Cb and Cr upscaled bicubically, as SRCNN, FSRCNN
and VDSR do. The published bicubic rows were made with MATLAB's `imresize` (which has its own kernel-support and
border details) and 8-bit images; the report prints them beside ours, so the gap between the two bicubics is measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from restoration import codec, degrade, metrics, samples, sources
from restoration.errors import UserError

SCALES = (2, 3, 4)
SETS = ("Set5", "Set14")
CLASSICAL = tuple(codec.RESAMPLING)  # nearest, bicubic, lanczos
# Published PSNR (dB) on (Set5, Set14) from datasets/README.md: MATLAB bicubic and SRCNN (Dong et al., TPAMI 2016).
PUBLISHED = {
    "bicubic (published)": {2: (33.66, 30.24), 3: (30.39, 27.55), 4: (28.42, 26.00)},
    "SRCNN (published)": {2: (36.66, 32.45), 3: (32.75, 29.30), 4: (30.48, 27.50)},
}
# MATLAB's rgb2ycbcr on [0, 1] RGB, as 0-255 values: rows Y, Cb, Cr; offsets 16, 128, 128.
_YCBCR = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255.0
_OFFSET = np.array([16.0, 128.0, 128.0]) / 255.0


@dataclass(frozen=True)
class UpscaleConfig:
    """One upscaling benchmark run. `images` (tests): {set name: [(name, (H, W, C) float array)]}."""

    scales: tuple[int, ...] = SCALES
    datasets: str | Path | None = None  # folder holding Set5/ and Set14/; None: `sources.datasets_dir()`
    models: tuple[str, ...] | None = None  # upscaler names or files; None: the bundled upscale-gray-x{scale}
    limit: int | None = None  # first N images of each set
    threads: int | None = None
    out_dir: str = "bench-output"
    sheet_images: int = 2  # images of the first set on the contact sheet, at the largest scale
    images: dict | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.scales:
            raise UserError("scales is empty: expected at least one of 2, 3, 4")
        for s in self.scales:
            if s not in SCALES:
                raise UserError(f"scale {s!r}: expected one of 2, 3, 4")
        for name in ("limit", "threads", "sheet_images"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise UserError(f"{name}={value!r}: expected an integer >= 1")


# --------------------------------------------------------------------------------------------------------- images
def _read(path: Path) -> np.ndarray:
    """An image in its own colour mode: a gray file stays (H, W, 1), so that it is its own Y."""
    with Image.open(path) as image:
        return sources.image_to_float(image, 1 if image.mode in ("L", "I;16", "I;16B", "I;16L", "1") else 3)


def load_sets(config: UpscaleConfig) -> tuple[str, dict[str, list[tuple[str, np.ndarray]]]]:
    """The evaluation sets: Set5 and Set14, or the colour sample photos when they are missing.

    Returns:
        (description, {set name: [(image name, float32 (H, W, C) image)]}).
    """
    if config.images is not None:
        return "arrays given by the caller", {k: list(v)[: config.limit] for k, v in config.images.items()}
    root = sources.datasets_dir(config.datasets)
    if all((root / name).is_dir() for name in SETS):
        sets = {}
        for name in SETS:
            paths = sources.image_paths(root / name)[: config.limit]
            sets[name] = [(p.stem, _read(p)) for p in paths]
        return f"Set5 and Set14 ({root})", sets
    names = samples.COLOR_PHOTOS[: config.limit]
    photos = [(n, _read(samples.sample_photo(n))) for n in names]
    return f"colour sample photos ({', '.join(names)}): Set5/Set14 not found in {root}", {"samples": photos}


# -------------------------------------------------------------------------------------------------------- methods
def pillow_up(image: np.ndarray, scale: int, method: str) -> np.ndarray:
    """Upscale a float (H, W, C) image `scale` times with a Pillow filter, per channel in mode "F"."""
    h, w = image.shape[:2]
    return codec.resize(image, w * scale, h * scale, method)


def rgb_to_ycbcr(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1] -> Y, Cb, Cr as MATLAB's rgb2ycbcr, divided by 255."""
    return (image.astype(np.float64) @ _YCBCR.T + _OFFSET).astype(np.float32)


def ycbcr_to_rgb(image: np.ndarray) -> np.ndarray:
    """The inverse of `rgb_to_ycbcr`."""
    return ((image.astype(np.float64) - _OFFSET) @ np.linalg.inv(_YCBCR).T).astype(np.float32)


class ModelUpscaler:
    """A gray (or RGB) upscaler model file; colour inputs go through Y (model) and CbCr (bicubic)."""

    def __init__(self, name: str) -> None:
        from restoration.checkpoint import load_named, model_label

        loaded = load_named(name, expected_kind="upscaler")
        self.model = loaded.module.eval()
        self.scale = int(loaded.config.scale)
        self.channels = int(loaded.config.channels)
        self.label = model_label(name)
        self(np.zeros((16, 16, 3), np.float32))  # one-off allocations are not timed

    def _run(self, image: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]  # (1, C, H, W)
            return self.model(x)[0].numpy().transpose(1, 2, 0)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.shape[2] == self.channels:
            return self._run(image)
        if image.shape[2] == 1:  # gray image, RGB model
            return self._run(np.repeat(image, 3, axis=2)).mean(axis=2, keepdims=True)
        ycbcr = rgb_to_ycbcr(image)
        y = self._run(ycbcr[..., :1])
        cbcr = pillow_up(ycbcr[..., 1:], self.scale, "bicubic")
        return ycbcr_to_rgb(np.concatenate([y, cbcr], axis=2))


# ------------------------------------------------------------------------------------------------------------ run
def _threads_available() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def benchmark(config: UpscaleConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Every method on every image of every set at every scale.

    Returns:
        {"rows": [{method, set, scale, psnr, ssim, seconds_per_mp, images, per_image}], "description", "sets",
        "threads", "wall_seconds", "sheet": [(name, [(label, image)])], "sheet_scale"}; seconds_per_mp is wall
        seconds per output megapixel.
    """
    import torch

    t_start = time.perf_counter()
    threads = int(config.threads or _threads_available())
    description, sets = load_sets(config)
    names = config.models or tuple(f"upscale-gray-x{s}" for s in config.scales)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        models = [ModelUpscaler(n) for n in names]
        missing = [s for s in config.scales if not any(m.scale == s for m in models)]
        if config.models is not None and missing:
            raise UserError(f"no model of scale {missing[0]} among {list(names)}: expected one per --scales value")
        per: dict[tuple[str, str, int], list[dict]] = {}
        sheet, sheet_scale = [], max(config.scales)
        for scale in config.scales:
            methods: list[tuple[str, Callable]] = [
                (m, lambda x, m=m, s=scale: pillow_up(x, s, m)) for m in CLASSICAL
            ] + [(m.label, m) for m in models if m.scale == scale]
            for set_name, images in sets.items():
                for i, (name, original) in enumerate(images):
                    hr = np.ascontiguousarray(degrade.modcrop(original, scale))
                    lr = degrade.bicubic_down(original, scale)
                    panels = []
                    for method, fn in methods:
                        t0 = time.perf_counter()
                        out = np.clip(np.asarray(fn(lr), np.float64), 0.0, 1.0)
                        seconds = time.perf_counter() - t0
                        per.setdefault((method, set_name, scale), []).append(
                            {
                                "image": name,
                                "psnr": metrics.psnr_y(out, hr, border=scale),
                                "ssim": metrics.ssim_y(out, hr, border=scale),
                                "seconds": seconds,
                                "megapixels": hr.shape[0] * hr.shape[1] / 1e6,
                            }
                        )
                        if method != "lanczos":
                            panels.append((method, out.astype(np.float32)))
                    if scale == sheet_scale and set_name == next(iter(sets)) and i < config.sheet_images:
                        sheet.append((name, [*panels, ("original", hr)]))
                if progress is not None:
                    progress(f"x{scale} {set_name}: {len(images)} images, {time.perf_counter() - t_start:.0f} s")
    finally:
        torch.set_num_threads(saved_threads)
    rows = []
    for (method, set_name, scale), values in per.items():
        mp = sum(v["megapixels"] for v in values)
        rows.append(
            {
                "method": method,
                "set": set_name,
                "scale": scale,
                "psnr": float(np.mean([v["psnr"] for v in values])),
                "ssim": float(np.mean([v["ssim"] for v in values])),
                "seconds_per_mp": sum(v["seconds"] for v in values) / mp,
                "images": len(values),
                "per_image": values,
            }
        )
    return {
        "rows": rows,
        "description": description,
        "sets": list(sets),
        "full_sets": config.images is None and config.limit is None and set(sets) == set(SETS),
        "threads": threads,
        "models": list(names),
        "wall_seconds": time.perf_counter() - t_start,
        "sheet": sheet,
        "sheet_scale": sheet_scale,
    }


# --------------------------------------------------------------------------------------------------------- report
def _cells(result: dict) -> tuple[list[str], list[list[str]]]:
    """Table: one row per method (then the published rows), one 'PSNR / SSIM' column per (scale, set), then s/MP."""
    columns = [(scale, name) for scale in sorted({r["scale"] for r in result["rows"]}) for name in result["sets"]]
    by_key = {(r["method"], r["set"], r["scale"]): r for r in result["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    body = []
    for method in methods:
        mine = [r for r in result["rows"] if r["method"] == method]
        seconds = sum(v["seconds"] for r in mine for v in r["per_image"])
        mp = sum(v["megapixels"] for r in mine for v in r["per_image"])
        cells = [method]
        for scale, name in columns:
            r = by_key.get((method, name, scale))
            cells.append("" if r is None else f"{r['psnr']:.2f} / {r['ssim']:.4f}")
        body.append([*cells, f"{seconds / mp:.3g}"])
    if result["full_sets"]:  # the published rows are means over all of Set5 and Set14
        for method, values in PUBLISHED.items():
            body.append([method, *(f"{values[s][SETS.index(n)]:.2f}" for s, n in columns), ""])
        ours = {(r["set"], r["scale"]): r["psnr"] for r in result["rows"] if r["method"] == "bicubic"}
        gap = [f"{ours[(n, s)] - PUBLISHED['bicubic (published)'][s][SETS.index(n)]:+.2f}" for s, n in columns]
        body.append(["bicubic: Pillow - published", *gap, ""])
    return ["method", *(f"{name} x{scale}" for scale, name in columns), "s/MP"], body


def format_table(result: dict) -> str:
    """Aligned text table of `benchmark`'s result."""
    header, body = _cells(result)
    widths = [max(len(line[j]) for line in [header, *body]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


PROTOCOL = (
    "Protocol: each original is cropped to a multiple of the scale and downscaled with antialiased bicubic "
    "(`degrade` `lr:F`: Pillow, float, no 8-bit rounding); every method upscales that array; outputs are clipped to "
    "[0, 1]; PSNR (dB) and SSIM on the Y channel (ITU-R 601, MATLAB's rgb2ycbcr; a gray image is its own Y) with "
    "`scale` pixels cropped at every border; cells are 'PSNR / SSIM', means over the images. nearest, bicubic and "
    "Lanczos are Pillow's filters per channel in float; a gray model runs on Y, with Cb and Cr upscaled bicubically. "
    "s/MP: wall seconds per output megapixel. The published rows (MATLAB bicubic, SRCNN) are PSNR only."
)


def sheet_image(result: dict, crop: int = 96) -> np.ndarray:
    """Contact sheet: input (nearest-upscaled) | bicubic | ours | original, each with a 2x zoom of its centre."""
    if not result["sheet"]:
        raise UserError("the result has no sheet images: expected a run with sheet_images >= 1")
    labels = [label for label, _ in result["sheet"][0][1]]
    labels = ["input (nearest)" if label == "nearest" else label for label in labels]
    columns = [[panels[j][1] for _, panels in result["sheet"]] for j in range(len(labels))]
    labels = [f"x{result['sheet_scale']} {label}" for label in labels]
    return metrics.contact_sheet(columns, labels, crop=crop)


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write upscale.md, upscale.json and upscale_sheet.png into `out_dir`.

    Returns:
        {"markdown": path, "json": path, "sheet": path}.
    """
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "upscale.md", "json": out / "upscale.json", "sheet": out / "upscale_sheet.png"}
    header, body = _cells(result)
    lines = [
        "# Upscaling quality",
        "",
        PROTOCOL,
        "",
        f"- Images: {result['description']}",
        f"- Models: {', '.join(result['models'])}; threads: {result['threads']}",
        f"- Wall time of the whole run: {result['wall_seconds']:.0f} s",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        *("| " + " | ".join(b) + " |" for b in body),
    ]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    payload = {k: v for k, v in result.items() if k != "sheet"}
    payload["protocol"] = PROTOCOL
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    Image.fromarray(sheet_image(result)).save(paths["sheet"])
    return paths
