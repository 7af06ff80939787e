"""restoration.codec on real photos (scikit-image) and files built here with Pillow, one per mode and failure."""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from restoration import codec
from restoration.codec import DEFAULT_MAX_PIXELS, Decoded, DecodeError, decode, encode_png, image_size, to_uint

REPO = Path(__file__).resolve().parents[1]


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _astronaut(height: int = 48, width: int = 64) -> np.ndarray:
    return skimage.data.astronaut()[100 : 100 + height, 180 : 180 + width]  # (H, W, 3) uint8, face and suit


def _camera(height: int = 48, width: int = 64) -> np.ndarray:
    return skimage.data.camera()[100 : 100 + height, 200 : 200 + width]  # (H, W) uint8


def _patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with IHDR claiming another size (CRC fixed), the pixel data left as it was."""
    assert png[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + png[24:29]
    return png[:8] + struct.pack(">I", 13) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + png[33:]


def _bomb() -> bytes:
    return _patch_png_size(_encode(Image.new("L", (64, 64)), "PNG"), 30000, 30000)


def _read_png_samples(png: bytes) -> tuple[dict, np.ndarray]:
    """A minimal independent PNG reader (non-interlaced) returning the raw samples at full depth."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, payload = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload), f"bad CRC on {kind!r}"
        chunks.append((kind, payload))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert interlace == 0
    spp = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    bpp = spp * depth // 8
    raw = np.frombuffer(zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT")), np.uint8)
    raw = raw.reshape(height, 1 + width * bpp).tolist()
    rows = [[0] * (width * bpp)]  # the zero row above the first one
    for line in raw:
        kind, line, up, out = line[0], line[1:], rows[-1], []
        for x, value in enumerate(line):
            a = out[x - bpp] if x >= bpp else 0  # left
            b = up[x]  # above
            c = up[x - bpp] if x >= bpp else 0  # above left
            if kind == 0:
                predictor = 0
            elif kind == 1:
                predictor = a
            elif kind == 2:
                predictor = b
            elif kind == 3:
                predictor = (a + b) // 2
            else:  # Paeth
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                predictor = a if pa <= pb and pa <= pc else b if pb <= pc else c
            out.append((value + predictor) % 256)
        rows.append(out)
    rows = np.array(rows[1:], np.uint8)
    samples = rows.view(">u2") if depth == 16 else rows
    header = {"width": width, "height": height, "bit_depth": depth, "color_type": color_type}
    return header, samples.reshape(height, width, spp).astype(np.uint16 if depth == 16 else np.uint8)


# -- every mode ---------------------------------------------------------------------------------------------------


def test_rgb_png_decodes_exactly_and_round_trips():
    src = _astronaut()
    d = decode(_encode(Image.fromarray(src), "PNG"))
    assert (d.mode, d.format, d.bit_depth, d.alpha, d.out_mode) == ("RGB", "PNG", 8, None, "RGB")
    assert d.pixels.dtype == np.float32 and d.pixels.flags.c_contiguous
    assert (d.height, d.width, d.channels) == (48, 64, 3)
    np.testing.assert_array_equal(to_uint(d.pixels, 8), src)
    again = decode(encode_png(d.pixels))
    np.testing.assert_array_equal(again.pixels, d.pixels)


@pytest.mark.parametrize(
    "mode, fmt, channels",
    [("L", "PNG", 1), ("L", "BMP", 1), ("RGB", "BMP", 3), ("RGB", "TIFF", 3), ("RGB", "WEBP", 3), ("L", "TIFF", 1)],
)
def test_lossless_formats_decode_exactly(mode, fmt, channels):
    src = np.asarray(Image.fromarray(_astronaut()).convert(mode))
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    d = decode(_encode(Image.fromarray(src), fmt, **kwargs))
    assert (d.format, d.channels, d.bit_depth, d.alpha) == (fmt, channels, 8, None)
    np.testing.assert_array_equal(to_uint(d.pixels, 8), src.reshape(d.pixels.shape))


def test_rgba_keeps_alpha_aside_untouched():
    rgb = _astronaut()
    alpha = np.linspace(0, 255, rgb.shape[0] * rgb.shape[1]).round().astype(np.uint8).reshape(rgb.shape[:2])
    d = decode(_encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG"))
    assert (d.mode, d.channels, d.out_mode) == ("RGBA", 3, "RGBA")
    assert d.alpha.dtype == np.uint8 and d.alpha.flags.c_contiguous
    np.testing.assert_array_equal(d.alpha, alpha)
    np.testing.assert_array_equal(to_uint(d.pixels, 8), rgb)  # not premultiplied: colour under alpha 0 survives


def test_la_gives_one_channel_and_alpha():
    gray = _camera()
    alpha = 255 - gray
    d = decode(_encode(Image.fromarray(np.dstack([gray, alpha])), "PNG"))
    assert (d.mode, d.channels, d.bit_depth, d.out_mode) == ("LA", 1, 8, "LA")
    np.testing.assert_array_equal(to_uint(d.pixels[:, :, 0], 8), gray)
    np.testing.assert_array_equal(d.alpha, alpha)
    # and back: encode_png attaches the alpha unchanged
    again = decode(encode_png(d.pixels, d.alpha))
    np.testing.assert_array_equal(again.alpha, alpha)
    np.testing.assert_array_equal(again.pixels, d.pixels)


def _palette_image(colors: int = 16) -> tuple[Image.Image, np.ndarray]:
    """A palette image and, looked up by hand, the RGB it stands for."""
    p = Image.fromarray(_astronaut()).quantize(colors)
    palette = np.asarray(p.getpalette()[: 3 * colors], np.uint8).reshape(-1, 3)
    return p, palette[np.asarray(p)]


def test_palette_expands_to_rgb():
    p, expected = _palette_image()
    for fmt in ("PNG", "GIF", "BMP"):
        d = decode(_encode(p, fmt))
        assert (d.mode, d.format, d.channels, d.alpha) == ("P", fmt, 3, None), fmt
        np.testing.assert_array_equal(to_uint(d.pixels, 8), expected, err_msg=fmt)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_alpha(fmt):
    p, expected = _palette_image()
    index = np.asarray(p)
    d = decode(_encode(p, fmt, transparency=3))  # palette entry 3 is transparent (tRNS / GIF graphic control)
    assert (d.mode, d.channels, d.out_mode) == ("P", 3, "RGBA")
    assert (index == 3).any() and (index != 3).any()
    np.testing.assert_array_equal(d.alpha, np.where(index == 3, 0, 255))
    np.testing.assert_array_equal(to_uint(d.pixels, 8)[index != 3], expected[index != 3])


def test_gray_palette_stays_colour():
    gray = Image.fromarray(_camera()).convert("P")  # palette of 256 grays
    d = decode(_encode(gray, "PNG"))
    assert (d.mode, d.channels) == ("P", 3)
    np.testing.assert_array_equal(d.pixels[:, :, 0], d.pixels[:, :, 2])


def test_colour_key_transparency_on_gray_and_rgb():
    gray = _camera()
    key = int(gray[0, 0])
    d = decode(_encode(Image.fromarray(gray), "PNG", transparency=key))
    assert (d.channels, d.out_mode) == (1, "LA")
    np.testing.assert_array_equal(d.alpha, np.where(gray == key, 0, 255))
    rgb = _astronaut()
    key_rgb = tuple(int(v) for v in rgb[0, 0])
    d = decode(_encode(Image.fromarray(rgb), "PNG", transparency=key_rgb))
    assert d.out_mode == "RGBA"
    np.testing.assert_array_equal(d.alpha, np.where((rgb == key_rgb).all(axis=2), 0, 255))


def test_bilevel_becomes_gray_zero_one():
    bits = _camera() > 128
    d = decode(_encode(Image.fromarray(bits), "PNG"))
    assert (d.mode, d.channels, d.bit_depth, d.out_mode) == ("1", 1, 8, "L")
    np.testing.assert_array_equal(d.pixels[:, :, 0], bits.astype(np.float32))


def test_cmyk_jpeg_decodes_to_rgb_close_to_source():
    src = _astronaut(96, 128)
    data = _encode(Image.fromarray(src).convert("CMYK"), "JPEG", quality=95)
    assert b"Adobe" in data[:200]  # Pillow writes Adobe-inverted CMYK: the path that needs un-inverting
    d = decode(data)
    assert (d.mode, d.format, d.channels, d.bit_depth) == ("CMYK", "JPEG", 3, 8)
    error = np.abs(d.pixels - src / 255.0)
    assert error.mean() < 0.02, error.mean()  # an inverted read would be off by ~0.5 on average


@pytest.mark.parametrize("mode", ["YCbCr", "LAB"])
def test_other_colour_spaces_become_rgb(mode):
    src = _astronaut()
    d = decode(_encode(Image.fromarray(src).convert(mode), "TIFF"))
    assert (d.mode, d.channels, d.bit_depth, d.out_mode) == (mode, 3, 8, "RGB")
    assert np.abs(to_uint(d.pixels, 8).astype(int) - src).mean() < 2  # colour-space rounding only


def test_hsv_image_becomes_rgb():
    # No Pillow writer stores HSV, so the mode conversion is checked on the opened image directly.
    src = _astronaut()
    pixels, alpha, bit_depth = codec._arrays_from_image(Image.fromarray(src).convert("HSV"))
    assert pixels.shape == (48, 64, 3) and alpha is None and bit_depth == 8
    assert np.abs(to_uint(pixels, 8).astype(int) - src).max() <= 2


def test_16bit_gray_png_round_trips_exactly():
    rng = np.random.default_rng(0)
    src = (_camera().astype(np.uint16) * 257 + rng.integers(0, 257, (48, 64))).astype(np.uint16)
    src[0, :2] = (0, 65535)
    d = decode(_encode(Image.fromarray(src), "PNG"))
    assert (d.mode, d.channels, d.bit_depth, d.alpha, d.out_mode) == ("I;16", 1, 16, None, "I;16")
    np.testing.assert_array_equal(to_uint(d.pixels, 16)[:, :, 0], src)
    png = encode_png(d.pixels, bit_depth=16)
    again = decode(png)
    assert (again.mode, again.bit_depth) == ("I;16", 16)
    np.testing.assert_array_equal(again.pixels, d.pixels)
    header, samples = _read_png_samples(png)  # and an independent reader sees the same 16-bit samples
    assert (header["bit_depth"], header["color_type"]) == (16, 0)
    np.testing.assert_array_equal(samples[:, :, 0], src)
    assert encode_png(src, bit_depth=16) == png  # uint16 samples are written as they are


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_tiff_keeps_16_bits(mode):
    src = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    image = Image.fromarray(src) if mode == "I;16" else Image.frombytes("I;16B", (64, 48), src.astype(">u2").tobytes())
    d = decode(_encode(image, "TIFF"))
    assert (d.mode, d.channels, d.bit_depth) == (mode, 1, 16)
    np.testing.assert_array_equal(to_uint(d.pixels, 16)[:, :, 0], src)


def test_32bit_int_tiff_picks_its_depth_from_the_values():
    wide = np.arange(48 * 64, dtype=np.int32).reshape(48, 64) * 20 - 100  # -100 .. 61340
    d = decode(_encode(Image.fromarray(wide), "TIFF"))
    assert (d.mode, d.bit_depth) == ("I", 16)
    np.testing.assert_array_equal(to_uint(d.pixels, 16)[:, :, 0], np.clip(wide, 0, 65535))
    narrow = _camera().astype(np.int32)
    d = decode(_encode(Image.fromarray(narrow), "TIFF"))
    assert (d.mode, d.bit_depth) == ("I", 8)
    np.testing.assert_array_equal(to_uint(d.pixels, 8)[:, :, 0], narrow)


def test_float_tiff_scaling_and_clipping():
    unit = np.linspace(-0.25, 1.25, 48 * 64, dtype=np.float32).reshape(48, 64)
    unit[0, 0] = np.nan
    d = decode(_encode(Image.fromarray(unit), "TIFF"))
    assert (d.mode, d.channels, d.bit_depth, d.out_mode) == ("F", 1, 16, "I;16")
    expected = np.clip(np.nan_to_num(unit) / 255, 0, 1)  # largest value 1.25: above 1, within 255, so / 255
    np.testing.assert_allclose(d.pixels[:, :, 0], expected, atol=1e-7)
    in_range = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    d = decode(_encode(Image.fromarray(in_range), "TIFF"))
    np.testing.assert_array_equal(d.pixels[:, :, 0], in_range)  # data in [0, 1] is taken as it is
    eight_bit = _camera().astype(np.float32)
    d = decode(_encode(Image.fromarray(eight_bit), "TIFF"))
    np.testing.assert_array_equal(to_uint(d.pixels, 8)[:, :, 0], _camera())


@pytest.mark.parametrize("orientation, turns", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_comes_out_upright(orientation, turns):
    # Four flat quadrants (stored 48 wide, 32 high) so JPEG loss cannot blur which one went where.
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:16, :24] = (255, 0, 0)
    stored[:16, 24:] = (0, 255, 0)
    stored[16:, :24] = (0, 0, 255)
    stored[16:, 24:] = (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    d = decode(data)
    upright = np.rot90(stored, k=turns)  # orientation 6: stored image is turned 90° counter-clockwise
    assert d.pixels.shape == upright.shape
    assert np.abs(to_uint(d.pixels, 8).astype(int) - upright).mean() < 4
    assert image_size(data) == (d.width, d.height)


def test_exif_orientation_in_tiff_is_applied_once():
    stored = _astronaut()
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(stored), "TIFF", exif=exif)
    d = decode(data)
    np.testing.assert_array_equal(to_uint(d.pixels, 8), np.rot90(stored, k=-1))
    assert image_size(data) == (d.width, d.height) == (48, 64)


def test_one_by_one_image():
    d = decode(_encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    assert d.pixels.shape == (1, 1, 3)
    np.testing.assert_array_equal(to_uint(d.pixels, 8), [[[10, 20, 30]]])
    assert image_size(encode_png(d.pixels)) == (1, 1)
    np.testing.assert_array_equal(decode(encode_png(d.pixels)).pixels, d.pixels)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_gives_its_first_frame(fmt):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (8, 6), c) for c in colours]
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kwargs)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    d = decode(data)
    assert d.pixels.shape == (6, 8, 3)
    np.testing.assert_array_equal(to_uint(d.pixels, 8), np.broadcast_to(colours[0], (6, 8, 3)))


def test_16bit_colour_png_is_read_at_8_bits():
    # Pillow has no 16-bit colour mode: it keeps the high byte of each sample, so decode reports bit depth 8.
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 65536, (6, 5, 3)).astype(np.uint16)
    d = decode(encode_png(samples / 65535.0, bit_depth=16))
    assert (d.mode, d.bit_depth, d.channels) == ("RGB", 8, 3)
    np.testing.assert_array_equal(to_uint(d.pixels, 8), samples >> 8)


# -- encoding -----------------------------------------------------------------------------------------------------


def test_to_uint_clips_and_rounds():
    x = np.array([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 254.5 / 255, 1.0, 2.0, np.inf, -np.inf], np.float32)
    np.testing.assert_array_equal(to_uint(x, 8), [0, 0, 0, 1, 254, 255, 255, 255, 0])  # 254.5 rounds to even
    assert to_uint(x, 8).dtype == np.uint8 and to_uint(x, 16).dtype == np.uint16
    np.testing.assert_array_equal(to_uint(np.float16([1.0, 0.5]), 16), [65535, 32768])  # float16 cannot hold 65535
    levels = np.arange(65536)
    np.testing.assert_array_equal(to_uint((levels / 65535).astype(np.float32), 16), levels)


def test_to_uint_rejects_bad_input():
    with pytest.raises(ValueError, match="2 NaN"):
        to_uint(np.array([0.5, np.nan, np.nan]), 8)
    with pytest.raises(ValueError, match="uint8"):
        to_uint(np.zeros(3, np.uint8), 8)
    with pytest.raises(ValueError, match="bit_depth=12"):
        to_uint(np.zeros(3), 12)


def test_encode_png_accepts_2d_and_clips():
    gray = np.array([[-1.0, 0.0], [0.5, 3.0]])
    d = decode(encode_png(gray))
    assert d.out_mode == "L"
    np.testing.assert_array_equal(to_uint(d.pixels, 8)[:, :, 0], [[0, 0], [128, 255]])


def test_encode_png_16bit_alpha_on_8bit_output_is_scaled():
    alpha16 = np.array([[0, 128, 129, 65535]], np.uint16)
    d = decode(encode_png(np.zeros((1, 4, 3)), alpha16, bit_depth=8))
    np.testing.assert_array_equal(d.alpha, [[0, 0, 1, 255]])  # round(a / 257)


@pytest.mark.parametrize("channels, with_alpha, color_type", [(3, False, 2), (3, True, 6), (1, True, 4)])
def test_16bit_png_writer_keeps_every_bit(channels, with_alpha, color_type):
    rng = np.random.default_rng(2)
    samples = rng.integers(0, 65536, (7, 9, channels)).astype(np.uint16)
    samples[0, 0] = 0
    samples[-1, -1] = 65535
    alpha8 = rng.integers(0, 256, (7, 9)).astype(np.uint8) if with_alpha else None
    png = encode_png(samples / 65535.0, alpha8, bit_depth=16)
    header, read = _read_png_samples(png)
    assert header == {"width": 9, "height": 7, "bit_depth": 16, "color_type": color_type}
    np.testing.assert_array_equal(read[:, :, :channels], samples)
    if with_alpha:
        np.testing.assert_array_equal(read[:, :, channels], alpha8.astype(np.uint16) * 257)
    Image.open(io.BytesIO(png)).load()  # a second, independent reader accepts the file


def test_compress_level_is_honoured():
    photo = skimage.data.astronaut()[:128, :128] / 255.0
    stored = encode_png(photo, compress_level=0)
    fast = encode_png(photo)
    assert len(stored) > 128 * 128 * 3 > len(fast)
    np.testing.assert_array_equal(decode(stored).pixels, decode(fast).pixels)
    header, read = _read_png_samples(encode_png(photo, bit_depth=16, compress_level=0))
    assert read.shape == (128, 128, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pixels": np.zeros((4, 4, 2))}, r"shape \(4, 4, 2\)"),
        ({"pixels": np.zeros((0, 4))}, r"shape \(0, 4, 1\)"),
        ({"pixels": np.zeros((4, 4), np.int64)}, "dtype int64"),
        ({"pixels": np.zeros((4, 4)), "alpha": np.zeros((4, 5), np.uint8)}, r"alpha is uint8 \(4, 5\)"),
        ({"pixels": np.zeros((4, 4)), "alpha": np.zeros((4, 4))}, "alpha is float64"),
        ({"pixels": np.zeros((4, 4)), "bit_depth": 10}, "bit_depth=10"),
        ({"pixels": np.zeros((4, 4)), "compress_level": 10}, "compress_level=10"),
    ],
)
def test_encode_png_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode_png(**kwargs)


@pytest.mark.parametrize(
    "bit_depth, channels, alpha, mode",
    [(8, 1, False, "L"), (8, 1, True, "LA"), (8, 3, False, "RGB"), (8, 3, True, "RGBA"), (16, 1, False, "I;16")],
)
def test_out_mode_is_what_encode_png_writes(bit_depth, channels, alpha, mode):
    pixels = np.full((3, 5, channels), 0.5, np.float32)
    a = np.full((3, 5), 200, np.uint8) if alpha else None
    d = Decoded(pixels=pixels, alpha=a, mode="x", bit_depth=bit_depth, format="PNG")
    assert d.out_mode == mode
    assert Image.open(io.BytesIO(encode_png(d.pixels, d.alpha, d.bit_depth))).mode == mode


def test_decoded_validates_its_fields():
    with pytest.raises(ValueError, match="float64"):
        Decoded(pixels=np.zeros((2, 2, 3)), alpha=None, mode="RGB", bit_depth=8, format="PNG")
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        Decoded(np.zeros((2, 2, 3), np.float32), np.zeros((2, 3), np.uint8), "RGBA", 8, "PNG")
    with pytest.raises(ValueError, match="bit_depth=12"):
        Decoded(np.zeros((2, 2, 1), np.float32), None, "L", 12, "PNG")


# -- failures -----------------------------------------------------------------------------------------------------


def _reason(data, **kwargs) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data, **kwargs)
    assert info.value.reason == str(info.value)
    assert "\n" not in info.value.reason and len(info.value.reason) < 200
    return info.value.reason


def test_empty_and_missing_data():
    assert _reason(b"") == "empty file"
    assert _reason(None) == "no data (None)"
    with pytest.raises(TypeError, match="str"):
        decode("photo.png")


def test_random_bytes_named_jpg_are_not_an_image(tmp_path):
    path = tmp_path / "photo.jpg"  # the name plays no part: decode only sees the bytes
    path.write_bytes(np.random.default_rng(3).bytes(4096))
    assert _reason(path.read_bytes()) == "not an image"


def test_html_page_is_not_an_image():
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>"
    assert _reason(html) == "not an image"


def test_garbage_after_a_jpeg_signature_names_jpeg():
    reason = _reason(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + np.random.default_rng(4).bytes(2000))
    assert "JPEG" in reason


def test_truncated_png_and_jpeg():
    photo = Image.fromarray(skimage.data.astronaut())
    png = _encode(photo, "PNG")
    jpeg = _encode(photo, "JPEG", quality=90)
    for cut in (0.5, 0.99):
        assert _reason(png[: int(len(png) * cut)]) == "truncated PNG"
        assert _reason(jpeg[: int(len(jpeg) * cut)]) == "truncated JPEG"
    assert _reason(_encode(photo, "JPEG", progressive=True)[:20000]) == "truncated JPEG"
    assert _reason(png[:20]) == "truncated PNG"  # cut inside the header


def test_corrupt_pixel_data_gives_a_short_reason():
    png = _encode(Image.fromarray(_camera()), "PNG")
    start = png.index(b"IDAT")
    (length,) = struct.unpack(">I", png[start - 4 : start])
    junk = bytes(np.random.default_rng(5).integers(0, 256, length, dtype=np.uint8))
    broken = png[:start] + b"IDAT" + junk + struct.pack(">I", zlib.crc32(b"IDAT" + junk)) + png[start + 8 + length :]
    assert _reason(broken).startswith("OSError: ")


def test_eps_is_refused_without_running_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"
    assert _reason(eps).startswith("unsupported format: EPS")


def test_decode_error_survives_pickling():
    with pytest.raises(DecodeError) as info:
        decode(b"not an image at all")
    again = pickle.loads(pickle.dumps(info.value))
    assert isinstance(again, ValueError) and again.reason == "not an image"


# -- pixel limits -------------------------------------------------------------------------------------------------


class PixelsDecoded(BaseException):
    """Raised by the `pixel_loads` spy; a BaseException, so `decode`'s error boundary does not turn it into a row."""


@pytest.fixture
def spy_pixel_loads(monkeypatch):
    """Call it to start recording the sizes of the images whose pixel data Pillow is asked to decode
    (`ImageFile.load`, where a decoder allocates the whole image buffer) and refusing them: a test sees whether a check
    came before any allocation. Returns the list of sizes."""
    from PIL import ImageFile

    def start() -> list[tuple[int, int]]:
        loads = []

        def refuse(image):
            loads.append(image.size)
            raise PixelsDecoded(f"pixel data of a {image.size[0]}×{image.size[1]} image decoded")

        monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
        return loads

    return start


def test_decompression_bomb_is_refused_before_allocating(spy_pixel_loads):
    bomb = _bomb()
    assert len(bomb) < 200
    _reason(bomb)  # Pillow registers its plugins on first use: not the bomb's allocations
    pixel_loads = spy_pixel_loads()
    tracemalloc.start()
    try:
        reason = _reason(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Refused from the header: the reason names the size the header claims, and no pixel data was ever decoded.
    assert reason == f"too large: 30000×30000 (900.0 MP > limit {DEFAULT_MAX_PIXELS / 1e6:.1f} MP)"
    assert pixel_loads == []
    assert peak < 2**20, peak  # Python-side allocations (Pillow's C buffers: the address-space test below)
    # The spy does catch a decode: the same bytes under a limit that admits them reach the pixel data.
    with pytest.raises(PixelsDecoded, match="pixel data of a 30000×30000 image decoded"):
        decode(bomb, max_pixels=10**10)
    assert pixel_loads == [(30000, 30000)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc/self/status")
def test_decompression_bomb_fits_in_a_small_address_space():
    # tracemalloc cannot see Pillow's C allocations, so cap the whole address space at 256 MiB above the current
    # size in a fresh interpreter: the 900 MB image buffer only fits if the check is skipped (the control run).
    script = textwrap.dedent(
        """
        import io, resource, struct, zlib
        from PIL import Image
        from restoration.codec import DecodeError, decode
        buf = io.BytesIO(); Image.new("L", (64, 64)).save(buf, "PNG"); png = buf.getvalue()
        body = struct.pack(">II", 30000, 30000) + png[24:29]
        bomb = png[:12] + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + png[33:]
        vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + 256 * 2**20, resource.RLIM_INFINITY))
        for limit in (100_000_000, 10**10):
            try:
                decode(bomb, max_pixels=limit)
                print(limit, "decoded")
            except DecodeError as err:
                print(limit, "DecodeError", err)
            except MemoryError:
                print(limit, "MemoryError")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("100000000 DecodeError too large: 30000×30000"), result.stdout
    assert lines[1] == "10000000000 MemoryError", result.stdout  # the control: without the check it allocates


def test_our_limit_decides_not_pillows():
    photo = _encode(Image.fromarray(_astronaut()), "PNG")
    assert _reason(photo, max_pixels=1000) == "too large: 64×48 (3072 px > limit 1000 px)"
    # Pillow's global limit refuses 900 MP outright; a caller's larger limit still reads the header.
    assert image_size(_bomb(), max_pixels=10**9) == (30000, 30000)
    # 95 MP sits between Pillow's warning (89 MP) and our default limit: accepted, and no warning leaks out.
    ninety_five = _patch_png_size(photo, 10000, 9500)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert image_size(ninety_five) == (10000, 9500)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    with pytest.raises(ValueError, match="max_pixels=0"):
        decode(photo, max_pixels=0)


def test_image_size_reads_the_header_only(spy_pixel_loads):
    photo = Image.fromarray(skimage.data.astronaut()[:300, :400])
    png, jpeg = _encode(photo, "PNG"), _encode(photo, "JPEG")
    pixel_loads = spy_pixel_loads()
    assert image_size(png) == (400, 300)
    assert image_size(jpeg) == (400, 300)
    assert image_size(png[:1000]) == (400, 300)  # the header is intact; the pixel data is never read
    with pytest.raises(DecodeError, match="too large: 30000×30000"):
        image_size(_bomb())
    assert pixel_loads == []  # neither the photos' pixels nor the bomb's were decoded
    for bad, reason in [(b"", "empty file"), (b"<html></html>", "not an image")]:
        with pytest.raises(DecodeError) as info:
            image_size(bad)
        assert info.value.reason == reason


def test_encode_png_takes_quantised_uint8_samples_as_they_are():
    rgb = _astronaut(24, 16).astype(np.float64) / 255.0
    noisy = np.clip(rgb + np.random.default_rng(0).normal(0, 0.1, rgb.shape), 0, 1)
    assert encode_png(to_uint(noisy, 8)) == encode_png(noisy)
    gray = noisy[:, :, :1]
    assert encode_png(to_uint(gray, 8)) == encode_png(gray)
    with pytest.raises(ValueError, match="expected floats"):
        encode_png(to_uint(gray, 16))  # 16-bit samples are not taken raw
