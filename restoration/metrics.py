"""Image quality metrics (PSNR, SSIM), and image grids and contact sheets for looking at results.

PSNR follows the standard denoising protocol: mean squared error over every pixel and channel of the full image,
data range 1 for [0, 1] floats. SSIM is the structural similarity index of Wang, Bovik, Sheikh and Simoncelli,
"Image Quality Assessment: From Error Visibility to Structural Similarity", IEEE TIP 2004, with their 11x11
Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, computed per channel and averaged. It reproduces
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
channel_axis=-1)``, which averages the SSIM map over the pixels whose window lies fully inside the image.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# SSIM constants from Wang et al. 2004.
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # scipy's int(truncate * sigma + 0.5) with skimage's truncate = 3.5: an 11x11 window


def _pair(restored: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 (H, W, C), or raise naming both shapes."""
    a, b = np.asarray(restored), np.asarray(reference)
    if a.shape != b.shape:
        raise ValueError(f"restored shape {a.shape} does not match reference shape {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"image shape {a.shape}: expected (H, W) or (H, W, C)")
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    return a, b


def psnr(restored: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio over the whole image: 10 log10(data_range^2 / MSE).

    Args:
        restored: (H, W) or (H, W, C) image.
        reference: clean image of the same shape.
        data_range: peak-to-peak range of the images (1.0 for [0, 1] floats, 255 for 8-bit).
    Returns:
        PSNR in dB; inf when the images are identical.
    """
    if not data_range > 0:
        raise ValueError(f"data_range={data_range!r}: expected a number > 0")
    a, b = _pair(restored, reference)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _ssim_window() -> np.ndarray:
    x = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / _SSIM_SIGMA) ** 2)
    return (g / g.sum()).astype(np.float32)


def _blur_valid(maps: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable correlation of (N, H, W) maps with the 1-D window `g`, no padding: (N, H - 2r, W - 2r)."""
    n, h, w = maps.shape
    oh, ow = h - len(g) + 1, w - len(g) + 1
    # Shifted slices summed in NumPy: for an 11-tap window this is ~5x faster than torch's conv2d on CPU.
    rows = np.zeros((n, h, ow), dtype=np.float32)
    for k, gk in enumerate(g):
        rows += gk * maps[:, :, k : k + ow]
    out = np.zeros((n, oh, ow), dtype=np.float32)
    for k, gk in enumerate(g):
        out += gk * rows[:, k : k + oh, :]
    return out


def ssim(restored: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity (Wang et al. 2004), per channel then averaged.

    Args:
        restored: (H, W) or (H, W, C) image, both sides at least 11 px.
        reference: clean image of the same shape.
        data_range: peak-to-peak range of the images (1.0 for [0, 1] floats, 255 for 8-bit).
    Returns:
        SSIM in [-1, 1]; 1.0 when the images are identical.
    """
    if not data_range > 0:
        raise ValueError(f"data_range={data_range!r}: expected a number > 0")
    a, b = _pair(restored, reference)
    h, w, c = a.shape
    size = 2 * _SSIM_RADIUS + 1
    if h < size or w < size:
        raise ValueError(f"image shape {a.shape[:2]} is smaller than the {size}x{size} SSIM window")
    # Dividing by data_range first is exact for SSIM (C1, C2 scale with it) and keeps float32 well conditioned.
    x = np.ascontiguousarray((a / data_range).transpose(2, 0, 1), dtype=np.float32)  # (C, H, W)
    y = np.ascontiguousarray((b / data_range).transpose(2, 0, 1), dtype=np.float32)
    maps = np.concatenate([x, y, x * x, y * y, x * y])  # (5C, H, W)
    # No padding: the output covers exactly the pixels whose window lies inside the image, the same pixels
    # skimage keeps after cropping `radius` from each border, so border handling cannot make the two differ.
    mu = _blur_valid(maps, _ssim_window()).astype(np.float64)
    mu_x, mu_y, e_xx, e_yy, e_xy = np.split(mu, 5)  # each (C, H - 10, W - 10)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean(axis=(1, 2)).mean())


# --------------------------------------------------------------------------------------------------------------------
# Contact sheets

_GAP = 4  # px between cells and around the sheet
_BACKGROUND = (255, 255, 255)
_CROP_BOX = (255, 0, 0)  # outline of the zoomed region on the full image
_LABEL_PX = 14  # font size of the header labels


# ITU-R BT.601 luma of the super-resolution protocol (MATLAB's rgb2ycbcr): Y = 16 + 65.481 R + 128.553 G + 24.966 B
# for R, G, B in [0, 1], on the 0-255 scale; divided by 255 here so that Y stays a [0, 1]-domain value (16/255..235/255).
_Y_601 = np.array([65.481, 128.553, 24.966]) / 255.0


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """The Y channel of the super-resolution protocol, (16 + 65.481 R + 128.553 G + 24.966 B) / 255.

    Args:
        image: (H, W, 3) RGB floats in [0, 1]; a (H, W, 1) or (H, W) gray image is its own Y.
    Returns:
        float64 (H, W) Y in the [0, 1] domain.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        return image
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image shape {image.shape}: expected (H, W), (H, W, 1) or (H, W, 3)")
    if image.shape[2] == 1:
        return image[..., 0]
    return 16.0 / 255.0 + image @ _Y_601


def _y_pair(restored: np.ndarray, reference: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    """Y of both images with `border` pixels cropped at every side (the SR protocol crops `scale` pixels)."""
    a, b = _pair(restored, reference)
    if int(border) != border or border < 0:
        raise ValueError(f"border={border!r}: expected an integer >= 0")
    border = int(border)
    if min(a.shape[:2]) <= 2 * border:
        raise ValueError(f"image of {a.shape[0]}x{a.shape[1]} pixels leaves nothing inside a {border}-pixel border")
    crop = (slice(border, a.shape[0] - border), slice(border, a.shape[1] - border))
    return rgb_to_y(a)[crop], rgb_to_y(b)[crop]


def psnr_y(restored: np.ndarray, reference: np.ndarray, border: int) -> float:
    """PSNR on the Y channel (see `rgb_to_y`), `border` pixels cropped at every side, data range 1.

    Args:
        restored: (H, W, C) or (H, W) image in [0, 1] (clip a model's output first, as the 8-bit protocol does).
        reference: the original of the same shape.
        border: pixels left out at every side (the scale factor in the super-resolution protocol).
    Returns:
        PSNR in dB.
    """
    a, b = _y_pair(restored, reference, border)
    return psnr(a, b)


def ssim_y(restored: np.ndarray, reference: np.ndarray, border: int) -> float:
    """SSIM (see `ssim`) on the Y channel, `border` pixels cropped at every side, data range 1.

    Args:
        restored: (H, W, C) or (H, W) image in [0, 1].
        reference: the original of the same shape.
        border: pixels left out at every side.
    Returns:
        SSIM in [-1, 1].
    """
    a, b = _y_pair(restored, reference, border)
    return ssim(a, b)


def _to_rgb_u8(image: np.ndarray, where: str) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3), float in [0, 1] or uint8 -> (H, W, 3) uint8."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{where} has shape {np.asarray(image).shape}: expected (H, W), (H, W, 1) or (H, W, 3)")
    if a.dtype == np.uint8:
        u8 = a
    elif np.issubdtype(a.dtype, np.floating):
        u8 = np.round(np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"{where} has dtype {a.dtype}: expected float in [0, 1] or uint8")
    return np.repeat(u8, 3, axis=2) if u8.shape[2] == 1 else u8


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """`text`, shortened with '..' until it fits in `width` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".." if text else ""


def contact_sheet(
    columns: list[list[np.ndarray]],
    labels: list[str] | None = None,
    crop: int | None = None,
    max_width: int = 2048,
) -> np.ndarray:
    """Lay images out in a grid to compare them by eye, e.g. degraded | restored | clean.

    Every image of a row is scaled to one common row height (nearest neighbour when enlarging, so pixels stay
    visible; Lanczos when shrinking). With `crop`, each image is followed on its right by a 2x nearest-neighbour
    zoom of its central `crop` x `crop` region, outlined in red on the image.

    Args:
        columns: columns[j][i] is the image in column j, row i; all columns have the same number of rows. Images
            are (H, W), (H, W, 1) or (H, W, 3), float in [0, 1] or uint8, and may differ in size.
        labels: one header label per column, drawn with Pillow's default font; None for no header.
        crop: side of the central crop to zoom (clamped to the image size), >= 1; None for no zoom.
        max_width: the sheet is downscaled (keeping its aspect ratio) when wider than this.
    Returns:
        (H, W, 3) uint8 sheet.
    """
    if not columns or not all(len(col) > 0 for col in columns):
        raise ValueError(f"columns have {[len(col) for col in columns]} images: expected at least one column and row")
    n_rows = len(columns[0])
    if any(len(col) != n_rows for col in columns):
        raise ValueError(f"columns have {[len(col) for col in columns]} images: expected the same number in each")
    if labels is not None and len(labels) != len(columns):
        raise ValueError(f"{len(labels)} labels for {len(columns)} columns: expected one label per column")
    if crop is not None and (int(crop) != crop or crop < 1):
        raise ValueError(f"crop={crop!r}: expected an integer >= 1 or None")
    if int(max_width) != max_width or max_width < 1:
        raise ValueError(f"max_width={max_width!r}: expected an integer >= 1")

    grid = [[_to_rgb_u8(img, f"columns[{j}][{i}]") for i, img in enumerate(col)] for j, col in enumerate(columns)]
    row_h = max(img.shape[0] for col in grid for img in col)

    # Build every cell: the image scaled to the row height, then (with crop) a gap and the 2x zoom.
    cells: list[list[Image.Image]] = []
    for col in grid:
        cells.append([])
        for img in col:
            h, w = img.shape[:2]
            scale = row_h / h
            new_w = max(1, round(w * scale))
            resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
            shown = Image.fromarray(img).resize((new_w, row_h), resample)
            if crop is None:
                cells[-1].append(shown)
                continue
            side = min(int(crop), h, w)
            top, left = (h - side) // 2, (w - side) // 2
            zoom = img[top : top + side, left : left + side].repeat(2, axis=0).repeat(2, axis=1)  # (2s, 2s, 3)
            ImageDraw.Draw(shown).rectangle(
                [left * scale, top * scale, (left + side) * scale - 1, (top + side) * scale - 1], outline=_CROP_BOX
            )
            cell = Image.new("RGB", (new_w + _GAP + 2 * side, max(row_h, 2 * side)), _BACKGROUND)
            cell.paste(shown, (0, 0))
            cell.paste(Image.fromarray(zoom), (new_w + _GAP, 0))
            cells[-1].append(cell)

    col_w = [max(cell.width for cell in col) for col in cells]
    cell_h = max(cell.height for col in cells for cell in col)
    width = _GAP + sum(w + _GAP for w in col_w)
    # Labels are _LABEL_PX tall in the final sheet: larger before a downscale to max_width, so they stay legible.
    font = ImageFont.load_default(size=_LABEL_PX * max(1.0, width / max_width))
    header_h = 0
    if labels is not None:
        top_px, bottom_px = font.getbbox("Ag")[1::2]
        header_h = bottom_px + top_px + _GAP  # text plus a little air below
    height = _GAP + header_h + n_rows * (cell_h + _GAP)

    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    x = _GAP
    for j, col in enumerate(cells):
        if labels is not None:
            draw.text((x, _GAP), _fit_text(draw, str(labels[j]), font, col_w[j]), fill=(0, 0, 0), font=font)
        for i, cell in enumerate(col):
            sheet.paste(cell, (x, _GAP + header_h + i * (cell_h + _GAP)))
        x += col_w[j] + _GAP

    if sheet.width > max_width:
        new_h = max(1, round(sheet.height * max_width / sheet.width))
        sheet = sheet.resize((int(max_width), new_h), Image.Resampling.LANCZOS)
    return np.asarray(sheet, dtype=np.uint8).copy()


def image_grid(images, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tile images into one RGB picture, `nrow` images per row, black `padding` pixels around and between them.

    Args:
        images: (B, C, H, W) array or CPU/GPU tensor with C in {1, 3} and values in [0, 1] (clipped); gray is
            repeated into RGB.
        nrow: images per row (>= 1); the last row is left black where images run out.
        padding: pixels of border (>= 0).
    Returns:
        uint8 array (rows * (H + padding) + padding, cols * (W + padding) + padding, 3), cols = min(nrow, B).
    """
    if hasattr(images, "detach"):  # a torch tensor, without importing torch here
        images = images.detach().float().cpu().numpy()
    pixels = np.asarray(images, dtype=np.float32)
    if pixels.ndim != 4 or pixels.shape[0] < 1 or pixels.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B >= 1, 1 or 3, H, W), got {tuple(pixels.shape)}")
    if nrow < 1 or padding < 0:
        raise ValueError(f"nrow={nrow!r} must be >= 1 and padding={padding!r} >= 0")
    if not np.isfinite(pixels).all():
        raise ValueError("images contain NaN or infinite values; expected values in [0, 1]")
    pixels = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    pixels = np.broadcast_to(pixels, (pixels.shape[0], 3, *pixels.shape[2:])).transpose(0, 2, 3, 1)  # (B, H, W, 3)
    b, h, w, _ = pixels.shape
    cols, rows = min(nrow, b), math.ceil(b / nrow)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid
