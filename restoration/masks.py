"""Damage masks as pure functions: free-form brush strokes (holes to inpaint) and dust spots; a user's mask file.

A mask is a bool array (H, W), True where a pixel is missing or damaged. Random functions take an explicit
``rng: np.random.Generator`` and nothing else random, so ``(shape, arguments, seed)`` always gives the same mask.

Free-form strokes follow the irregular-mask generator of DeepFill v2 (J. Yu, Z. Lin, J. Yang, X. Shen, X. Lu,
T. Huang, "Free-Form Image Inpainting with Gated Convolution", ICCV 2019): a stroke starts at a random point and
makes a few segments of random angle and length, drawn as a thick line with round joints. The brush is a user's
brush, sized in pixels rather than as a share of the image, so a training patch and a large photo see the same
strokes; strokes are drawn segment by segment until the coverage is reached, which bounds its overshoot by one
segment.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from restoration import codec, metrics

ORPHAN = "mask: a mask without an image (no <name>.<ext> beside <name>_mask.png)"  # its row's error
BRUSH_WIDTH = (6, 20)  # stroke width in pixels, drawn uniformly per stroke
SEGMENT_LENGTH = (10, 50)  # segment length in pixels
SEGMENTS = (2, 8)  # segments per stroke
SPOT_RADIUS = (1.0, 4.0)  # dust spots: ellipse semi-axes in pixels


def coverage(mask: np.ndarray) -> float:
    """Share of True pixels of a (H, W) mask."""
    return float(np.count_nonzero(mask)) / max(mask.size, 1)


def free_form(height: int, width: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Free-form brush strokes covering about `fraction` of an (H, W) image.

    Args:
        height, width: the image's size in pixels, >= 1.
        fraction: target coverage in [0, 1); strokes are added segment by segment until it is reached, so the result
            exceeds it by at most one segment's area (a few hundred pixels).
        rng: places the strokes.
    Returns:
        bool (H, W), True inside the strokes.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction={fraction!r}: expected a number in [0, 1)")
    if height < 1 or width < 1:
        raise ValueError(f"size {height}x{width}: expected at least 1x1 pixels")
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    target = fraction * height * width
    # A brush at most a quarter of the shorter side, so small images still get strokes rather than blots.
    top = max(1, min(BRUSH_WIDTH[1], min(height, width) // 4))
    covered = 0
    while covered < target:
        brush = int(rng.integers(min(BRUSH_WIDTH[0], top), top + 1))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        angle = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(SEGMENTS[0], SEGMENTS[1] + 1))):
            angle += rng.uniform(-math.pi / 3, math.pi / 3)  # a stroke bends, it does not zigzag
            length = rng.uniform(*SEGMENT_LENGTH)
            nx = min(max(x + length * math.cos(angle), 0.0), width - 1.0)
            ny = min(max(y + length * math.sin(angle), 0.0), height - 1.0)
            draw.line([(x, y), (nx, ny)], fill=255, width=brush)
            r = brush / 2
            draw.ellipse([nx - r, ny - r, nx + r, ny + r], fill=255)  # a round joint
            x, y = nx, ny
            covered = np.count_nonzero(np.asarray(canvas))
            if covered >= target:
                break
    return np.asarray(canvas) > 0


def spots(height: int, width: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` dust spots: small filled ellipses (semi-axes SPOT_RADIUS pixels), each white or black.

    Args:
        height, width: the image's size in pixels.
        count: number of spots, >= 0.
        rng: places and shades the spots.
    Returns:
        (mask, value): bool (H, W), True on a spot, and float32 (H, W) holding each spot's value (1.0 or 0.0; later
        spots over earlier ones), meaningful where the mask is True.
    """
    if int(count) != count or count < 0:
        raise ValueError(f"count={count!r}: expected an integer >= 0")
    # 128 marks "untouched"; spots are drawn as 255 (white) or 0 (black).
    canvas = Image.new("L", (width, height), 128)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(count)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(*SPOT_RADIUS), rng.uniform(*SPOT_RADIUS)
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255 if rng.random() < 0.5 else 0)
    drawn = np.asarray(canvas)
    return drawn != 128, (drawn == 255).astype(np.float32)


def union(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """The pixels missing in either (H, W) mask; None stands for no mask."""
    return b if a is None else a if b is None else a | b


def block_any(mask: np.ndarray | None, factor: int) -> np.ndarray | None:
    """A (H, W) mask at 1/`factor` of its size (after cropping to multiples of it): a pixel is damaged when any pixel
    of its block was, so a mask survives an `lr:F` step (None stays None)."""
    if mask is None or factor == 1:
        return mask
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    return mask[: h * factor, : w * factor].reshape(h, factor, w, factor).any(axis=(1, 3))


def decode(data: bytes | None, size: tuple[int, int], max_pixels: int = codec.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A mask file (any image Pillow reads; nonzero in any channel = missing, alpha ignored) for an image of `size`.

    Args:
        data: the encoded mask.
        size: the image's (H, W); the mask must have it.
        max_pixels: as for `codec.decode`.
    Returns:
        bool (H, W), True where a pixel is missing.
    Raises:
        codec.DecodeError naming what is wrong: unreadable, or another size than the image's.
    """
    decoded = codec.decode(data or b"", max_pixels=max_pixels)
    if (decoded.height, decoded.width) != tuple(size):
        raise codec.DecodeError(
            f"mask is {decoded.width}x{decoded.height} pixels, the image {size[1]}x{size[0]}: expected the same size"
        )
    return decoded.pixels.max(axis=2) > 0


def psnr_inside(image: np.ndarray, reference: np.ndarray, raw: bytes | None) -> float | None:
    """PSNR of `image` against `reference` (H, W, C) inside a stage row's mask (raw uint8 (H, W), 1 = missing).

    Returns:
        dB, or None without a mask, with an empty one, or with one of another size (an upscaler's output).
    """
    h, w = image.shape[:2]
    if raw is None or len(raw) != h * w:
        return None
    inside = np.frombuffer(raw, np.uint8).reshape(h, w).astype(bool)
    return metrics.psnr(image[inside], reference[inside]) if inside.any() else None
