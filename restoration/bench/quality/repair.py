"""`restoration bench quality --task repair`: blind damage repair against the damaged input and a median filter.

Protocol: every image gets fixed seeded damage (`degrade.apply_masked` with the `damage` spec, by default
`scratch:10,spots:20`: white or black scratches 1-3 px wide and dust spots, seeded by (seed, image name)), so every
method and every run repairs the same damage. No method is told where it is. Rows: the damaged input itself, a 3x3
median filter over the whole image (the classical blind fix for dust and thin scratches), and each repair model as
the pipeline runs it. Every result is quantised to 8 bits, as the pipeline's PNG is. PSNR (data range 1) over the
whole image and inside the damage; then every method on the undamaged images, PSNR of its output against its input
(what it harms where nothing is wrong): over all the images' pixels together (the PSNR of the pooled squared
error, so that images returned unchanged do not hide one that is harmed) and of the worst image; 100 dB stands for
an output identical to the input. s/MP: wall seconds per
image megapixel on the damaged images, on the benchmark's threads.
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

from restoration import codec, degrade, metrics
from restoration.bench.quality.inpaint import aligned, load_images, summarise
from restoration.errors import UserError

DAMAGE = "scratch:10,spots:20"
EXACT_PSNR = 100.0  # what the clean rows report for an output equal to its input (PSNR is infinite there)


@dataclass(frozen=True)
class RepairConfig:
    """One repair benchmark run. `images`: a folder of images (`--images`), or (tests) [(name, (H, W, C) float
    array)]."""

    damage: str = DAMAGE
    datasets: str | Path | None = None  # folder holding Set12/; None: `sources.datasets_dir()`
    color: bool = False  # the colour sample photos instead of Set12
    models: tuple[str, ...] | None = None  # repairer names or files; None: the bundled repair-gray (repair-color)
    limit: int | None = None
    threads: int | None = None
    precision: str = "auto"  # the models' precision, as the pipeline's --precision
    seed: int = 0
    out_dir: str = "bench-output"
    sheet_images: int = 2  # images on the contact sheet
    images: str | list | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        try:
            _, mask = degrade.apply_masked(np.zeros((8, 8, 1), np.float32), self.damage, np.random.default_rng(0))
        except ValueError as e:
            raise UserError(f"damage {self.damage!r}: {e}") from None
        if mask is None or any(s.name not in ("scratch", "spots") for s in degrade.parse_spec(self.damage)):
            raise UserError(f"damage {self.damage!r}: expected scratch:COUNT and/or spots:COUNT steps")
        for name in ("limit", "threads", "sheet_images"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise UserError(f"{name}={value!r}: expected an integer >= 1")


def median3(image: np.ndarray) -> np.ndarray:
    """A 3x3 median filter of each channel of float (H, W, C) `image` (edges: nearest pixel repeated)."""
    from scipy.ndimage import median_filter

    return median_filter(image, size=(3, 3, 1), mode="nearest")


class ModelRepairer:
    """A repairer model file run as the pipeline runs it (`inference.ModelRunner`: tiles, bf16 where it pays)."""

    def __init__(self, name: str, precision: str) -> None:
        from restoration.inference import ModelRunner

        self.runner = ModelRunner(name, precision=precision)
        if not self.runner.repairing:
            raise UserError(f"{name} holds a {self.runner.loaded.kind} model: expected a repairer")
        self.label = self.runner.label
        self(np.zeros((32, 32, self.runner.channels), np.float32))  # one-off allocations are not timed

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.runner.repair_array(image[None])[0][0]


def benchmark(config: RepairConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Every method on every image, damaged and clean.

    Returns:
        {"rows": [{method, damage, psnr, psnr_damage, seconds_per_mp, images, per_image}] (damage: the spec, or
        "none" for the clean images, whose psnr is against the input), "description", "threads", "models",
        "precision", "damage", "wall_seconds", "sheet": [(name, [(label, image)])]}.
    """
    import torch

    t_start = time.perf_counter()
    threads = int(config.threads or len(os.sched_getaffinity(0)))
    description, images = load_images(config)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        default = "repair-color" if config.color else "repair-gray"
        models = [ModelRepairer(n, config.precision) for n in config.models or (default,)]
        methods = [("input", lambda x: x), ("median 3x3", median3), *((m.label, m) for m in models)]
        per: dict[tuple[str, str], list[dict]] = {}
        sheet = []
        for i, (name, clean) in enumerate(images):
            damaged, mask = degrade.apply_masked(clean, config.damage, degrade.rng_for(config.seed, name))
            panels = [("input", damaged)]
            for method, fn in methods:
                for condition, source in ((config.damage, damaged), ("none", clean)):
                    t0 = time.perf_counter()
                    out = fn(source)
                    seconds = time.perf_counter() - t0
                    out = codec.to_uint(out, 8) / 255.0  # what a PNG holds
                    value = {"image": name, "seconds": seconds, "megapixels": clean.shape[0] * clean.shape[1] / 1e6}
                    if condition == "none":
                        sse = float(np.sum((out - clean) ** 2, dtype=np.float64))
                        value.update(psnr=_psnr(sse, clean.size), psnr_damage=float("nan"), sse=sse, n=clean.size)
                    else:
                        value.update(psnr=metrics.psnr(out, clean), psnr_damage=metrics.psnr(out[mask], clean[mask]))
                        panels.append((method, out.astype(np.float32)))
                    per.setdefault((method, condition), []).append(value)
            if i < config.sheet_images:
                sheet.append((name, [*panels[1:], ("original", clean)]))
            if progress is not None:
                progress(f"{name}: {i + 1}/{len(images)} images, {time.perf_counter() - t_start:.0f} s")
    finally:
        torch.set_num_threads(saved_threads)
    rows = summarise(per, "damage", ("psnr", "psnr_damage"))
    for row in rows:
        if row["damage"] == "none":
            values = row["per_image"]
            pooled = _psnr(sum(v["sse"] for v in values), sum(v["n"] for v in values))
            row.update(psnr=pooled, worst_psnr=min(v["psnr"] for v in values))
    return {
        "rows": rows,
        "description": description,
        "threads": threads,
        "models": [m.label for m in models],
        "precision": config.precision,
        "damage": config.damage,
        "wall_seconds": time.perf_counter() - t_start,
        "sheet": sheet,
    }


def _psnr(sse: float, n: int) -> float:
    """PSNR (data range 1) of a summed squared error over `n` samples; EXACT_PSNR where it is 0 (or above that)."""
    return min(EXACT_PSNR, float(10 * np.log10(n / sse))) if sse > 0 else EXACT_PSNR


# --------------------------------------------------------------------------------------------------------- report
def _cells(result: dict) -> tuple[list[str], list[list[str]]]:
    """One row per method: PSNR whole and in the damage, clean PSNR against the input, s/MP; then each model's
    margins over the input and the median filter."""
    damage = result["damage"]
    by_key = {(r["method"], r["damage"]): r for r in result["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    body = []
    for method in methods:
        hurt, clean = by_key[(method, damage)], by_key[(method, "none")]
        cells = [
            f"{hurt['psnr']:.2f}",
            f"{hurt['psnr_damage']:.2f}",
            f"{clean['psnr']:.2f} / {clean['worst_psnr']:.2f}",
        ]
        body.append([method, *cells, f"{hurt['seconds_per_mp']:.3g}"])
    for model in result["models"]:
        for baseline in [m for m in methods if m not in result["models"]]:
            gain = by_key[(model, damage)]["psnr"] - by_key[(baseline, damage)]["psnr"]
            body.append([f"{model} - {baseline}", f"{gain:+.2f}", "", "", ""])
    header = ["method", f"{damage}: PSNR", "in the damage", "clean vs input: all / worst", "s/MP"]
    return header, body


def format_table(result: dict) -> str:
    """Aligned text table of `benchmark`'s result."""
    return aligned(*_cells(result))


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write repair.md, repair.json and repair_sheet.png into `out_dir`.

    Returns:
        {"markdown": path, "json": path, "sheet": path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "repair.md", "json": out / "repair.json", "sheet": out / "repair_sheet.png"}
    header, body = _cells(result)
    protocol = " ".join(__doc__.split("\n\n", 1)[1].split())
    lines = [
        "# Blind damage repair quality",
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
        labels = [label for label, _ in result["sheet"][0][1]]
        columns = [[panels[j][1] for _, panels in result["sheet"]] for j in range(len(labels))]
        Image.fromarray(metrics.contact_sheet(columns, labels, crop=96)).save(paths["sheet"])
    return paths
