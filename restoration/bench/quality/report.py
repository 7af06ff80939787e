"""The quality report: the table (method x degradation), `quality.md`, `quality.json` and the contact sheet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from restoration import metrics, sources
from restoration.bench.quality.config import QualityResult
from restoration.bench.quality.methods import METHOD_PARAMS
from restoration.errors import UserError


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
    gray = (clean[..., 0] if clean.shape[2] == 1 else sources.luma(clean)[..., 0]).astype(np.float64)
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
        raise UserError("the result has no sheet images: expected a run with sheet_images >= 1")
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
