"""`restoration bench quality --task inpaint`: the inpainters against the classical fills on Set12.

Protocol: every image gets fixed free-form masks (`masks.free_form`, the strokes of `degrade` `holes:F`) at each
coverage, seeded by (seed, image name, coverage), so every method and every run fills the same holes. The holes are
set to 0; every method fills them from the rest, the known pixels are kept as they are (a composite), and the result
is quantised to 8 bits, as the pipeline's PNG is. PSNR (data range 1) over the whole image and inside the holes only.
Classical baselines: scikit-image's `inpaint_biharmonic` (biharmonic equation over each hole, Damelin and Hoang 2018),
OpenCV's Telea (fast marching, A. Telea, J. Graphics Tools 2004) and Navier-Stokes (Bertalmio, Bertozzi, Sapiro,
CVPR 2001), both with a 5-pixel radius; and the inpainter's own first stage alone, the parameter-free push-pull fill.
s/MP: wall seconds per image megapixel, on the benchmark's threads (OpenCV and scikit-image run on one).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from restoration import codec, degrade, masks, metrics, samples, sources
from restoration.errors import UserError

COVERAGES = (0.1, 0.25, 0.4)
CLASSICAL = ("biharmonic", "telea", "navier-stokes")
OPENCV_RADIUS = 5  # pixels of known neighbourhood Telea and Navier-Stokes look at


@dataclass(frozen=True)
class InpaintConfig:
    """One inpainting benchmark run. `images`: a folder of images (`--images`), or (tests) [(name, (H, W, C) float
    array)]."""

    coverages: tuple[float, ...] = COVERAGES
    datasets: str | Path | None = None  # folder holding Set12/; None: `sources.datasets_dir()`
    color: bool = False  # the colour sample photos instead of Set12 (a gray model runs on each channel)
    models: tuple[str, ...] | None = None  # inpainter names or files; None: the bundled inpaint-gray
    methods: tuple[str, ...] | None = None  # subset of CLASSICAL (+ "push-pull"); None: all
    limit: int | None = None
    threads: int | None = None
    precision: str = "auto"  # the models' precision, as the pipeline's --precision
    seed: int = 0
    out_dir: str = "bench-output"
    sheet_images: int = 2  # images on the contact sheet, at the largest coverage
    images: str | list | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.coverages or not all(0 < c < 1 for c in self.coverages):
            raise UserError(f"coverages={self.coverages!r}: expected numbers in (0, 1), e.g. 0.1,0.25,0.4")
        known = (*CLASSICAL, "push-pull")
        for m in self.methods or ():
            if m not in known:
                raise UserError(f"method {m!r}: expected some of {', '.join(known)}")
        for name in ("limit", "threads", "sheet_images"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise UserError(f"{name}={value!r}: expected an integer >= 1")


# -------------------------------------------------------------------------------------------------------- methods
def biharmonic(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    from skimage.restoration import inpaint_biharmonic

    return inpaint_biharmonic(image, hole, channel_axis=-1).astype(np.float32)


def opencv(image: np.ndarray, hole: np.ndarray, flag_name: str) -> np.ndarray:
    """OpenCV's inpainting (8-bit, as it requires) of float (H, W, C) `image` where `hole` (H, W) is True."""
    import cv2

    u8 = codec.to_uint(image, 8)
    out = cv2.inpaint(
        u8[..., 0] if u8.shape[2] == 1 else u8, hole.astype(np.uint8), OPENCV_RADIUS, getattr(cv2, flag_name)
    )
    return (out.reshape(image.shape) / 255.0).astype(np.float32)


def push_pull_fill(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    import torch

    from restoration.models.inpainter import push_pull

    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]  # (1, C, H, W)
    known = torch.from_numpy((~hole).astype(np.float32))[None, None]  # (1, 1, H, W)
    return push_pull(x, known)[0].numpy().transpose(1, 2, 0)


class ModelInpainter:
    """An inpainter model file run as the pipeline runs it (`inference.ModelRunner`: tiles, bf16 where it pays)."""

    def __init__(self, name: str, precision: str) -> None:
        from restoration.inference import ModelRunner

        self.runner = ModelRunner(name, precision=precision)
        if not self.runner.masked:
            raise UserError(f"{name} holds a {self.runner.loaded.kind} model: expected an inpainter")
        self.label = self.runner.label
        self(np.zeros((32, 32, 1), np.float32), np.eye(32, dtype=bool))  # one-off allocations are not timed

    def __call__(self, image: np.ndarray, hole: np.ndarray) -> np.ndarray:
        return self.runner.restore_array(image[None], hole[None])[0]


def _methods(config: InpaintConfig) -> list[tuple[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]]:
    table = {
        "biharmonic": biharmonic,
        "telea": lambda x, m: opencv(x, m, "INPAINT_TELEA"),
        "navier-stokes": lambda x, m: opencv(x, m, "INPAINT_NS"),
        "push-pull": push_pull_fill,
    }
    return [(name, table[name]) for name in (config.methods or table)]


# ------------------------------------------------------------------------------------------------------------ run
def load_images(config: InpaintConfig) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """The `images` folder, else Set12 (gray), or the colour sample photos with `color` or when Set12 is missing:
    (description, images). Shared by the repair benchmark."""
    channels = 3 if config.color else 1
    if isinstance(config.images, str | os.PathLike):
        paths = sources.image_paths(config.images)[: config.limit]
        if not paths:
            raise UserError(f"--images {config.images}: no image files in that folder")
        return f"{config.images}", [(p.stem, _read(p, channels)) for p in paths]
    if config.images is not None:
        return "arrays given by the caller", list(config.images)[: config.limit]
    folder = sources.datasets_dir(config.datasets) / "Set12"
    if not config.color and folder.is_dir():
        paths = sources.image_paths(folder)[: config.limit]
        return f"Set12 ({folder})", [(p.stem, _read(p, 1)) for p in paths]
    names = samples.COLOR_PHOTOS[: config.limit]
    why = "" if config.color else f": Set12 not found in {folder.parent}"
    return f"colour sample photos ({', '.join(names)}){why}", [(n, _read(samples.sample_photo(n), 3)) for n in names]


def _read(path: Path, channels: int) -> np.ndarray:
    with Image.open(path) as image:
        return sources.image_to_float(image, channels)


def benchmark(config: InpaintConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Every method on every image at every coverage.

    Returns:
        {"rows": [{method, coverage, psnr, psnr_hole, seconds_per_mp, images, per_image}], "description", "threads",
        "models", "wall_seconds", "sheet": [(name, [(label, image)])], "sheet_coverage"}.
    """
    import torch

    t_start = time.perf_counter()
    threads = int(config.threads or len(os.sched_getaffinity(0)))
    description, images = load_images(config)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        models = [ModelInpainter(n, config.precision) for n in config.models or ("inpaint-gray",)]
        methods = [*_methods(config), *((m.label, m) for m in models)]
        per: dict[tuple[str, float], list[dict]] = {}
        sheet, sheet_coverage = [], max(config.coverages)
        for coverage in config.coverages:
            for i, (name, clean) in enumerate(images):
                h, w = clean.shape[:2]
                hole = masks.free_form(h, w, coverage, degrade.rng_for(config.seed, f"{name}/{coverage}"))
                damaged = np.where(hole[..., None], np.float32(0), clean)
                panels = [("input", damaged)]
                for method, fn in methods:
                    t0 = time.perf_counter()
                    out = fn(damaged, hole)
                    seconds = time.perf_counter() - t0
                    out = np.where(hole[..., None], out, clean)  # the known pixels as they were
                    out = codec.to_uint(out, 8) / 255.0  # what a PNG holds
                    per.setdefault((method, coverage), []).append(
                        {
                            "image": name,
                            "psnr": metrics.psnr(out, clean),
                            "psnr_hole": metrics.psnr(out[hole], clean[hole]),
                            "coverage": masks.coverage(hole),
                            "seconds": seconds,
                            "megapixels": h * w / 1e6,
                        }
                    )
                    panels.append((method, out.astype(np.float32)))
                if coverage == sheet_coverage and i < config.sheet_images:
                    sheet.append((name, [*panels, ("original", clean)]))
            if progress is not None:
                progress(f"coverage {coverage:g}: {len(images)} images, {time.perf_counter() - t_start:.0f} s")
    finally:
        torch.set_num_threads(saved_threads)
    return {
        "rows": summarise(per, "coverage"),
        "description": description,
        "threads": threads,
        "models": [m.label for m in models],
        "precision": config.precision,
        "wall_seconds": time.perf_counter() - t_start,
        "sheet": sheet,
        "sheet_coverage": sheet_coverage,
    }


def summarise(per: dict[tuple[str, object], list[dict]], condition: str, metrics_=("psnr", "psnr_hole")) -> list[dict]:
    """One row per (method, condition) of per-image values: the means of `metrics_`, wall seconds per megapixel.

    Args:
        per: (method, condition value) -> per-image dicts holding `metrics_`, "seconds" and "megapixels".
        condition: the rows' name for the condition value ("coverage" here; the repair benchmark's "damage").
    Returns:
        [{method, <condition>, <each metric>, seconds_per_mp, images, per_image}] in `per`'s order.
    """
    rows = []
    for (method, value), values in per.items():
        mp = sum(v["megapixels"] for v in values)
        means = {name: float(np.mean([v[name] for v in values])) for name in metrics_}
        row = {"method": method, condition: value, **means, "seconds_per_mp": sum(v["seconds"] for v in values) / mp}
        rows.append(row | {"images": len(values), "per_image": values})
    return rows


# --------------------------------------------------------------------------------------------------------- report
def _cells(result: dict) -> tuple[list[str], list[list[str]]]:
    """One row per method, a 'PSNR / hole PSNR' column per coverage, s/MP; then each model's margin over the best
    classical method at each coverage (whole-image PSNR)."""
    coverages = sorted({r["coverage"] for r in result["rows"]})
    by_key = {(r["method"], r["coverage"]): r for r in result["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    body = []
    for method in methods:
        mine = [r for r in result["rows"] if r["method"] == method]
        seconds = sum(v["seconds"] for r in mine for v in r["per_image"])
        mp = sum(v["megapixels"] for r in mine for v in r["per_image"])
        cells = [f"{by_key[(method, c)]['psnr']:.2f} / {by_key[(method, c)]['psnr_hole']:.2f}" for c in coverages]
        body.append([method, *cells, f"{seconds / mp:.3g}"])
    classical = [m for m in methods if m in CLASSICAL]
    for model in result["models"]:
        if not classical:
            break
        gaps = []
        for c in coverages:
            best = max(classical, key=lambda m, c=c: by_key[(m, c)]["psnr"])
            gaps.append(f"{by_key[(model, c)]['psnr'] - by_key[(best, c)]['psnr']:+.2f} ({best})")
        body.append([f"{model} - best classical", *gaps, ""])
    return ["method", *(f"{c:.0%} holes: PSNR / in holes" for c in coverages), "s/MP"], body


def format_table(result: dict) -> str:
    """Aligned text table of `benchmark`'s result."""
    return aligned(*_cells(result))


def aligned(header: list[str], body: list[list[str]]) -> str:
    """An aligned text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(line[j]) for line in [header, *body]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write inpaint.md, inpaint.json and inpaint_sheet.png into `out_dir`.

    Returns:
        {"markdown": path, "json": path, "sheet": path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "inpaint.md", "json": out / "inpaint.json", "sheet": out / "inpaint_sheet.png"}
    header, body = _cells(result)
    protocol = " ".join(__doc__.split("\n\n", 1)[1].split())
    lines = [
        "# Inpainting quality",
        "",
        protocol,
        "",
        f"- Images: {result['description']}",
        f"- Models: {', '.join(result['models'])} (precision {result['precision']}); threads: {result['threads']}",
        f"- Wall time of the whole run: {result['wall_seconds']:.0f} s",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        *("| " + " | ".join(b) + " |" for b in body),
    ]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    payload = {k: v for k, v in result.items() if k != "sheet"}
    payload["protocol"] = protocol
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    if result["sheet"]:
        labels = [f"{label} ({result['sheet_coverage']:.0%})" for label, _ in result["sheet"][0][1]]
        columns = [[panels[j][1] for _, panels in result["sheet"]] for j in range(len(labels))]
        Image.fromarray(metrics.contact_sheet(columns, labels, crop=96)).save(paths["sheet"])
    return paths
