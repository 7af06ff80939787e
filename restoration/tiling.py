"""Tiled inference with context margins and feathered blending, in memory bounded by the tile size.

A fully convolutional model maps each output pixel from a (2r+1) x (2r+1) input window, r being its receptive field
radius. A tile's outputs within r pixels of a cut edge saw zero padding where the whole image had real pixels, so they
are wrong; everything further inside equals the whole-image output. `tiled_apply` therefore treats `overlap` as the
context margin: on every side where a tile has a neighbour, its outer `overlap` pixels get weight 0 and the next
`overlap` pixels fade in with a raised-cosine ramp (shorter when the tile leaves no room). Neighbouring tiles share
2 * overlap + ramp pixels, so each pixel lies in some tile's trusted interior and the two ramps cross-fade. Image
borders are real borders (the whole-image forward pads there too), so they keep weight 1. Result: for a
translation-equivariant fn with receptive radius <= overlap, the tiled output equals the whole-image output up to
float rounding (no seams at all); for anything else the ramp hides the seams. The price: tiles advance by
tile - 3 * overlap, 416 px with the defaults, so about 1.5x the convolutions of one whole-image pass.

Upscalers (`scale` > 1) are tiled the same way: tiles are cut on the input and blended on the output, where every
position, margin and ramp is `scale` times its input size, so the crossfades stay aligned and seamless.

Defaults: tile=512, overlap=32 covers DnCNN up to depth 32 and the "fast" restorer up to depth 15 (radius 2*depth+1);
pass `overlap=model.receptive_radius` for deeper ones. Models that work on a downsampled grid ("fast": pixel-unshuffle
by 2) are exact only when every tile starts on that grid: pass `align=model.downscale`.

This is the overlap-tile strategy of U-Net (Ronneberger, Fischer, Brox, MICCAI 2015) with a feathered instead of a
hard cut between tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def tile_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, length), evenly spread, neighbours overlapping by >= `overlap`.

    Args:
        length: size of the axis (>= 1).
        tile: tile size (>= 1); a single tile [0, length) when length <= tile.
        overlap: minimum number of pixels shared by neighbouring tiles (0 <= overlap < tile).
    Returns:
        Sorted start offsets; the first is 0 and the last is `length - tile` (flush with the end).
    """
    if length < 1 or tile < 1:
        raise ValueError(f"tile_positions: length={length} and tile={tile} must both be >= 1")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile_positions: overlap={overlap} must satisfy 0 <= overlap < tile={tile}")
    if length <= tile:
        return [0]
    span = length - tile  # the last start
    count = math.ceil(span / (tile - overlap)) + 1
    # Even spacing: consecutive starts differ by floor or ceil of span / (count - 1) <= tile - overlap.
    return [i * span // (count - 1) for i in range(count)]


def feather_window(h: int, w: int, overlap: int, device=None, dtype=None) -> Tensor:
    """Blending weights of one tile with neighbours on all four sides.

    Args:
        h, w: tile size.
        overlap: width of the raised-cosine ramp at each edge; weights are strictly > 0 and 1 in the inside.
        device, dtype: of the result (default: torch's defaults).
    Returns:
        (h, w) weights, the outer product of two 1-D ramps.
    """
    if overlap < 0 or h < 1 or w < 1:
        raise ValueError(f"feather_window: expected h, w >= 1 and overlap >= 0, got h={h}, w={w}, overlap={overlap}")
    rows = _axis_weights(h, 0, overlap, True, True, device, dtype)
    cols = _axis_weights(w, 0, overlap, True, True, device, dtype)
    return rows[:, None] * cols[None, :]  # (h, w)


def tiled_apply(
    fn: Callable[[Tensor], Tensor], image: Tensor, tile: int = 512, overlap: int = 32, *, align: int = 1, scale: int = 1
) -> Tensor:
    """Apply an image-to-image fn tile by tile and blend the tiles into one output.

    Memory: besides one tile and its output, only the (B, C, H, W) output accumulator and the (1, 1, H, W) weight
    accumulator, both float32 on the image's device. Run it under `torch.inference_mode()`: with autograd on, every
    tile's graph would be kept.

    Args:
        fn: maps (B, C, th, tw) to (B, C', scale th, scale tw); may return another dtype.
        image: (B, C, H, W) on any device.
        tile: tile size in pixels; when H <= tile and W <= tile, fn runs once on the whole image.
        overlap: context margin in pixels, >= fn's receptive radius for exact results (see the module docstring).
        align: tile starts are multiples of this (the model's downsampling factor); the last tile may then be up to
            align - 1 pixels longer than `tile`.
        scale: fn's output is this many times larger than its input (an upscaler), >= 1.
    Returns:
        (B, C', scale H, scale W) in the dtype fn returns.
    """
    if align < 1 or scale < 1:
        raise ValueError(f"tiled_apply: align={align}, scale={scale}: expected ints >= 1")
    if overlap < 0 or tile <= 2 * overlap + align - 1:
        raise ValueError(
            f"tiled_apply: expected overlap >= 0 and tile > 2 * overlap + align - 1, "
            f"got tile={tile}, overlap={overlap}, align={align}"
        )
    if image.ndim != 4:
        raise ValueError(f"tiled_apply: expected image of shape (B, C, H, W), got {tuple(image.shape)}")
    height, width = image.shape[-2:]
    if height <= tile and width <= tile:
        return fn(image)

    # Neighbours share 2 * overlap pixels of context plus a crossfade band of up to `overlap` pixels.
    ramp = min(overlap, tile - 2 * overlap - align)
    rows = _axis_tiles(height, tile, overlap, ramp, align, scale, image.device)
    cols = _axis_tiles(width, tile, overlap, ramp, align, scale, image.device)

    out_acc = None
    out_h, out_w = scale * height, scale * width
    weight_acc = torch.zeros(1, 1, out_h, out_w, device=image.device, dtype=torch.float32)  # (1, 1, sH, sW)
    for ys, oys, wy in rows:
        for xs, oxs, wx in cols:
            patch = image[:, :, ys, xs]  # (B, C, th, tw), a view
            out = fn(patch)  # (B, C', s th, s tw)
            expected = (scale * patch.shape[-2], scale * patch.shape[-1])
            if out.ndim != 4 or out.shape[0] != patch.shape[0] or tuple(out.shape[-2:]) != expected:
                raise ValueError(
                    f"tiled_apply: fn mapped a tile of shape {tuple(patch.shape)} to {tuple(out.shape)}; "
                    f"expected the same batch size and spatial size {expected}"
                )
            if out_acc is None:
                out_acc = torch.zeros(
                    *out.shape[:2], out_h, out_w, device=image.device, dtype=torch.float32
                )  # (B, C', sH, sW)
                out_dtype = out.dtype
            window = wy[:, None] * wx[None, :]  # (s th, s tw)
            out_acc[:, :, oys, oxs] += out.to(torch.float32) * window
            weight_acc[:, :, oys, oxs] += window
    # Every pixel lies in some tile's trusted interior, where its weight is > 0, so the division is safe.
    return (out_acc / weight_acc).to(out_dtype)


def _axis_tiles(
    length: int, tile: int, overlap: int, ramp: int, align: int, scale: int, device
) -> list[tuple[slice, slice, Tensor]]:
    """Tiles along one axis as (input slice, output slice, 1-D float32 weights on the output).

    Starts come from `tile_positions` rounded down to multiples of `align` (the extra align - 1 of requested overlap
    absorbs that rounding); the last tile runs to the end of the axis. On the output every length is `scale` times
    the input's.
    """
    starts = sorted({s - s % align for s in tile_positions(length, tile, 2 * overlap + ramp + align - 1)})
    ends = [min(s + tile, length) for s in starts[:-1]] + [length]
    last = len(starts) - 1
    return [
        (
            slice(s, e),
            slice(scale * s, scale * e),
            _axis_weights(scale * (e - s), scale * overlap, scale * ramp, i > 0, i < last, device, torch.float32),
        )
        for i, (s, e) in enumerate(zip(starts, ends, strict=True))
    ]


def _axis_weights(n: int, margin: int, ramp: int, low: bool, high: bool, device=None, dtype=None) -> Tensor:
    """1-D weights of length n: on each side flagged as having a neighbour, `margin` zeros then a raised-cosine ramp.

    The ramp value at step k of `ramp` is sin^2(pi (k + 0.5) / (2 ramp)): strictly inside (0, 1), and two ramps of the
    same length facing each other sum to exactly 1 at every pixel, so an aligned crossfade keeps the total weight 1.
    """
    weights = torch.ones(n, device=device, dtype=dtype)
    steps = torch.arange(ramp, dtype=torch.float64)  # on CPU: not every accelerator has float64
    rise = torch.sin(math.pi * (steps + 0.5) / (2 * max(ramp, 1))).square().to(device, weights.dtype)  # (ramp,)
    for side_has_neighbour, flip in ((low, False), (high, True)):
        if not side_has_neighbour:
            continue
        profile = torch.cat([torch.zeros(margin, device=device, dtype=weights.dtype), rise])[:n]
        if flip:
            weights[n - profile.numel() :] = torch.minimum(weights[n - profile.numel() :], profile.flip(0))
        else:
            weights[: profile.numel()] = torch.minimum(weights[: profile.numel()], profile)
    return weights
