"""Tests for restoration.degrade: shapes, seeding, the statistics of each degradation, and spec strings."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from restoration import degrade
from restoration.degrade import Step

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return skimage.data.camera().astype(np.float32)[..., None] / 255.0  # (512, 512, 1)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut().astype(np.float32) / 255.0  # (512, 512, 3)


def high_freq_energy(image: np.ndarray) -> float:
    """Mean squared discrete Laplacian: large for sharp detail and noise, small for smooth images."""
    x = image.astype(np.float64)
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return float(np.mean(lap**2))


def chroma_luma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """JPEG's (JFIF, BT.601) luma and stacked (Cb, Cr) chroma of an RGB image."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    return y, np.stack([cb, cr])


# Every function, called with arguments that change the image noticeably.
CALLS = {
    "gaussian_noise": lambda im, rng: degrade.gaussian_noise(im, 25, rng),
    "poisson_noise": lambda im, rng: degrade.poisson_noise(im, 30, rng),
    "gaussian_blur": lambda im, rng: degrade.gaussian_blur(im, 2.0),
    "motion_blur": lambda im, rng: degrade.motion_blur(im, 9, 30.0),
    "jpeg": lambda im, rng: degrade.jpeg(im, 10),
    "downscale": lambda im, rng: degrade.downscale(im, 3.0),
    "missing_pixels": lambda im, rng: degrade.missing_pixels(im, 0.3, rng),
    "scratches": lambda im, rng: degrade.scratches(im, 5, rng),
}
RANDOM = ["gaussian_noise", "poisson_noise", "missing_pixels", "scratches"]


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("channels", [1, 3])
def test_keeps_shape_and_dtype_and_leaves_input_alone(name: str, channels: int, astronaut: np.ndarray) -> None:
    image = np.ascontiguousarray(astronaut[100:197, 50:180, :channels])  # odd, non-square size
    before = image.copy()
    out = CALLS[name](image, np.random.default_rng(0))
    assert out.shape == image.shape
    assert out.dtype == np.float32
    assert not np.shares_memory(out, image)
    np.testing.assert_array_equal(image, before)
    assert np.mean(np.abs(out - image)) > 1e-3  # it did degrade the image
    if name not in ("gaussian_noise", "poisson_noise"):
        assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("name", RANDOM)
def test_same_seed_same_output_different_key_different_output(name: str, astronaut: np.ndarray) -> None:
    image = astronaut[:128, :128]
    a = CALLS[name](image, degrade.rng_for(7, "img-1"))
    b = CALLS[name](image, degrade.rng_for(7, "img-1"))
    c = CALLS[name](image, degrade.rng_for(7, "img-2"))
    d = CALLS[name](image, degrade.rng_for(8, "img-1"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)


def test_seed_for_is_a_fixed_function_of_its_inputs() -> None:
    # The documented rule, worked out here with hashlib, and one value pinned (it must never change between
    # releases, or reruns of old evaluation runs would degrade differently).
    for run_seed, key in ((1234, "shard-00/img-000.png"), (0, ""), (2**40, "photos/été.jpg")):
        digest = hashlib.sha256(f"{run_seed}:{key}".encode()).hexdigest()
        assert degrade.seed_for(run_seed, key) == int(digest[:16], 16) // 2
    assert degrade.seed_for(1234, "shard-00/img-000.png") == 2106916952252045943
    assert degrade.seed_for(1234, "shard-00/img-001.png") != degrade.seed_for(1234, "shard-00/img-000.png")
    seeds = [degrade.seed_for(s, k) for s in range(20) for k in ("a", "b", "")]
    assert all(0 <= s < 2**63 for s in seeds)
    assert len(set(seeds)) == len(seeds)


def test_seed_for_does_not_depend_on_pythonhashseed() -> None:
    code = "from restoration.degrade import seed_for; print(seed_for(1234, 'shard-00/img-000.png'), hash('x'))"
    outputs = []
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.append(proc.stdout.split())
    assert outputs[0][1] != outputs[1][1]  # the salted str hash did change with PYTHONHASHSEED ...
    assert outputs[0][0] == outputs[1][0] == "2106916952252045943"  # ... and seed_for did not


def test_gaussian_noise_std_and_not_clipped() -> None:
    flat = np.full((512, 512, 1), 0.5, dtype=np.float32)
    out = degrade.gaussian_noise(flat, 25, np.random.default_rng(0))
    noise = out - flat
    assert abs(noise.std() / (25 / 255) - 1) < 0.03
    assert abs(noise.mean()) < 0.002
    dark = np.zeros((64, 64, 3), dtype=np.float32)
    out = degrade.gaussian_noise(dark, 25, np.random.default_rng(0))
    assert (out < 0).mean() > 0.4  # about half the values go negative; clipping would remove them
    np.testing.assert_array_equal(degrade.gaussian_noise(dark, 0, np.random.default_rng(0)), dark)


def test_poisson_noise_mean_and_variance_follow_the_peak() -> None:
    peak, level = 30.0, 0.4
    flat = np.full((512, 512, 1), level, dtype=np.float32)
    out = degrade.poisson_noise(flat, peak, np.random.default_rng(0))
    # Poisson(level * peak) / peak has mean `level` and variance level / peak.
    assert abs(out.mean() - level) < 0.005
    assert abs(out.var() / (level / peak) - 1) < 0.03
    assert np.allclose(out * peak, np.round(out * peak), atol=1e-4)  # whole photon counts
    stronger = degrade.poisson_noise(flat, 5.0, np.random.default_rng(0))
    assert stronger.std() > 2 * out.std()


def test_gaussian_blur_impulse_response_and_high_frequencies(camera: np.ndarray) -> None:
    impulse = np.zeros((41, 41, 1), dtype=np.float32)
    impulse[20, 20] = 1.0
    psf = degrade.gaussian_blur(impulse, 2.0)[..., 0]
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(psf, psf[::-1, ::-1], atol=1e-7)
    np.testing.assert_allclose(psf, psf.T, atol=1e-7)
    ys, xs = np.mgrid[-20:21, -20:21]
    assert np.sum(psf * xs**2) == pytest.approx(4.0, rel=0.02)  # variance of the kernel = sigma^2
    assert np.count_nonzero(psf[20]) == 2 * 6 + 1  # radius ceil(3 * 2) = 6

    blurred = degrade.gaussian_blur(camera, 2.0)
    assert high_freq_energy(blurred) < 0.05 * high_freq_energy(camera)
    assert blurred.mean() == pytest.approx(camera.mean(), abs=2e-3)  # reflect padding keeps the brightness
    np.testing.assert_array_equal(degrade.gaussian_blur(camera, 0.0), camera)


@pytest.mark.parametrize(("angle", "axis"), [(0.0, 1), (90.0, 0)])
def test_motion_blur_spreads_a_point_along_the_motion(angle: float, axis: int) -> None:
    impulse = np.zeros((31, 31, 1), dtype=np.float32)
    impulse[15, 15] = 1.0
    psf = degrade.motion_blur(impulse, 9, angle)[..., 0]
    line = psf[15, 11:20] if axis == 1 else psf[11:20, 15]
    np.testing.assert_allclose(line, np.full(9, 1 / 9), atol=1e-6)
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.count_nonzero(psf) == 9


def test_motion_blur_diagonal_and_identity(camera: np.ndarray) -> None:
    impulse = np.zeros((31, 31, 1), dtype=np.float32)
    impulse[15, 15] = 1.0
    psf = degrade.motion_blur(impulse, 9, 45.0)[..., 0]
    ys, xs = np.nonzero(psf)
    np.testing.assert_array_equal(ys - 15, -(xs - 15))  # up-right on screen: rows decrease as columns increase
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(degrade.motion_blur(camera, 1), camera)
    horizontal = degrade.motion_blur(camera, 15, 0.0)
    # Horizontal motion wipes out horizontal detail but keeps vertical differences between rows.
    dx = np.mean(np.diff(horizontal, axis=1) ** 2) / np.mean(np.diff(camera, axis=1) ** 2)
    dy = np.mean(np.diff(horizontal, axis=0) ** 2) / np.mean(np.diff(camera, axis=0) ** 2)
    assert dx < 0.1 < dy


def test_jpeg_lower_quality_changes_more(camera: np.ndarray, astronaut: np.ndarray) -> None:
    for image in (camera, astronaut):
        err10 = np.mean((degrade.jpeg(image, 10) - image) ** 2)
        err90 = np.mean((degrade.jpeg(image, 90) - image) ** 2)
        assert err10 > 5 * err90 > 0
    out = degrade.jpeg(camera, 50)
    np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-4)  # 8-bit round trip


def test_colour_jpeg_subsampling_loses_chroma_not_luma(astronaut: np.ndarray) -> None:
    y_sub, c_sub = chroma_luma(degrade.jpeg(astronaut, 90, subsampling=True) - astronaut)
    y_full, c_full = chroma_luma(degrade.jpeg(astronaut, 90, subsampling=False) - astronaut)
    assert np.mean(c_sub**2) > 1.5 * np.mean(c_full**2)
    assert np.mean(y_sub**2) == pytest.approx(np.mean(y_full**2), rel=0.1)
    # 1-px red/blue columns have chroma at the Nyquist rate: 4:2:0 averages it to purple.
    stripes = np.zeros((32, 32, 3), dtype=np.float32)
    stripes[:, 0::2, 0] = 1.0
    stripes[:, 1::2, 2] = 1.0
    _, c_sub = chroma_luma(degrade.jpeg(stripes, 95, subsampling=True) - stripes)
    _, c_full = chroma_luma(degrade.jpeg(stripes, 95, subsampling=False) - stripes)
    assert np.mean(c_sub**2) > 10 * np.mean(c_full**2)


def test_downscale_keeps_size_and_loses_detail(camera: np.ndarray, astronaut: np.ndarray) -> None:
    for image in (camera, astronaut):
        out = degrade.downscale(image, 2)
        assert out.shape == image.shape
        assert high_freq_energy(out) < 0.5 * high_freq_energy(image)
        assert np.mean((out - image) ** 2) < 0.01  # coarse structure survives (PSNR > 20 dB)
    assert high_freq_energy(degrade.downscale(camera, 4)) < high_freq_energy(degrade.downscale(camera, 2))
    # Float resampling: a smooth ramp comes back with values between the 8-bit levels.
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64, 1)
    out = degrade.downscale(ramp, 2)
    assert np.abs(out * 255 - np.round(out * 255)).max() > 0.1
    assert np.abs(out - ramp)[8:-8, 8:-8].max() < 0.01  # a linear ramp is nearly preserved away from the borders


def test_missing_pixels_drops_exactly_that_fraction(astronaut: np.ndarray) -> None:
    image = np.clip(astronaut[:100, :100], 0.01, 1.0)  # no zeros to start with
    out = degrade.missing_pixels(image, 0.3, np.random.default_rng(0))
    dropped = np.all(out == 0, axis=-1)
    assert dropped.sum() == 3000
    assert np.all((out == 0).any(axis=-1) == dropped)  # all channels of a pixel go together
    np.testing.assert_array_equal(out[~dropped], image[~dropped])
    np.testing.assert_array_equal(degrade.missing_pixels(image, 0.0, np.random.default_rng(0)), image)


def test_scratches_draw_thin_white_or_black_lines() -> None:
    gray = np.full((200, 300, 3), 0.5, dtype=np.float32)
    out = degrade.scratches(gray, 8, np.random.default_rng(3))
    changed = np.any(out != 0.5, axis=-1)
    assert set(np.unique(out[changed])) <= {0.0, 1.0}
    assert np.all(out[changed] == out[changed][:, :1])  # all channels set together
    # 8 lines of 1-3 px over 25%-100% of 300 px: between ~8 * 75 and 8 * 3 * 360 pixels.
    assert 8 * 60 < changed.sum() < 8 * 3 * 370
    np.testing.assert_array_equal(degrade.scratches(gray, 0, np.random.default_rng(3)), gray)


def test_functions_reject_bad_images_and_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"shape \(8, 8\).*expected \(H, W, C\)"):
        degrade.gaussian_blur(np.zeros((8, 8), dtype=np.float32), 1.0)
    with pytest.raises(ValueError, match=r"shape \(8, 8, 4\)"):
        degrade.jpeg(np.zeros((8, 8, 4), dtype=np.float32), 50)
    with pytest.raises(ValueError, match="dtype uint8"):
        degrade.gaussian_noise(np.zeros((8, 8, 3), dtype=np.uint8), 10, rng)
    image = np.zeros((8, 8, 1), dtype=np.float32)
    for call, match in [
        (lambda: degrade.gaussian_noise(image, -1, rng), "sigma=-1"),
        (lambda: degrade.poisson_noise(image, 0, rng), "peak=0"),
        (lambda: degrade.motion_blur(image, 2.5), "length=2.5"),
        (lambda: degrade.jpeg(image, 0), "quality=0"),
        (lambda: degrade.downscale(image, 1.0), "factor=1.0"),
        (lambda: degrade.missing_pixels(image, 1.0, rng), "fraction=1.0"),
        (lambda: degrade.scratches(image, -1, rng), "count=-1"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_parse_spec_valid() -> None:
    assert degrade.parse_spec("") == ()
    assert degrade.parse_spec("none") == ()
    assert degrade.parse_spec(" None ") == ()
    assert degrade.parse_spec("blur:2,noise:10") == (Step("blur", (2.0,)), Step("noise", (10.0,)))
    assert degrade.parse_spec("motion:9") == (Step("motion", (9.0,)),)
    assert degrade.parse_spec(" motion:9:45 , jpeg:10") == (Step("motion", (9.0, 45.0)), Step("jpeg", (10.0,)))
    steps = degrade.parse_spec("poisson:30,down:2,missing:0.3,scratch:5,jpeg:100,noise:0")
    assert [s.name for s in steps] == ["poisson", "down", "missing", "scratch", "jpeg", "noise"]
    assert degrade.format_spec(steps) == "poisson:30,down:2,missing:0.3,scratch:5,jpeg:100,noise:0"
    assert degrade.parse_spec(degrade.format_spec(steps)) == steps
    assert degrade.format_spec(()) == "none"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("foo:3", "unknown degradation 'foo' in spec 'foo:3': expected one of noise, poisson, blur, motion"),
        ("blur:2,gauss:1", "unknown degradation 'gauss'"),
        ("noise:x", "bad value 'x' for noise in spec 'noise:x': expected a number >= 0"),
        ("noise:-5", "bad value '-5' for noise .* expected a number >= 0"),
        ("noise:nan", "bad value 'nan' for noise"),
        ("poisson:0", "bad value '0' for poisson .* expected a number > 0"),
        ("jpeg:0", "bad value '0' for jpeg .* expected an integer in 1..100"),
        ("jpeg:101", "bad value '101' for jpeg"),
        ("jpeg:10.5", "bad value '10.5' for jpeg"),
        ("down:1", "bad value '1' for down .* expected a number > 1"),
        ("missing:1", r"bad value '1' for missing .* expected a number in \[0, 1\)"),
        ("missing:-0.1", "bad value '-0.1' for missing"),
        ("scratch:2.5", "bad value '2.5' for scratch .* expected an integer >= 0"),
        ("motion:0", "bad value '0' for motion .* expected an integer >= 1"),
        ("motion:9:left", "bad value 'left' for motion .* expected a number of degrees"),
        ("noise", "noise takes 1..1 argument.*got 0 .* expected noise:SIGMA"),
        ("motion:9:45:1", "motion takes 1..2 argument.*got 3"),
        ("blur:2,,noise:1", "empty step"),
    ],
)
def test_parse_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        degrade.parse_spec(spec)


def test_apply_chains_in_order(astronaut: np.ndarray) -> None:
    image = astronaut[:128, :128]
    out = degrade.apply(image, "blur:2,noise:10", np.random.default_rng(5))
    expected = degrade.gaussian_noise(degrade.gaussian_blur(image, 2.0), 10, np.random.default_rng(5))
    np.testing.assert_array_equal(out, expected)
    # Noise then blur is a different, much smoother image: the blur averages the noise away and clips.
    reverse = degrade.apply(image, "noise:10,blur:2", np.random.default_rng(5))
    assert high_freq_energy(reverse) < 0.2 * high_freq_energy(out)
    assert reverse.min() >= 0 and out.min() < 0
    # Steps and strings are interchangeable; the identity returns an equal copy.
    steps = degrade.parse_spec("jpeg:10,missing:0.1")
    np.testing.assert_array_equal(
        degrade.apply(image, steps, np.random.default_rng(1)),
        degrade.apply(image, "jpeg:10,missing:0.1", np.random.default_rng(1)),
    )
    same = degrade.apply(image, "none", np.random.default_rng(0))
    np.testing.assert_array_equal(same, image)
    assert not np.shares_memory(same, image)


def test_apply_validates_steps(astronaut: np.ndarray) -> None:
    with pytest.raises(ValueError, match="bad value '0' for jpeg"):
        degrade.apply(astronaut, (Step("jpeg", (0.0,)),), np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown degradation 'sharpen'"):
        degrade.apply(astronaut, (Step("sharpen", (1.0,)),), np.random.default_rng(0))


def test_spec_help_lists_every_degradation() -> None:
    for name in ("noise", "poisson", "blur", "motion", "jpeg", "down", "lr", "missing", "scratch"):
        assert f"{name}:" in degrade.SPEC_HELP
        example = next(w for w in degrade.SPEC_HELP.split() if w.startswith(f"({name}:")).strip("()")
        assert [step.name for step in degrade.parse_spec(example)] == [name], example


# --------------------------------------------------------------------------------------------- super-resolution input
def test_modcrop_crops_bottom_right_to_a_multiple() -> None:
    image = np.arange(7 * 11, dtype=np.float32).reshape(7, 11, 1)
    np.testing.assert_array_equal(degrade.modcrop(image, 3), image[:6, :9])
    np.testing.assert_array_equal(degrade.modcrop(image, 1), image)
    assert degrade.modcrop(image, 7).shape == (7, 7, 1)
    with pytest.raises(ValueError, match="factor=0: expected an integer >= 1"):
        degrade.modcrop(image, 0)
    with pytest.raises(ValueError, match="smaller than the scale factor 8"):
        degrade.modcrop(image, 8)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_lr_step_is_pillow_float_bicubic_of_the_modcropped_image(factor: int, astronaut: np.ndarray) -> None:
    from PIL import Image

    image = astronaut[:101, :130]
    out = degrade.apply(image, f"lr:{factor}", np.random.default_rng(0))
    assert out.shape == (101 // factor, 130 // factor, 3) and out.dtype == np.float32
    cropped = image[: 101 - 101 % factor, : 130 - 130 % factor]
    size = (130 // factor, 101 // factor)
    for c in range(3):
        pil = Image.fromarray(np.ascontiguousarray(cropped[..., c]))
        expected = np.asarray(pil.resize(size, Image.Resampling.BICUBIC, reducing_gap=None))
        np.testing.assert_array_equal(out[..., c], expected)
    # Not quantised to 8 bits; the antialiasing keeps a flat image flat and averages an alternating pattern away.
    assert not np.allclose(out * 255, np.round(out * 255), atol=1e-3)
    flat = np.full((12, 12, 1), 0.3, np.float32)
    np.testing.assert_allclose(degrade.bicubic_down(flat, factor), 0.3, atol=1e-6)
    stripes = np.tile(np.array([0.0, 1.0], np.float32), 24 * 12).reshape(24, 24, 1)
    assert np.ptp(degrade.bicubic_down(stripes, 2)[2:-2, 2:-2]) < 0.05


def test_lr_commutes_with_dihedral_transforms(camera: np.ndarray) -> None:
    """The upscaler's training flips and rotates aligned (LR, HR) pairs: that needs down(T(x)) == T(down(x))."""
    image = camera[:96, :120]
    small = degrade.bicubic_down(image, 3)
    np.testing.assert_allclose(degrade.bicubic_down(image[::-1], 3), small[::-1], atol=1e-6)
    np.testing.assert_allclose(degrade.bicubic_down(image[:, ::-1], 3), small[:, ::-1], atol=1e-6)
    np.testing.assert_allclose(
        degrade.bicubic_down(np.ascontiguousarray(image.transpose(1, 0, 2)), 3), small.transpose(1, 0, 2), atol=1e-6
    )


def test_steps_after_lr_act_on_the_small_image_and_lr_factor(astronaut: np.ndarray) -> None:
    image = astronaut[:64, :64]
    out = degrade.apply(image, "lr:2,noise:5", np.random.default_rng(3))
    expected = degrade.gaussian_noise(degrade.bicubic_down(image, 2), 5, np.random.default_rng(3))
    np.testing.assert_array_equal(out, expected)
    assert degrade.apply(image, "lr:2,lr:2", np.random.default_rng(0)).shape == (16, 16, 3)
    assert degrade.lr_factor("noise:5") == 1 and degrade.lr_factor(()) == 1
    assert degrade.lr_factor("lr:3,noise:5") == 3
    assert degrade.lr_factor(degrade.parse_spec("lr:2,blur:1,lr:4")) == 8
    assert degrade.format_spec(degrade.parse_spec("lr:4")) == "lr:4"


@pytest.mark.parametrize("spec", ["lr:1", "lr:9", "lr:2.5", "lr:x", "lr"])
def test_lr_rejects_bad_factors(spec: str) -> None:
    from restoration.errors import UserError

    with pytest.raises(UserError, match="lr"):
        degrade.parse_spec(spec)
