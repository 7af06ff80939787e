"""The restorer's training core: patch sampling, noise, one step, PSNR evaluation, and that a small DnCNN learns."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torch import nn

from restoration.models.restorer import Restorer, RestorerConfig
from restoration.sources import load_images
from restoration.train.patches import PatchSampler
from restoration.train.restorer_core import (
    FitConfig,
    NoiseSpec,
    add_noise,
    evaluate_psnr,
    fit_restorer,
    lr_factor,
    restorer_step,
)


def _gray(array: np.ndarray) -> np.ndarray:
    """uint8 photo (H, W) or (H, W, 3) -> float32 (H, W, 1) in [0, 1], gray by Pillow's "L" like `load_images`."""
    image = Image.fromarray(array)
    return (np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[:, :, None]


def _camera() -> np.ndarray:
    return _gray(skimage.data.camera())


def _small_restorer(seed: int = 0, **overrides) -> Restorer:
    settings = dict(arch="dncnn", channels=1, depth=3, width=16, batch_norm=True) | overrides
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Restorer(RestorerConfig(**settings))


# load_images


def test_load_images_reads_nested_folder_in_sorted_order(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(12, 16), dtype=np.uint8)
    (tmp_path / "b").mkdir()
    Image.fromarray(rgb).save(tmp_path / "b" / "x.png")
    Image.fromarray(gray).save(tmp_path / "a.BMP")
    Image.fromarray(gray).save(tmp_path / "c.tif")
    (tmp_path / "notes.txt").write_text("not an image")

    images = load_images(tmp_path)  # a.BMP, b/x.png, c.tif
    assert [image.shape for image in images] == [(12, 16, 1), (20, 30, 1), (12, 16, 1)]
    assert all(image.dtype == np.float32 for image in images)
    np.testing.assert_array_equal(images[0][:, :, 0], gray / np.float32(255))
    # Colour -> gray is Pillow's ITU-R 601-2 luma, rounded to uint8 by Pillow.
    expected = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    np.testing.assert_array_equal(images[1][:, :, 0], expected)
    assert np.abs(images[1][:, :, 0] - rgb @ np.array([0.299, 0.587, 0.114]) / 255).max() < 1.0 / 255

    colour = load_images(tmp_path, channels=3, limit=2)
    assert [image.shape for image in colour] == [(12, 16, 3), (20, 30, 3)]
    np.testing.assert_array_equal(colour[1], rgb / np.float32(255))
    np.testing.assert_array_equal(colour[0][:, :, 0], colour[0][:, :, 2])  # gray file -> three equal channels


def test_load_images_scales_16_bit_gray(tmp_path):
    values = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    (image,) = load_images(tmp_path)
    np.testing.assert_allclose(image[:, :, 0], values / 65535.0, atol=1e-7)


def test_load_images_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="channels must be 1 .* got 2"):
        load_images(tmp_path, channels=2)
    with pytest.raises(FileNotFoundError, match="no image files"):
        load_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_images(tmp_path / "missing")


# PatchSampler


def test_patch_sampler_shape_dtype_range_and_content():
    camera = _camera()
    patches = PatchSampler([camera], patch_size=40, rng=np.random.default_rng(0)).sample(16)
    assert patches.shape == (16, 1, 40, 40)
    assert patches.dtype == np.float32 and patches.flags["C_CONTIGUOUS"]
    assert patches.min() >= 0.0 and patches.max() <= 1.0
    assert patches.std() > 0.05  # real image content, not a constant fill
    # Every patch is a transformed crop of the photo: its sorted pixel values match some 40x40 window's.
    windows = np.lib.stride_tricks.sliding_window_view(camera[:, :, 0], (40, 40))
    first = np.sort(patches[0].ravel())
    window_means = windows.mean(axis=(2, 3))
    candidates = np.argwhere(np.abs(window_means - first.mean()) < 1e-4)
    assert any(np.array_equal(np.sort(windows[i, j].ravel()), first) for i, j in candidates)


def test_patch_sampler_rgb_layout():
    astronaut = skimage.data.astronaut().astype(np.float32) / 255
    patches = PatchSampler([astronaut], patch_size=8, rng=np.random.default_rng(1)).sample(4)
    assert patches.shape == (4, 3, 8, 8)


def test_patch_sampler_is_reproducible_with_a_seed():
    images = [_camera(), _gray(skimage.data.coins())]
    a = PatchSampler(images, 32, np.random.default_rng(7)).sample(8)
    b = PatchSampler(images, 32, np.random.default_rng(7)).sample(8)
    c = PatchSampler(images, 32, np.random.default_rng(8)).sample(8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_patch_sampler_applies_all_eight_dihedral_transforms():
    # An asymmetric 4x4 image, sampled whole: every patch is the image under one of the 8 dihedral transforms.
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    base = image[:, :, 0]
    dihedral = [np.rot90(base, k) for k in range(4)] + [np.rot90(base, k)[:, ::-1] for k in range(4)]
    assert len({t.tobytes() for t in dihedral}) == 8
    patches = PatchSampler([image], 4, np.random.default_rng(0)).sample(400)[:, 0]
    seen = [next(i for i, t in enumerate(dihedral) if np.array_equal(p, t)) for p in patches]
    counts = np.bincount(seen, minlength=8)
    assert (counts > 20).all(), counts  # each of the 8 about 50 times


def test_patch_sampler_skips_too_small_images_and_weights_by_area():
    tiny = np.full((10, 12, 1), 0.25, dtype=np.float32)
    small = np.zeros((20, 20, 1), dtype=np.float32)  # area 400
    large = np.ones((20, 60, 1), dtype=np.float32)  # area 1200
    patches = PatchSampler([tiny, small, large], 16, np.random.default_rng(0)).sample(2000)
    values = patches[:, 0, 0, 0]
    assert not np.any(values == 0.25)  # the 10x12 image never contributes a 16x16 patch
    assert abs(np.mean(values == 1.0) - 0.75) < 0.04  # 1200 / (400 + 1200)

    with pytest.raises(ValueError, match=r"16x16 \(patch_size=16\).*largest image is 10x12"):
        PatchSampler([tiny, tiny[:5]], 16, np.random.default_rng(0))
    with pytest.raises(ValueError, match="channels"):
        PatchSampler([small, np.zeros((20, 20, 3), np.float32)], 16, np.random.default_rng(0))


# add_noise and NoiseSpec


def test_add_noise_fixed_sigma_std_and_no_clipping():
    clean = torch.zeros(64, 1, 32, 32)
    noisy = add_noise(clean, NoiseSpec(sigma=25.0), torch.Generator().manual_seed(0))
    noise = noisy - clean
    assert noise.std().item() == pytest.approx(25 / 255, rel=0.02)
    assert abs(noise.mean().item()) < 0.002
    assert noisy.min().item() < -0.2  # negative values survive: the noise is not clipped
    again = add_noise(clean, NoiseSpec(sigma=25.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy, again, rtol=0, atol=0)


def test_add_noise_blind_range_draws_sigma_per_patch():
    clean = torch.full((200, 1, 48, 48), 0.5)
    noisy = add_noise(clean, NoiseSpec(sigma_range=(0.0, 55.0)), torch.Generator().manual_seed(1))
    stds = (noisy - clean).flatten(1).std(dim=1) * 255  # (B,) per-patch σ estimates
    assert stds.min().item() < 8 and stds.max().item() > 47  # spread over [0, 55]
    assert stds.max().item() < 55 * 1.05
    assert stds.mean().item() == pytest.approx(27.5, abs=4)
    # Within a patch σ is constant: the first and second halves of each patch agree.
    halves = (noisy - clean)[:, :, :24].flatten(1).std(dim=1), (noisy - clean)[:, :, 24:].flatten(1).std(dim=1)
    assert torch.allclose(halves[0], halves[1], rtol=0.1, atol=0.004)


def test_noise_spec_validates():
    with pytest.raises(ValueError, match="both are None"):
        NoiseSpec(sigma=None)
    with pytest.raises(ValueError, match="got -1"):
        NoiseSpec(sigma=-1)
    with pytest.raises(ValueError, match=r"\(30, 10\)"):
        NoiseSpec(sigma_range=(30, 10))
    assert NoiseSpec(sigma=None, sigma_range=(0, 55)).sigma_range == (0, 55)


# restorer_step and evaluate_psnr


def _camera_batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.from_numpy(PatchSampler([_camera()], 32, np.random.default_rng(seed)).sample(n))
    return add_noise(clean, NoiseSpec(25.0), torch.Generator().manual_seed(seed)), clean


@pytest.mark.parametrize("loss", ["l2", "l1"])
def test_restorer_step_reduces_the_loss_on_a_fixed_batch(loss):
    model = _small_restorer()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    noisy, clean = _camera_batch()
    losses = [restorer_step(model, optimizer, noisy, clean, loss=loss)["loss"] for _ in range(30)]
    assert all(isinstance(value, float) and math.isfinite(value) for value in losses)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    with pytest.raises(ValueError, match="loss must be one of"):
        restorer_step(model, optimizer, noisy, clean, loss="ssim")


def _identity_model() -> nn.Module:
    conv = nn.Conv2d(1, 1, 1, bias=False)
    nn.init.ones_(conv.weight)
    return conv


def test_evaluate_psnr_protocol_and_model_mode():
    images = [_camera(), _gray(skimage.data.moon())]
    model = _identity_model().train()
    result = evaluate_psnr(model, images, NoiseSpec(25.0), seed=3)
    # Unclipped noise at σ=25: 10 log10(1 / (25/255)^2) = 20.17 dB.
    assert result["psnr_input"] == pytest.approx(20.17, abs=0.05)
    # The identity "restorer" only gains what clipping its output to [0, 1] removes.
    assert result["psnr_input"] < result["psnr"] < result["psnr_input"] + 1.5
    assert model.training  # put back in the mode it was in
    assert evaluate_psnr(model, images, NoiseSpec(25.0), seed=3) == result
    assert evaluate_psnr(model, images, NoiseSpec(25.0), seed=4) != result

    # max_side evaluates the central crop: equal to evaluating a pre-cut crop.
    center = [image[192:320, 192:320] for image in images]
    cropped = evaluate_psnr(model, images, NoiseSpec(15.0), max_side=128)
    assert cropped == evaluate_psnr(model, center, NoiseSpec(15.0))
    assert cropped["psnr_input"] == pytest.approx(24.61, abs=0.1)


# fit_restorer


def test_lr_schedules():
    assert lr_factor("cosine", 0.0) == 1.0 and lr_factor("cosine", 0.5) == pytest.approx(0.5)
    assert lr_factor("cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor("step", p) for p in (0.1, 0.6, 0.9)] == [1.0, 0.1, 0.01]
    assert lr_factor("constant", 0.99) == 1.0


def test_fit_config_validates():
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        FitConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr_schedule must be one of .* got 'linear'"):
        FitConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="time_budget_s must be > 0"):
        FitConfig(time_budget_s=0)


def test_fit_restorer_runs_steps_logs_and_validates():
    model = _small_restorer()
    logged = []
    config = FitConfig(patch_size=24, batch_size=8, steps=6, val_every=3, val_max_side=64, seed=1)
    history = fit_restorer(model, [_camera()], config, val_images=[_camera()], log=logged.append)
    assert history["steps"] == 6 and len(history["loss"]) == 6 and history["stopped"] == "steps"
    assert [v["step"] for v in history["val"]] == [3, 6]
    assert [entry["step"] for entry in logged if "loss" in entry] == [1, 2, 3, 4, 5, 6]
    assert [entry["step"] for entry in logged if "val_psnr" in entry] == [3, 6]
    lrs = [entry["lr"] for entry in logged if "lr" in entry]
    assert lrs[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    # Same seed, same initial weights, no time budget: the same run again.
    again = fit_restorer(_small_restorer(), [_camera()], config)
    assert again["loss"] == history["loss"]


def test_fit_restorer_stops_at_the_time_budget_and_anneals_to_it(monkeypatch):
    """The budget is read from the loop's clock, so the test drives the clock: each finished step takes 1 s."""
    import types

    from restoration.train import restorer_core

    now = [100.0]
    monkeypatch.setattr(restorer_core, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    logged = []

    def log(entry: dict) -> None:
        logged.append(entry)
        if "loss" in entry:
            now[0] += 1.0  # the step just logged took one second

    config = FitConfig(patch_size=16, batch_size=4, steps=50, time_budget_s=5.0)
    history = fit_restorer(_small_restorer(), [_camera()], config, log=log)
    assert history["stopped"] == "time_budget"
    assert history["steps"] == len(history["loss"]) == 5 and history["seconds"] == 5.0
    # The cosine schedule follows elapsed / budget when that is ahead of step / steps: 0, 1/5, ..., 4/5 of the way.
    lrs = [entry["lr"] for entry in logged if "loss" in entry]
    assert lrs == pytest.approx([1e-3 * lr_factor("cosine", k / 5) for k in range(5)])
    # Without a budget the same loop runs its steps.
    now[0] = 100.0
    assert (
        fit_restorer(_small_restorer(), [_camera()], dataclasses.replace(config, time_budget_s=None, steps=7))[
            "stopped"
        ]
        == "steps"
    )


def test_small_dncnn_learns_to_denoise_held_out_images(trained_restorer, set12):
    """The session's 7-layer, 32-wide DnCNN after 40 steps at σ=25 on Train400 patches (conftest, shared with the
    restore pipeline's end-to-end test): held-out PSNR must rise by at least 3 dB over the input."""
    from restoration.checkpoint import load_model

    history = trained_restorer.history
    model = load_model(trained_restorer.path, expected_kind="restorer").module
    held_out = load_images(set12)[:4]
    noise = NoiseSpec(sigma=25.0)
    result = evaluate_psnr(model, held_out, noise, seed=0, max_side=256)
    first, last = np.mean(history["loss"][:10]), np.mean(history["loss"][-10:])
    print(
        f"\n{history['steps']} steps in {history['seconds']:.1f} s; "
        f"loss {first:.5f} -> {last:.5f}; held-out PSNR {result['psnr_input']:.2f} dB (noisy) -> "
        f"{result['psnr']:.2f} dB (restored), +{result['psnr'] - result['psnr_input']:.2f} dB"
    )
    assert history["steps"] == trained_restorer.steps == 40 and history["stopped"] == "steps"
    assert last < first
    assert result["psnr"] >= result["psnr_input"] + 3.0
