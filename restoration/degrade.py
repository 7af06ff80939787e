"""Seeded image degradations as pure functions, and the spec strings that chain them.

Every function takes a float32 image of shape (H, W, C), C in {1, 3}, values in [0, 1], and returns a new float32
array of the same shape, except `bicubic_down` (spec step `lr:F`), which makes the low-resolution input of
super-resolution: (H // F, W // F, C) after cropping to a multiple of F (`modcrop`). Random functions take an explicit ``rng: np.random.Generator``; nothing reads global state,
so ``(image, spec, seed)`` always gives the same degraded image on any worker.

The set of operators follows the classical degradation model used by BasicSR's ``degradations.py`` and
Real-ESRGAN (Wang et al., "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data",
ICCVW 2021): blur, downsampling, noise and JPEG compression, applied in a chosen order. Additive Gaussian noise
follows the DnCNN protocol (Zhang et al., "Beyond a Gaussian Denoiser", IEEE TIP 2017): sigma on the 0-255 scale,
added in float, not clipped. Shot noise is the Poisson part of the Poissonian-Gaussian model of Foi et al.,
"Practical Poissonian-Gaussian Noise Modeling and Fitting for Single-Image Raw-Data", IEEE TIP 2008.

Spec strings chain steps in order, e.g. ``"blur:2,noise:10"`` blurs first and then adds noise; see ``SPEC_HELP``.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from restoration import codec, masks
from restoration.errors import UserError

# --------------------------------------------------------------------------------------------------------------------
# Helpers


def _check_image(image: np.ndarray) -> np.ndarray:
    """Return `image` as a float32 (H, W, C) array, or raise naming what was wrong."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image has shape {image.shape}: expected (H, W, C) with C in {{1, 3}}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image has dtype {image.dtype}: expected a float array with values in [0, 1]")
    return image.astype(np.float32, copy=False)


def _filter(image: np.ndarray, kernels: list[np.ndarray]) -> np.ndarray:
    """Correlate every channel with `kernels` in sequence (2-D, odd sizes), reflect padding, same-size output."""
    ph = sum(k.shape[0] // 2 for k in kernels)
    pw = sum(k.shape[1] // 2 for k in kernels)
    # numpy's "reflect" mirrors about the edge pixel (d c b | a b c d | c b a) and, unlike torch's, also works when
    # the pad is wider than the image.
    out = np.pad(image, ((ph, ph), (pw, pw), (0, 0)), mode="reflect")
    for k in kernels:
        # A sum of shifted slices, one per non-zero tap ("valid" correlation). The kernels are small and sparse
        # (separable Gaussian rows/columns, motion lines); on CPU this beats torch's conv2d for one input channel
        # several times over. All kernels here are point-symmetric, so correlation equals convolution.
        oh, ow = out.shape[0] - k.shape[0] + 1, out.shape[1] - k.shape[1] + 1
        acc = np.zeros((oh, ow, out.shape[2]), dtype=np.float32)
        for dy, dx in zip(*np.nonzero(k), strict=True):
            acc += k[dy, dx] * out[dy : dy + oh, dx : dx + ow]
        out = acc
    return out


def _gaussian_kernel1d(sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(3.0 * sigma))  # +-3 sigma holds 99.7% of the mass
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _motion_kernel(length: int, angle: float) -> np.ndarray:
    """Rasterised centred segment `length` px long at `angle` degrees, normalised to sum 1."""
    size = length if length % 2 == 1 else length + 1  # odd, so the kernel has a centre pixel
    centre = size // 2
    theta = math.radians(angle)
    # Rows grow downwards, so a positive angle turns the segment counter-clockwise as seen on screen.
    dx, dy = math.cos(theta), -math.sin(theta)
    # 16 samples per pixel at the midpoints of equal steps over [-length/2, length/2], each added to its nearest
    # pixel: at angle 0 an odd length gives a row of `length` equal weights, an even one [1/2, 1, ..., 1, 1/2].
    n = 16 * length
    t = (np.arange(n) + 0.5) * (length / n) - length / 2
    x = np.clip(np.rint(centre + t * dx).astype(int), 0, size - 1)
    y = np.clip(np.rint(centre + t * dy).astype(int), 0, size - 1)
    k = np.zeros((size, size))
    np.add.at(k, (y, x), 1.0)
    # The samples are symmetric about the centre, so the kernel is point-symmetric: correlation == convolution.
    return (k / k.sum()).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Degradations


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add white Gaussian noise N(0, (sigma/255)^2), not clipped (the DnCNN/KAIR denoising protocol).

    Args:
        image: float (H, W, C) in [0, 1].
        sigma: standard deviation on the 0-255 scale, >= 0 (25 means 25/255 on the [0, 1] scale).
        rng: source of the noise.
    Returns:
        float32 (H, W, C); values may fall outside [0, 1].
    """
    image = _check_image(image)
    if not sigma >= 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma={sigma!r}: expected a finite number >= 0")
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma / 255.0)
    return image + noise


def poisson_noise(image: np.ndarray, peak: float, rng: np.random.Generator) -> np.ndarray:
    """Shot noise: each value becomes Poisson(image * peak) / peak.

    `peak` is the expected photon count of a white pixel, so lower peaks mean darker scenes and stronger noise
    (the signal-to-noise ratio of a pixel of value v is sqrt(v * peak)). Negative inputs count as 0 photons.

    Args:
        image: float (H, W, C) in [0, 1].
        peak: photons at white, > 0.
        rng: source of the noise.
    Returns:
        float32 (H, W, C); values are >= 0 and may exceed 1 (not clipped, like additive noise).
    """
    image = _check_image(image)
    if not peak > 0 or not math.isfinite(peak):
        raise ValueError(f"peak={peak!r}: expected a finite number > 0")
    photons = rng.poisson(np.clip(image, 0.0, None).astype(np.float64) * peak)
    return (photons / peak).astype(np.float32)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Isotropic Gaussian blur: separable kernel of radius ceil(3 sigma), reflect padding.

    Args:
        image: float (H, W, C).
        sigma: standard deviation in pixels, >= 0 (0 returns a clipped copy).
    Returns:
        float32 (H, W, C) clipped to [0, 1].
    """
    image = _check_image(image)
    if not sigma >= 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma={sigma!r}: expected a finite number >= 0")
    if sigma == 0:
        return np.clip(image, 0.0, 1.0)
    k = _gaussian_kernel1d(sigma)
    return np.clip(_filter(image, [k[None, :], k[:, None]]), 0.0, 1.0)


def motion_blur(image: np.ndarray, length: int, angle: float = 0.0) -> np.ndarray:
    """Linear motion blur: average along a straight line of `length` px at `angle` degrees, reflect padding.

    Args:
        image: float (H, W, C).
        length: length of the motion in pixels, an integer >= 1 (1 is the identity).
        angle: direction in degrees, counter-clockwise from the +x axis as seen on screen (0 = horizontal).
    Returns:
        float32 (H, W, C) clipped to [0, 1].
    """
    image = _check_image(image)
    if int(length) != length or length < 1:
        raise ValueError(f"length={length!r}: expected an integer >= 1")
    if not math.isfinite(angle):
        raise ValueError(f"angle={angle!r}: expected a finite number of degrees")
    return np.clip(_filter(image, [_motion_kernel(int(length), float(angle))]), 0.0, 1.0)


def jpeg(image: np.ndarray, quality: int, subsampling: bool = True) -> np.ndarray:
    """Round trip through Pillow's JPEG encoder (8-bit, so values are quantised to multiples of 1/255).

    Args:
        image: float (H, W, C) in [0, 1]; 1 channel encodes as grayscale JPEG, 3 as YCbCr.
        quality: JPEG quality, an integer 1..100 (Pillow advises <= 95; 100 still quantises).
        subsampling: for colour, 4:2:0 chroma subsampling as in most real JPEG files when True, 4:4:4 when False.
    Returns:
        float32 (H, W, C) in [0, 1].
    """
    image = _check_image(image)
    if int(quality) != quality or not 1 <= quality <= 100:
        raise ValueError(f"quality={quality!r}: expected an integer in 1..100")
    u8 = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    pil = Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8)
    buf = io.BytesIO()
    # Pillow's subsampling codes: 0 = 4:4:4, 2 = 4:2:0.
    pil.save(buf, format="JPEG", quality=int(quality), subsampling=2 if subsampling else 0)
    buf.seek(0)
    with Image.open(buf) as decoded:
        out = np.asarray(decoded.convert(pil.mode), dtype=np.float32) / 255.0
    return out.reshape(image.shape)


def downscale(image: np.ndarray, factor: float) -> np.ndarray:
    """Bicubic downscale by `factor`, then bicubic back up to the original size.

    The output keeps the input size so a same-size restorer can undo it (the "bicubic" super-resolution
    degradation seen through a restorer). Both resizes run per channel in Pillow mode "F" (32-bit float), so
    there is no 8-bit quantisation; Pillow's bicubic (a = -0.5) widens its support when shrinking, which
    antialiases like MATLAB's imresize.

    Args:
        image: float (H, W, C).
        factor: scale factor > 1; the low-resolution size is round(H / factor) x round(W / factor), at least 1 px.
    Returns:
        float32 (H, W, C) clipped to [0, 1].
    """
    image = _check_image(image)
    if not factor > 1 or not math.isfinite(factor):
        raise ValueError(f"factor={factor!r}: expected a finite number > 1")
    h, w = image.shape[:2]
    small = (max(1, round(w / factor)), max(1, round(h / factor)))  # Pillow sizes are (width, height)
    channels = []
    for c in range(image.shape[2]):
        pil = Image.fromarray(np.ascontiguousarray(image[..., c]))
        up = pil.resize(small, Image.Resampling.BICUBIC).resize((w, h), Image.Resampling.BICUBIC)
        channels.append(np.asarray(up, dtype=np.float32))
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def modcrop(image: np.ndarray, factor: int) -> np.ndarray:
    """Crop the bottom/right of `image` to a multiple of `factor` in both sides ("modcrop" of the SR literature).

    Args:
        image: array (H, W, ...) with H, W >= factor.
        factor: integer >= 1.
    Returns:
        A view of shape (H - H % factor, W - W % factor, ...).
    """
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor={factor!r}: expected an integer >= 1")
    factor = int(factor)
    h, w = image.shape[:2]
    if h < factor or w < factor:
        raise ValueError(f"image of {h}x{w} pixels is smaller than the scale factor {factor}")
    return image[: h - h % factor, : w - w % factor]


def bicubic_down(image: np.ndarray, factor: int) -> np.ndarray:
    """Super-resolution input: modcrop, then antialiased bicubic downscale by an integer `factor` (spec `lr:F`).

    Pillow's bicubic (a = -0.5) widens its kernel by `factor` when shrinking, as MATLAB's imresize does, and runs per
    channel in mode "F" (32-bit float), so there is no 8-bit quantisation and no clipping (the overshoot of the
    bicubic kernel is kept, as in MATLAB before its uint8 cast).

    Args:
        image: float (H, W, C), H and W >= factor.
        factor: integer >= 1 (1 returns a copy).
    Returns:
        float32 (H // factor, W // factor, C).
    """
    image = modcrop(_check_image(image), factor)
    factor = int(factor)
    h, w = image.shape[0] // factor, image.shape[1] // factor
    if factor == 1:
        return image.copy()
    return codec.resize(image, w, h)


def missing_pixels(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Set exactly round(fraction * H * W) randomly chosen pixels to 0 in all channels.

    Args:
        image: float (H, W, C).
        fraction: share of pixels to drop, in [0, 1).
        rng: chooses the pixels.
    Returns:
        float32 (H, W, C) clipped to [0, 1].
    """
    return _missing(image, fraction, rng)[0]


def _missing(image: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = _check_image(image)
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction={fraction!r}: expected a number in [0, 1)")
    h, w, c = image.shape
    out = np.clip(image, 0.0, 1.0).reshape(h * w, c)  # np.clip returns a new array, safe to write into
    mask = np.zeros(h * w, bool)
    mask[rng.choice(h * w, size=round(fraction * h * w), replace=False)] = True
    out[mask] = 0.0
    return out.reshape(h, w, c), mask.reshape(h, w)


def scratches(image: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `count` random straight scratches, 1-3 px wide, each either white (1.0) or black (0.0).

    Each scratch starts at a uniform random point, runs in a uniform random direction and is 25%-100% of the
    longer image side long (clipped at the border), like scratches on a scanned print.

    Args:
        image: float (H, W, C).
        count: number of scratches, an integer >= 0.
        rng: places the scratches.
    Returns:
        float32 (H, W, C) clipped to [0, 1].
    """
    return _scratches(image, count, rng)[0]


def _scratches(image: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = _check_image(image)
    if int(count) != count or count < 0:
        raise ValueError(f"count={count!r}: expected an integer >= 0")
    h, w = image.shape[:2]
    # 128 marks "untouched"; scratches are drawn as 255 (white) or 0 (black), later ones over earlier ones.
    canvas = Image.new("L", (w, h), 128)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(count)):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        theta = rng.uniform(0, math.pi)
        length = rng.uniform(0.25, 1.0) * max(h, w)
        x1, y1 = x0 + length * math.cos(theta), y0 + length * math.sin(theta)
        width = int(rng.integers(1, 4))
        fill = 255 if rng.random() < 0.5 else 0
        draw.line([(x0, y0), (x1, y1)], fill=fill, width=width)
    mask = np.asarray(canvas)
    out = np.clip(image, 0.0, 1.0)
    out[mask == 255] = 1.0
    out[mask == 0] = 0.0
    return out, mask != 128


def holes(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Cut free-form brush-stroke holes covering about `fraction` of the image (`masks.free_form`), set to 0.

    Args:
        image: float (H, W, C).
        fraction: target coverage in [0, 1).
        rng: draws the strokes.
    Returns:
        float32 (H, W, C) clipped to [0, 1], 0 in the holes.
    """
    return _holes(image, fraction, rng)[0]


def _holes(image: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = _check_image(image)
    mask = masks.free_form(image.shape[0], image.shape[1], fraction, rng)
    out = np.clip(image, 0.0, 1.0)
    out[mask] = 0.0
    return out, mask


def dust_spots(image: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Add `count` dust spots (`masks.spots`: filled ellipses of 1-4 px semi-axes), each white (1.0) or black (0.0).

    Args:
        image: float (H, W, C).
        count: number of spots, an integer >= 0.
        rng: places the spots.
    Returns:
        float32 (H, W, C) clipped to [0, 1].
    """
    return _spots(image, count, rng)[0]


def _spots(image: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = _check_image(image)
    mask, value = masks.spots(image.shape[0], image.shape[1], count, rng)
    out = np.clip(image, 0.0, 1.0)
    out[mask] = value[mask][:, None]
    return out, mask


# --------------------------------------------------------------------------------------------------------------------
# Spec strings


@dataclass(frozen=True)
class Step:
    """One parsed degradation step, e.g. Step("motion", (9.0, 45.0)) for "motion:9:45"."""

    name: str
    args: tuple[float, ...]

    def __str__(self) -> str:
        return ":".join([self.name, *(_format_number(a) for a in self.args)])


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class _Rule:
    usage: str
    args: tuple[tuple[Callable[[float], bool], str], ...]  # (check, what was expected) per argument
    required: int


def _is_int(v: float) -> bool:
    return float(v).is_integer()


_RULES: dict[str, _Rule] = {
    "noise": _Rule("noise:SIGMA", ((lambda v: v >= 0, "a number >= 0"),), 1),
    "poisson": _Rule("poisson:PEAK", ((lambda v: v > 0, "a number > 0"),), 1),
    "blur": _Rule("blur:SIGMA", ((lambda v: v >= 0, "a number >= 0"),), 1),
    "motion": _Rule(
        "motion:LENGTH[:ANGLE]",
        ((lambda v: _is_int(v) and v >= 1, "an integer >= 1"), (lambda v: True, "a number of degrees")),
        1,
    ),
    "jpeg": _Rule("jpeg:QUALITY", ((lambda v: _is_int(v) and 1 <= v <= 100, "an integer in 1..100"),), 1),
    "down": _Rule("down:FACTOR", ((lambda v: v > 1, "a number > 1"),), 1),
    "lr": _Rule("lr:FACTOR", ((lambda v: _is_int(v) and 2 <= v <= 8, "an integer in 2..8"),), 1),
    "missing": _Rule("missing:FRACTION", ((lambda v: 0 <= v < 1, "a number in [0, 1)"),), 1),
    "scratch": _Rule("scratch:COUNT", ((lambda v: _is_int(v) and v >= 0, "an integer >= 0"),), 1),
    "holes": _Rule("holes:FRACTION", ((lambda v: 0 <= v < 1, "a number in [0, 1)"),), 1),
    "spots": _Rule("spots:COUNT", ((lambda v: _is_int(v) and v >= 0, "an integer >= 0"),), 1),
}

_APPLY: dict[str, Callable[[np.ndarray, tuple[float, ...], np.random.Generator], np.ndarray]] = {
    "noise": lambda im, a, rng: gaussian_noise(im, a[0], rng),
    "poisson": lambda im, a, rng: poisson_noise(im, a[0], rng),
    "blur": lambda im, a, rng: gaussian_blur(im, a[0]),
    "motion": lambda im, a, rng: motion_blur(im, int(a[0]), a[1] if len(a) > 1 else 0.0),
    "jpeg": lambda im, a, rng: jpeg(im, int(a[0])),
    "down": lambda im, a, rng: downscale(im, a[0]),
    "lr": lambda im, a, rng: bicubic_down(im, int(a[0])),
}
# Steps that damage some pixels and leave the rest as they were: each returns (image, mask of what it damaged).
_DAMAGE: dict[str, Callable[[np.ndarray, tuple[float, ...], np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "missing": lambda im, a, rng: _missing(im, a[0], rng),
    "scratch": lambda im, a, rng: _scratches(im, int(a[0]), rng),
    "holes": lambda im, a, rng: _holes(im, a[0], rng),
    "spots": lambda im, a, rng: _spots(im, int(a[0]), rng),
}

SPEC_HELP = """\
Degradation spec: comma-separated steps applied left to right, each NAME:ARG[:ARG2].
  noise:SIGMA          additive Gaussian noise, SIGMA on the 0-255 scale, not clipped   (noise:25)
  poisson:PEAK         shot noise, PEAK = photons at white; lower is noisier            (poisson:30)
  blur:SIGMA           isotropic Gaussian blur, SIGMA in pixels                          (blur:2)
  motion:LEN[:ANGLE]   linear motion blur, LEN pixels at ANGLE degrees (default 0)       (motion:9:45)
  jpeg:QUALITY         JPEG round trip, QUALITY 1..100, 4:2:0 chroma for colour          (jpeg:10)
  down:FACTOR          bicubic down by FACTOR > 1 and back up to the same size           (down:2)
  lr:FACTOR            super-resolution input: crop to a multiple of FACTOR (2..8), then
                       bicubic down by FACTOR; the image shrinks, later steps act on it  (lr:4)
  missing:FRACTION     set a FRACTION in [0, 1) of pixels to 0                           (missing:0.3)
  scratch:COUNT        COUNT random 1-3 px scratches, white or black                     (scratch:5)
  holes:FRACTION       free-form brush strokes (6-20 px) covering about FRACTION, set to 0  (holes:0.25)
  spots:COUNT          COUNT dust spots (1-4 px ellipses), white or black                (spots:20)
Example: blur:2,noise:10 blurs, then adds noise; lr:2,noise:5 halves the size, then adds noise.
"" or "none" means no degradation."""


def _check_step(name: str, values: list[float], texts: list[str], spec: str) -> Step:
    rule = _RULES.get(name)
    if rule is None:
        raise UserError(f"unknown degradation {name!r} in spec {spec!r}: expected one of {', '.join(_RULES)}")
    if not rule.required <= len(values) <= len(rule.args):
        raise UserError(
            f"{name} takes {rule.required}..{len(rule.args)} argument(s), got {len(values)} in spec {spec!r}: "
            f"expected {rule.usage}"
        )
    for value, text, (check, expected) in zip(values, texts, rule.args, strict=False):
        if not math.isfinite(value) or not check(value):
            raise UserError(f"bad value {text!r} for {name} in spec {spec!r}: expected {expected}")
    return Step(name, tuple(float(v) for v in values))


def parse_spec(spec: str) -> tuple[Step, ...]:
    """Parse a spec string such as "blur:2,noise:10" into validated steps.

    Args:
        spec: comma-separated NAME:ARG[:ARG2] steps (see SPEC_HELP); "" or "none" for no degradation.
    Returns:
        The steps in application order.
    Raises:
        ValueError naming the bad step or value and what was expected.
    """
    if not isinstance(spec, str):
        raise UserError(f"spec {spec!r}: expected a string such as 'blur:2,noise:10'")
    if spec.strip().lower() in ("", "none"):
        return ()
    steps = []
    for item in spec.split(","):
        name, *texts = [part.strip() for part in item.strip().split(":")]
        if not name:
            raise UserError(f"empty step {item!r} in spec {spec!r}: expected NAME:ARG, e.g. noise:25")
        name = name.lower()
        values = []
        for text in texts:
            try:
                values.append(float(text))
            except ValueError:
                rule = _RULES.get(name)
                expected = rule.args[len(values)][1] if rule and len(values) < len(rule.args) else "a number"
                raise UserError(f"bad value {text!r} for {name} in spec {spec!r}: expected {expected}") from None
        steps.append(_check_step(name, values, texts, spec))
    return tuple(steps)


def format_spec(steps: tuple[Step, ...]) -> str:
    """Canonical spec string of `steps` ("none" when empty), e.g. for the `degradation` column of a run.

    Args:
        steps: parsed steps.
    Returns:
        A string that parse_spec turns back into the same steps.
    """
    return ",".join(str(s) for s in steps) or "none"


def lr_factor(steps: str | tuple[Step, ...]) -> int:
    """The factor by which `steps` shrink an image: the product of their `lr` factors, 1 when there are none.

    Args:
        steps: a spec string or steps from parse_spec.
    Returns:
        An integer >= 1; an upscaler of this scale restores the size (after `modcrop` of the original).
    """
    steps = parse_spec(steps) if isinstance(steps, str) else steps
    return math.prod(int(s.args[0]) for s in steps if s.name == "lr")


def apply(image: np.ndarray, spec: str | tuple[Step, ...], rng: np.random.Generator) -> np.ndarray:
    """Apply the degradations of `spec` in order.

    Args:
        image: float (H, W, C) in [0, 1], C in {1, 3}.
        spec: a spec string (see SPEC_HELP) or steps from parse_spec.
        rng: shared by all random steps, in order; use rng_for(run_seed, key) for per-image reproducibility.
    Returns:
        float32 (H, W, C), or (H // F, W // F, C) after the modcrop of `lr:F` steps (see lr_factor); only noise and
        lr steps leave values outside [0, 1].
    """
    return apply_masked(image, spec, rng)[0]


def apply_masked(
    image: np.ndarray, spec: str | tuple[Step, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """`apply`, also recording which pixels the damage steps (missing, scratch, holes, spots) replaced.

    Returns:
        (degraded image as `apply` gives it, bool (H', W') mask of the damaged pixels at the output's size, or None
        when `spec` has no damage step); after an `lr:F` step a low-resolution pixel is damaged when any pixel of its
        block was.
    """
    image = _check_image(image)
    if isinstance(spec, str):
        steps = parse_spec(spec)
    else:
        steps = tuple(spec)
        text = ",".join(str(s) for s in steps)
        for s in steps:
            _check_step(s.name, [float(a) for a in s.args], [_format_number(a) for a in s.args], text)
    out, mask = image.copy(), None
    for s in steps:
        if s.name in _DAMAGE:
            out, damaged = _DAMAGE[s.name](out, s.args, rng)
            mask = damaged if mask is None else mask | damaged
        else:
            out = _APPLY[s.name](out, s.args, rng)
            if mask is not None and s.name == "lr":
                mask = masks.block_any(mask, int(s.args[0]))
    return out, mask


# --------------------------------------------------------------------------------------------------------------------
# Seeds


def seed_for(run_seed: int, key: str) -> int:
    """Seed for one item of a run, stable across processes, machines and Python versions.

    Uses the first 8 bytes of sha256(f"{run_seed}:{key}"), not Python's salted hash().

    Args:
        run_seed: the run's seed.
        key: the item's key (e.g. the image key).
    Returns:
        A non-negative int < 2**63.
    """
    digest = hashlib.sha256(f"{run_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def rng_for(run_seed: int, key: str) -> np.random.Generator:
    """NumPy generator seeded with seed_for(run_seed, key).

    Args:
        run_seed: the run's seed.
        key: the item's key.
    Returns:
        A fresh np.random.Generator.
    """
    return np.random.default_rng(seed_for(run_seed, key))
