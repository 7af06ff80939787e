"""Image bytes <-> float arrays at the data boundary of the pipelines.

`decode` turns the bytes of any image Pillow reads into a `Decoded`: pixels as (H, W, C) float32 in [0, 1] with
C == 1 (gray) or 3 (colour), the alpha channel kept aside untouched, and enough of the source (mode, bit depth,
format) to write the result back in kind with `encode_png`. Every failure on bad bytes is a `DecodeError` with a
short reason ("empty file", "not an image", "truncated JPEG", "too large: ..."), so one bad image among millions
becomes an error row and never a crash.

References: PNG (W3C Recommendation / ISO/IEC 15948:2004) for the 16-bit colour writer, its filter type 2 ("Up")
and its chunk layout; Exif 2.32 (CIPA DC-008-2019), tag 0x0112 "Orientation", for EXIF rotation.

How each Pillow mode is read (`Decoded.mode` keeps the source mode, `bit_depth` the precision kept):

=================  ======  =========  ==================================================================
source mode        C       bit_depth  notes
=================  ======  =========  ==================================================================
1                  1       8          bilevel: 0.0 / 1.0
L, LA, La          1       8          LA/La alpha goes to `alpha`
RGB, RGBX, RGBA,   3       8          RGBA alpha goes to `alpha`; RGBa is un-premultiplied by Pillow
RGBa
P, PA              3       8          palette expanded to RGB even when the palette is all gray, so a
                                      palette image always gives C == 3; tRNS / GIF transparency or a
                                      palette with alpha gives `alpha`
CMYK               3       8          Pillow's CMYK -> RGB (Adobe-inverted JPEG CMYK is un-inverted by
                                      Pillow's JPEG reader); no ICC colour management
YCbCr, LAB, HSV    3       8          Pillow's conversion to RGB
I;16, I;16B,       1       16         value / 65535, exact 16-bit precision
I;16L, I;16N
I                  1       8 or 16    32-bit int: 8 (value / 255) when 0 <= max <= 255, else 16 (value
                                      clipped to [0, 65535], / 65535)
F                  1       16         32-bit float: NaN -> 0, then divided by 1, 255 or 65535 (the
                                      smallest of those >= the largest finite value, else by that
                                      value), then clipped to [0, 1]; 16 because float holds more than
                                      8 bits
=================  ======  =========  ==================================================================

A colour-key transparency (PNG tRNS on 1/L/I/I;16/RGB) becomes a 0/255 uint8 alpha. Pillow itself reads 16-bit
*colour* and gray+alpha PNGs at 8 bits per sample (a 16-bit gray+alpha PNG even comes out as RGBA), so those decode
as 8-bit RGB(A) with bit_depth 8: only 16-bit gray keeps 16 bits. Animated images (GIF, APNG, animated WebP) and
multi-page files (TIFF, MPO) give their first frame. EXIF orientation is applied, so pixels come out upright; an EXIF
block Pillow cannot parse is ignored (the pixels are still good). EPS is refused ("unsupported format: EPS"): Pillow
renders it by running Ghostscript on the file.

`encode_png` writes "L", "LA", "RGB", "RGBA" (8-bit) and "I;16" (16-bit gray) through Pillow. Pillow has no
16-bit colour or 16-bit gray+alpha mode, so those ("LA;16", "RGB;16", "RGBA;16" in `Decoded.out_mode`) are written
here as standard 16-bit PNGs (colour types 4, 2, 6); any PNG reader reads them, Pillow at 8 bits per sample.
"""

from __future__ import annotations

import io
import numbers
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from restoration.errors import UserError

try:  # Intel ISA-L's deflate: the same zlib streams, 2x (28x28) to 6x (256x256) faster than zlib's level 1
    from isal import isal_zlib
except ImportError:  # a platform without its wheels: the standard library's zlib writes the PNGs instead
    isal_zlib = None

DEFAULT_MAX_PIXELS: int = 100_000_000  # ~100 megapixels: 1.2 GB as float32 RGB, about the most one task should hold

_MAX_REASON = 200  # DecodeError reasons are one line of fewer characters than this
_IDAT_CHUNK = 1 << 20  # split the PNG writer's zlib stream into 1 MiB IDAT chunks, as common writers do

# File signatures, to name the format in errors about files Pillow cannot even identify.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
)
# Pillow renders EPS by running Ghostscript on the file: a PostScript interpreter is no place for untrusted bytes,
# and a vector drawing is nothing to restore.
_EXCLUDED_FORMATS = ("EPS",)

# (channels, has alpha) -> mode encode_png writes, per bit depth.
_OUT_MODES = {
    8: {(1, False): "L", (1, True): "LA", (3, False): "RGB", (3, True): "RGBA"},
    16: {(1, False): "I;16", (1, True): "LA;16", (3, False): "RGB;16", (3, True): "RGBA;16"},
}
_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # samples per pixel -> PNG colour type (gray, gray+alpha, RGB, RGBA)


class DecodeError(UserError):
    """Raised for every decoding failure; str(err) is a short human reason, also in `.reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on arrays is ambiguous, so identity equality
class Decoded:
    pixels: np.ndarray  # (H, W, C) float32 in [0, 1], C == 1 (gray) or 3 (colour); C-contiguous
    alpha: np.ndarray | None  # (H, W) uint8 or uint16 alpha kept aside untouched, or None
    mode: str  # the source Pillow mode, e.g. "L", "LA", "RGB", "RGBA", "P", "CMYK", "I;16", "1", "F"
    bit_depth: int  # 8 or 16: the precision kept in `pixels` (16 for 16-bit gray, I above 255, F)
    format: str  # Pillow format name of the source, e.g. "PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"
    icc_profile: bytes | None = None  # the source's ICC profile when it describes `pixels` (see `icc_for`), or None

    def __post_init__(self) -> None:
        p = self.pixels
        if not isinstance(p, np.ndarray) or p.dtype != np.float32 or p.ndim != 3 or p.shape[2] not in (1, 3):
            desc = f"{p.dtype} {p.shape}" if isinstance(p, np.ndarray) else type(p).__name__
            raise ValueError(f"Decoded.pixels is {desc}: expected a float32 (H, W, C) array with C == 1 or 3")
        if self.alpha is not None:
            a = self.alpha
            if not isinstance(a, np.ndarray) or a.dtype not in (np.uint8, np.uint16) or a.shape != p.shape[:2]:
                desc = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(f"Decoded.alpha is {desc}: expected a uint8 or uint16 array of shape {p.shape[:2]}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"Decoded.bit_depth={self.bit_depth!r}: expected 8 or 16")

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def channels(self) -> int:
        return self.pixels.shape[2]

    @property
    def out_mode(self) -> str:
        """The mode `encode_png(pixels, alpha, bit_depth)` writes: L, LA, RGB, RGBA, I;16, LA;16, RGB;16, RGBA;16."""
        return _OUT_MODES[self.bit_depth][(self.channels, self.alpha is not None)]


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode image bytes into float pixels, alpha and source facts.

    The pixel count is checked against `max_pixels` from the header, before any pixel data is decoded, so a
    decompression bomb never allocates. Pillow's global `Image.MAX_IMAGE_PIXELS` is not consulted for that (a
    few Pillow plugins still apply it while loading frames; that failure is reported as "too large" too).

    Args:
        data: the encoded file (PNG, JPEG, GIF, BMP, TIFF, WebP, ... anything Pillow opens). None counts as bad data.
        max_pixels: largest width * height accepted.

    Returns:
        A `Decoded`; see the module docstring for how each source mode maps to channels and bit depth.

    Raises:
        DecodeError: for every kind of bad bytes, with a short reason.
    """
    _check_max_pixels(max_pixels)
    _check_not_empty(data)
    fmt = None
    try:
        with _open(data, max_pixels) as im:
            fmt, mode = im.format, im.mode
            im.load()  # decode now: truncation and corrupt data surface here, as OSError/SyntaxError/...
            _apply_exif_orientation(im)
            pixels, alpha, bit_depth = _arrays_from_image(im)
            icc = icc_for(im.info.get("icc_profile"), mode, pixels.shape[2])
    except (DecodeError, MemoryError):
        raise
    except Exception as exc:  # the boundary: any other failure on bad bytes becomes a DecodeError
        raise DecodeError(_reason(exc, data, fmt)) from exc
    return Decoded(pixels=pixels, alpha=alpha, mode=mode, bit_depth=bit_depth, format=fmt or "unknown", icc_profile=icc)


# ICC.1:2022 (ISO 15076-1) header: bytes 16-19 name the profile's data colour space.
_ICC_SPACES = {1: b"GRAY", 3: b"RGB "}


def icc_for(profile: bytes | None, mode: str, channels: int) -> bytes | None:
    """The ICC profile to carry from a source to its decoded pixels, or None.

    The model works on the samples as stored; the profile says how to show them, so it travels with them unchanged
    (a Display P3 or Adobe RGB photo written back without it would be shown as sRGB, its colours shifted). It is kept
    only where it still describes the pixels: its colour space must be that of the output (GRAY for one channel, RGB
    for three), and the source must not have been converted from another space (CMYK, YCbCr, LAB, HSV).

    Args:
        profile: the source's embedded profile (Pillow's `info["icc_profile"]`), or None.
        mode: the source's Pillow mode.
        channels: channels of the decoded pixels, 1 or 3.
    Returns:
        The profile bytes, or None.
    """
    if not profile or len(profile) < 128 or mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return None
    return bytes(profile) if profile[16:20] == _ICC_SPACES.get(channels) else None


def image_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header only, with the same errors as `decode` for non-images and bombs.

    The size is the one `decode` returns: swapped for EXIF orientations 5-8 when the EXIF block sits in the header
    (JPEG, WebP, TIFF, PNG with eXIf before the pixel data). Truncated pixel data is not detected here.

    Args:
        data: the encoded file.
        max_pixels: largest width * height accepted.

    Returns:
        (width, height) in pixels.

    Raises:
        DecodeError: empty file, not an image, too large, or a header Pillow cannot parse.
    """
    _check_max_pixels(max_pixels)
    _check_not_empty(data)
    fmt = None
    try:
        with _open(data, max_pixels) as im:
            fmt = im.format
            width, height = im.size
            return (height, width) if _header_orientation(im) in (5, 6, 7, 8) else (width, height)
    except (DecodeError, MemoryError):
        raise
    except Exception as exc:
        raise DecodeError(_reason(exc, data, fmt)) from exc


def to_uint(pixels: np.ndarray, bit_depth: int) -> np.ndarray:
    """Quantise float pixels in [0, 1] to unsigned integers: clip, scale by 2**bit_depth - 1, round half to even.

    Args:
        pixels: float array of any shape; values outside [0, 1] (and +-inf) are clipped, NaN is an error.
        bit_depth: 8 (uint8) or 16 (uint16).

    Returns:
        uint8 or uint16 array of the same shape.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth={bit_depth!r}: expected 8 or 16")
    pixels = np.asarray(pixels)
    if not np.issubdtype(pixels.dtype, np.floating):
        raise ValueError(f"pixels have dtype {pixels.dtype}: expected floats in [0, 1]")
    nan_count = int(np.count_nonzero(np.isnan(pixels)))
    if nan_count:
        raise ValueError(f"pixels contain {nan_count} NaN values: expected finite floats in [0, 1]")
    if pixels.dtype.itemsize < 4:
        pixels = pixels.astype(np.float32)  # float16 cannot hold 65535
    scaled = np.clip(pixels, 0.0, 1.0)  # a new array, scaled in place
    scaled *= 2**bit_depth - 1
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8 if bit_depth == 8 else np.uint16)


def encode_png(
    pixels: np.ndarray,
    alpha: np.ndarray | None = None,
    bit_depth: int = 8,
    compress_level: int = 1,
    icc_profile: bytes | None = None,
) -> bytes:
    """Encode float pixels (and an optional alpha) as PNG bytes.

    decode(encode_png(x)) gives x back exactly when x holds multiples of 1/255 (8-bit) or 1/65535 (16-bit gray).

    Args:
        pixels: (H, W, C) or (H, W) float in [0, 1], C == 1 or 3; clipped and rounded by `to_uint`. Samples already
            quantised by `to_uint` (uint8 for 8-bit output, uint16 for 16-bit) are written as they are.
        alpha: (H, W) uint8 or uint16, attached unchanged when its depth matches the output; a uint16 alpha on 8-bit
            output is scaled round(a / 257), a uint8 alpha on 16-bit output a * 257 (both exact on 0 and the maximum).
        bit_depth: 8, or 16 for a 16-bit PNG (gray through Pillow, gray+alpha and colour through the writer here).
        compress_level: deflate level 0-9 (1-3 through ISA-L, see `_deflate`); 1 by default since in a batch
            pipeline encoding speed matters more than the few percent of size that higher levels save.
        icc_profile: an ICC profile to embed (an iCCP chunk), e.g. `Decoded.icc_profile`; None for none.

    Returns:
        The PNG file as bytes; its mode is `Decoded.out_mode` for these channels, alpha and bit depth.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3) or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"pixels have shape {pixels.shape}: expected (H, W), (H, W, 1) or (H, W, 3) with H, W >= 1")
    if not isinstance(compress_level, numbers.Integral) or not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level={compress_level!r}: expected an int in 0..9")
    if (pixels.dtype, bit_depth) in ((np.uint8, 8), (np.uint16, 16)):
        samples = pixels
    else:
        samples = to_uint(pixels, bit_depth)  # (H, W, C), also validates bit_depth and dtype
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.dtype not in (np.uint8, np.uint16) or alpha.shape != pixels.shape[:2]:
            raise ValueError(
                f"alpha is {alpha.dtype} {alpha.shape}: expected uint8 or uint16 of shape {pixels.shape[:2]}"
            )
        samples = np.concatenate([samples, _alpha_at_depth(alpha, bit_depth)[:, :, None]], axis=2)

    return png_batch(samples[None], int(compress_level), icc_profile)[0]


# -- opening ------------------------------------------------------------------------------------------------------


def _check_max_pixels(max_pixels: int) -> None:
    if not isinstance(max_pixels, numbers.Integral) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ValueError(f"max_pixels={max_pixels!r}: expected a positive int")


def _check_not_empty(data: bytes) -> None:
    if data is None:
        raise DecodeError("no data (None)")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data is {type(data).__name__}: expected bytes")
    if len(data) == 0:
        raise DecodeError("empty file")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image and check its size from the header; no pixel data is decoded (Image.open is lazy)."""
    try:
        # Our own limit replaces Pillow's global one: silence its warning for sizes between MAX_IMAGE_PIXELS and
        # twice that (we decide below), and reopen past its error for sizes beyond, to name the size or allow it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=_formats())
    except Image.DecompressionBombError:
        im = _open_without_pillow_limit(data)
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise DecodeError(
            f"too large: {width}×{height} ({_megapixels(width * height)} > limit {_megapixels(max_pixels)})"
        )
    return im


def _open_without_pillow_limit(data: bytes) -> Image.Image:
    """What Image.open does (try each registered format whose prefix test accepts the data), minus its bomb check."""
    prefix = bytes(data[:16])
    for name in _formats():
        factory, accept = Image.OPEN[name]
        accepted = accept is None or accept(prefix)
        if accepted and not isinstance(accepted, str):  # a str is Pillow's "recognised but unsupported" message
            try:
                return factory(io.BytesIO(data), "")
            except (SyntaxError, IndexError, TypeError, struct.error):  # the errors Image.open skips a format on
                continue
    raise UnidentifiedImageError("cannot identify image file")


def _formats() -> list[str]:
    """Every format Pillow reads but EPS, common ones first (the order Image.open tries them in)."""
    Image.preinit()  # registers BMP, GIF, JPEG, PPM, PNG first; both calls return at once after the first time
    Image.init()
    return [name for name in Image.ID if name not in _EXCLUDED_FORMATS]


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.1f} MP" if n >= 100_000 else f"{n} px"


def _reason(exc: Exception, data: bytes, fmt: str | None) -> str:
    """A short, one-line reason for a failure of Pillow on `data`."""
    fmt = fmt or _sniff(data)
    message = " ".join(str(exc).split())
    if isinstance(exc, Image.DecompressionBombError):
        return _clip(f"too large: Pillow refused to decode it ({message})")
    if isinstance(exc, EOFError) or "truncat" in message.lower():
        return f"truncated {fmt}" if fmt else "truncated file"
    if isinstance(exc, UnidentifiedImageError):
        if fmt in _EXCLUDED_FORMATS:
            return f"unsupported format: {fmt} (not decoded: it needs an external interpreter)"
        return f"truncated or corrupt {fmt} header" if fmt else "not an image"
    return _clip(f"{type(exc).__name__}: {message}")


def _sniff(data: bytes) -> str | None:
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _clip(text: str) -> str:
    return text if len(text) < _MAX_REASON else text[: _MAX_REASON - 2] + "…"


# -- orientation --------------------------------------------------------------------------------------------------


def _apply_exif_orientation(im: Image.Image) -> None:
    """Rotate/flip a loaded image in place so it is upright (Exif tag 0x0112); unparsable EXIF is ignored."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except MemoryError:
        raise
    except Exception:  # a corrupt EXIF block says nothing reliable about orientation; the pixels are still good
        pass


def _header_orientation(im: Image.Image) -> int:
    """Exif orientation (1-8) readable without decoding pixels, else 1."""
    if im.format == "TIFF":
        return 1  # Pillow's TIFF reader applies the orientation itself: its size is already the upright one
    if im.format == "PNG" and "exif" not in im.info:
        return 1  # PNG's getexif() would decode the whole image to look for an eXIf chunk after the pixel data
    try:
        return int(im.getexif().get(0x0112, 1))
    except MemoryError:
        raise
    except Exception:
        return 1


# -- modes --------------------------------------------------------------------------------------------------------


def _arrays_from_image(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Loaded Pillow image -> (pixels (H, W, C) float32 in [0, 1], alpha (H, W) uint8 or None, bit depth)."""
    mode = im.mode
    alpha = None
    bit_depth = 8
    if mode in ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # "1" as L (0 / 255), the scale Pillow also gives its transparency key in.
        raw = np.asarray(im.convert("L") if mode == "1" else im)  # (H, W): uint8, int32, uint16 (any order), float32
        if "transparency" in im.info and mode != "F":
            # Colour-key transparency (PNG tRNS): pixels equal to the key are fully transparent.
            alpha = np.where(raw == im.info["transparency"], 0, 255).astype(np.uint8)
        if mode == "F":
            pixels, bit_depth = _float_to_unit(raw), 16
        elif mode == "I":
            peak = int(raw.max())
            bit_depth = 8 if raw.min() >= 0 and peak <= 255 else 16
            pixels = np.clip(raw, 0, 2**bit_depth - 1).astype(np.float32)
            pixels /= 2**bit_depth - 1
        elif mode.startswith("I;16"):
            pixels, bit_depth = raw.astype(np.float32), 16
            pixels /= 65535
        else:
            pixels = raw.astype(np.float32)
            pixels /= 255
        pixels = pixels[:, :, None]
    elif mode in ("LA", "La"):
        raw = np.asarray(im if mode == "LA" else im.convert("LA"))  # (H, W, 2) uint8
        pixels = raw[:, :, :1].astype(np.float32) / 255
        alpha = np.ascontiguousarray(raw[:, :, 1])
    elif mode in ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        has_alpha = mode in ("RGBA", "RGBa", "PA") or (mode == "P" and im.has_transparency_data)
        has_key = mode == "RGB" and "transparency" in im.info  # RGB colour key: Pillow turns it into alpha
        target = "RGBA" if has_alpha or has_key else "RGB"
        raw = np.asarray(im if mode == target else im.convert(target))  # (H, W, 3|4) uint8
        pixels = raw[:, :, :3].astype(np.float32) / 255
        if target == "RGBA":
            alpha = np.ascontiguousarray(raw[:, :, 3])
    else:
        raise DecodeError(f"unsupported mode: {mode}")
    return np.ascontiguousarray(pixels, dtype=np.float32), alpha, bit_depth


def _float_to_unit(raw: np.ndarray) -> np.ndarray:
    """32-bit float samples -> [0, 1]: NaN -> 0, divide by the smallest of 1, 255, 65535 that covers the data."""
    finite = np.isfinite(raw)
    peak = float(raw.max(where=finite, initial=0.0))
    scale = next((s for s in (1.0, 255.0, 65535.0) if peak <= s), peak)
    pixels = np.nan_to_num(raw, nan=0.0)  # a copy; +-inf become +-float32 max, which the clip below maps to 1 / 0
    pixels /= scale
    return np.clip(pixels, 0.0, 1.0, out=pixels)


# -- 16-bit PNG writer --------------------------------------------------------------------------------------------


def _alpha_at_depth(alpha: np.ndarray, bit_depth: int) -> np.ndarray:
    if bit_depth == 8 and alpha.dtype == np.uint16:
        return ((alpha.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(a * 255 / 65535)
    if bit_depth == 16 and alpha.dtype == np.uint8:
        return alpha.astype(np.uint16) * 257  # 0 -> 0, 255 -> 65535
    return alpha


def png_batch(samples: np.ndarray, compress_level: int = 1, icc_profile: bytes | None = None) -> list[bytes]:
    """(N, H, W, S) uint8 or uint16 samples -> N PNG files, each the bytes `_png` writes for its image: one filter
    pass and one header for the whole batch, so a batch of small images (a generator's 64 of 28x28) spends its time
    in deflate, not in per-image NumPy calls. Filter "Up" on every row: Pillow writes 8-bit and 16-bit gray too, but
    this is about 2x faster at every size (48 vs 119 us for 28x28, 1.5 vs 3.4 ms for 256x256 gray, both with zlib)
    for files about 2% larger than its adaptive filters make; Pillow cannot write 16-bit colour at all. `icc_profile`, when given, is embedded in every file (iCCP)."""
    count, height, width, spp = samples.shape
    bit_depth = 16 if samples.dtype == np.uint16 else 8
    rows = samples.astype(">u2") if bit_depth == 16 else np.ascontiguousarray(samples)
    rows = rows.reshape(count, height, -1).view(np.uint8)  # (N, H, W*S*bytes) big-endian bytes
    # Filter type 2 ("Up"): Filt(x) = Orig(x) - Orig(b) mod 256, b the byte above; the row above row 0 is zeros.
    filtered = np.empty((count, height, rows.shape[2] + 1), np.uint8)
    filtered[:, :, 0] = 2
    filtered[:, 0, 1:] = rows[:, 0]
    np.subtract(rows[:, 1:], rows[:, :-1], out=filtered[:, 1:, 1:])  # uint8 arithmetic wraps, i.e. mod 256
    # IHDR: width, height, bit depth, colour type, compression 0, filter method 0, no interlace.
    head = b"\x89PNG\r\n\x1a\n" + _chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, _PNG_COLOR_TYPE[spp], 0, 0, 0)
    )
    if icc_profile:
        # iCCP (before IDAT): profile name (Latin-1, 1-79 bytes), NUL, compression method 0, zlib stream.
        head += _chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc_profile))
    tail = _chunk(b"IEND", b"")
    files = []
    for image in filtered:
        stream = _deflate(image.reshape(-1), compress_level)
        idat = [_chunk(b"IDAT", stream[i : i + _IDAT_CHUNK]) for i in range(0, len(stream), _IDAT_CHUNK)]
        files.append(b"".join([head, *idat, tail]))
    return files


def _deflate(data: np.ndarray, level: int) -> bytes:
    """A zlib stream of `data`: ISA-L for the fast levels 1-3 (measured on this project's images: 11 vs 24 us for a
    filtered 28x28, 0.34 vs 1.95 ms for a 256x256 photo, files no larger than zlib's level 1 makes), zlib for level
    0 (stored) and for 4-9."""
    if isal_zlib is not None and 1 <= level <= 3:
        return isal_zlib.compress(data, level)
    return zlib.compress(data, level)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    # length, type, data, CRC-32 over type + data
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resize(pixels: np.ndarray, width: int, height: int, method: str = "bicubic") -> np.ndarray:
    """Resize (H, W) or (H, W, C) samples with a Pillow filter (`RESAMPLING`; widened when shrinking, as MATLAB's
    imresize does), per channel in 32-bit float: no 8-bit rounding and no clipping of the filter's overshoot.
    Returns float32 of shape (height, width[, C]) on the input's scale."""
    planes = pixels[..., None] if pixels.ndim == 2 else pixels
    out = np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(planes[..., i], np.float32), mode="F").resize(
                    (width, height), RESAMPLING[method]
                )
            )
            for i in range(planes.shape[-1])
        ],
        axis=-1,
    )
    return out[..., 0] if pixels.ndim == 2 else out


def from_raw(buf: bytes, h: int, w: int, c: int) -> np.ndarray:
    """Raw pixel bytes (as the pipelines' stages pass them) as an (H, W, C) view: uint8, uint16 or float32, as the
    length says."""
    dtype = {1: np.uint8, 2: np.uint16, 4: np.float32}[len(buf) // (h * w * c)]
    return np.frombuffer(buf, dtype=dtype).reshape(h, w, c)


def as_float(pixels: np.ndarray) -> np.ndarray:
    """Pixels as float32 in [0, 1] (integer samples scaled by their maximum; float32 returned as it is)."""
    return pixels if pixels.dtype == np.float32 else into_float(pixels, np.empty(pixels.shape, np.float32))


def into_float(pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Write pixels into the float32 array `out` as values in [0, 1], without temporaries; returns `out`."""
    if pixels.dtype == np.float32:
        out[...] = pixels
    else:
        np.multiply(pixels, np.float32(1 / np.iinfo(pixels.dtype).max), out=out)
    return out
