"""Tests for restoration.metrics: PSNR on known cases, SSIM against scikit-image, contact sheet layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
from skimage.metrics import structural_similarity

from restoration import metrics
from restoration.metrics import contact_sheet, psnr, ssim

GAP = 4  # the sheet's spacing, in px


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return skimage.data.camera().astype(np.float32) / 255.0  # (512, 512)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut().astype(np.float32) / 255.0  # (512, 512, 3)


def skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    return structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
        channel_axis=-1 if a.ndim == 3 else None,
    )


def test_psnr_known_values(astronaut: np.ndarray) -> None:
    reference = np.full((64, 48, 3), 0.25)
    assert psnr(reference + 0.1, reference) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01 -> 10 log10(1 / 0.01)
    assert psnr(reference - 0.01, reference) == pytest.approx(40.0, abs=1e-9)
    assert psnr(astronaut, astronaut) == math.inf
    # The same error on the 0-255 scale gives the same PSNR.
    u8 = (astronaut * 255).round().astype(np.uint8)
    shifted = u8.astype(np.int16) + 10
    assert psnr(shifted, u8, data_range=255) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)
    # Whole image, all channels: an error in one channel only counts a third.
    one_channel = reference.copy()
    one_channel[..., 0] += 0.1
    assert psnr(one_channel, reference) == pytest.approx(20.0 + 10 * math.log10(3), abs=1e-9)


def test_psnr_and_ssim_reject_mismatched_shapes() -> None:
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(32, 32\)"):
            metric(np.zeros((32, 32, 3)), np.zeros((32, 32)))
    with pytest.raises(ValueError, match="data_range=0"):
        psnr(np.zeros((4, 4)), np.zeros((4, 4)), data_range=0)
    with pytest.raises(ValueError, match=r"\(8, 40\) is smaller than the 11x11"):
        ssim(np.zeros((8, 40)), np.zeros((8, 40)))


def test_ssim_identical_is_one(camera: np.ndarray, astronaut: np.ndarray) -> None:
    assert ssim(camera, camera) == pytest.approx(1.0, abs=1e-9)
    assert ssim(astronaut, astronaut) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("sigma", [5, 25, 50])
def test_ssim_matches_skimage_gray(camera: np.ndarray, sigma: int) -> None:
    noisy = camera + np.random.default_rng(sigma).normal(0, sigma / 255, camera.shape).astype(np.float32)
    ours, reference = ssim(noisy, camera), skimage_ssim(noisy, camera)
    assert abs(ours - reference) < 1e-3
    assert ours < 0.95  # the noise is visible to the metric
    # (H, W) and (H, W, 1) are the same image.
    assert ssim(noisy[..., None], camera[..., None]) == pytest.approx(ours, abs=1e-9)


def test_ssim_matches_skimage_colour_and_8bit(astronaut: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    noisy = np.clip(astronaut + rng.normal(0, 15 / 255, astronaut.shape), 0, 1).astype(np.float32)
    noisy = noisy[37:300, 11:400]  # a non-square crop
    clean = astronaut[37:300, 11:400]
    assert abs(ssim(noisy, clean) - skimage_ssim(noisy, clean)) < 1e-3
    u8, clean_u8 = (noisy * 255).round().astype(np.uint8), (clean * 255).round().astype(np.uint8)
    assert abs(ssim(u8, clean_u8, data_range=255) - skimage_ssim(u8, clean_u8, data_range=255)) < 1e-3
    # Less noise scores higher.
    milder = np.clip(clean + rng.normal(0, 5 / 255, clean.shape), 0, 1)
    assert ssim(milder, clean) > ssim(noisy, clean) + 0.1


def test_contact_sheet_layout_mixed_gray_colour_sizes(camera: np.ndarray, astronaut: np.ndarray) -> None:
    gray_small = camera[:32, :32, None]  # (32, 32, 1)
    colour_small = astronaut[:32, :32]  # (32, 32, 3)
    colour_wide = astronaut[:64, :48]  # (64, 48, 3)
    gray_wide = (camera[:64, :48] * 255).round().astype(np.uint8)  # (64, 48) uint8
    columns = [[gray_small, colour_wide], [colour_small, gray_wide]]

    sheet = contact_sheet(columns)
    # Row height is the tallest image (64): the 32x32 images double to 64x64, so each column is 64 wide.
    assert sheet.dtype == np.uint8
    assert sheet.shape == (GAP + 2 * (64 + GAP), GAP + 2 * (64 + GAP), 3)
    # Enlarging is nearest neighbour, gray becomes R = G = B.
    expected = np.repeat(np.repeat((gray_small[..., 0] * 255).round().astype(np.uint8), 2, 0), 2, 1)
    top_left = sheet[GAP : GAP + 64, GAP : GAP + 64]
    np.testing.assert_array_equal(top_left[..., 0], expected)
    np.testing.assert_array_equal(top_left[..., 0], top_left[..., 2])
    second_row = sheet[GAP + 64 + GAP : GAP + 2 * 64 + GAP, GAP + 64 + GAP : GAP + 64 + GAP + 48]
    np.testing.assert_array_equal(second_row[..., 1], gray_wide)

    labelled = contact_sheet(columns, labels=["degraded", "restored"])
    assert labelled.shape[1] == sheet.shape[1]
    header = labelled.shape[0] - sheet.shape[0]
    assert 8 <= header <= 40
    assert labelled[:header].min() < 100  # dark label text in the header strip
    np.testing.assert_array_equal(labelled[header:], sheet)


def test_contact_sheet_crop_zoom_and_max_width(camera: np.ndarray, astronaut: np.ndarray) -> None:
    columns = [[camera[..., None], astronaut], [camera, astronaut]]
    sheet = contact_sheet(columns, crop=40, max_width=10_000)
    cell_w = 512 + GAP + 2 * 40  # image, gap, 2x zoom
    assert sheet.shape == (GAP + 2 * (512 + GAP), GAP + 2 * (cell_w + GAP), 3)
    zoom = sheet[GAP : GAP + 80, GAP + 512 + GAP : GAP + 512 + GAP + 80, 0]
    centre = (camera[236:276, 236:276] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(zoom, np.repeat(np.repeat(centre, 2, 0), 2, 1))

    small = contact_sheet(columns, labels=["noisy", "clean"], crop=40, max_width=600)
    assert small.shape[1] == 600
    assert small.dtype == np.uint8
    # The header is drawn larger before the downscale so the labels end up readable, ~14 px font.
    header = small.shape[0] - 600 * sheet.shape[0] / sheet.shape[1]
    assert 10 <= header <= 30


def test_contact_sheet_rejects_bad_input(camera: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"\[2, 1\] images"):
        contact_sheet([[camera, camera], [camera]])
    with pytest.raises(ValueError, match="1 labels for 2 columns"):
        contact_sheet([[camera], [camera]], labels=["only one"])
    with pytest.raises(ValueError, match=r"columns\[0\]\[0\] has shape \(8, 8, 4\)"):
        contact_sheet([[np.zeros((8, 8, 4))]])
    with pytest.raises(ValueError, match="crop=0"):
        contact_sheet([[camera]], crop=0)


# ----------------------------------------------------------------------------------- super-resolution Y protocol
def test_rgb_to_y_is_the_matlab_601_luma() -> None:
    rgb = np.array([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.2, 0.5, 0.9]]])
    y = metrics.rgb_to_y(rgb)
    expected = (16 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    assert y.shape == (1, 4) and y[0, 0] == pytest.approx(16 / 255) and y[0, 1] == pytest.approx(235 / 255)
    gray = np.random.default_rng(0).random((5, 6, 1))
    np.testing.assert_array_equal(metrics.rgb_to_y(gray), gray[..., 0])
    with pytest.raises(ValueError, match="expected"):
        metrics.rgb_to_y(np.zeros((4, 4, 2)))


def test_psnr_y_and_ssim_y_crop_the_border() -> None:
    rng = np.random.default_rng(1)
    reference = rng.random((40, 50, 3))
    restored = reference.copy()
    restored[:3] = 0.0  # damage only inside a 3-pixel border
    restored[:, -3:] = 1.0
    assert metrics.psnr_y(restored, reference, border=3) == math.inf
    assert metrics.ssim_y(restored, reference, border=3) == pytest.approx(1.0)
    assert metrics.psnr_y(restored, reference, border=2) < 40
    noisy = np.clip(reference + rng.normal(0, 0.05, reference.shape), 0, 1)
    y_a, y_b = metrics.rgb_to_y(noisy)[4:-4, 4:-4], metrics.rgb_to_y(reference)[4:-4, 4:-4]
    assert metrics.psnr_y(noisy, reference, 4) == pytest.approx(metrics.psnr(y_a, y_b))
    assert metrics.ssim_y(noisy, reference, 4) == pytest.approx(metrics.ssim(y_a, y_b))
    with pytest.raises(ValueError, match="border=-1"):
        metrics.psnr_y(noisy, reference, -1)
    with pytest.raises(ValueError, match="nothing inside"):
        metrics.psnr_y(noisy, reference, 20)
