"""The per-patch degradation mix of the restore-* models and the restorer training options around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from restoration import degrade
from restoration.checkpoint import save_model
from restoration.models.restorer import Restorer, RestorerConfig
from restoration.train.restorer import PRESETS, RestorerTrainConfig, init_weights
from restoration.train.restorer_core import DegradeMix, degrade_patches


def patches(channels: int, n: int = 6, size: int = 32) -> np.ndarray:
    """Smooth, textured (N, C, size, size) patches in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.3 * np.sin(6 * x + 4 * y) * np.cos(5 * y)
    out = np.stack([np.stack([np.roll(base, i + c, axis=1) for c in range(channels)]) for i in range(n)])
    return out.astype(np.float32)


@pytest.mark.parametrize("channels", [1, 3])
def test_nothing_drawn_leaves_patches_clean_and_jpeg_only_is_real_jpeg(channels):
    clean = patches(channels)
    none = DegradeMix(noise_p=0.0, jpeg_p=0.0, blur_p=0.0)
    assert np.array_equal(degrade_patches(clean, none, np.random.default_rng(0)), clean)

    only_jpeg = DegradeMix(noise_p=0.0, jpeg_p=1.0, blur_p=0.0, quality_range=(20, 20))
    out = degrade_patches(clean, only_jpeg, np.random.default_rng(0))
    for got, patch in zip(out, clean, strict=True):
        expected = degrade.jpeg(patch.transpose(1, 2, 0), 20).transpose(2, 0, 1)
        assert np.array_equal(got, expected)
    assert not np.array_equal(out, clean)


def test_noise_has_the_drawn_sigma_and_the_mix_is_seeded():
    clean = patches(1, n=64)
    mix = DegradeMix(noise_p=1.0, sigma_range=(25.0, 25.0), jpeg_p=0.0, blur_p=0.0)
    out = degrade_patches(clean, mix, np.random.default_rng(3))
    assert abs((out - clean).std() * 255 - 25.0) < 0.5  # not clipped: the full Gaussian survives
    full = DegradeMix()  # blur, noise and JPEG mixed
    a = degrade_patches(clean, full, np.random.default_rng(7))
    b = degrade_patches(clean, full, np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, degrade_patches(clean, full, np.random.default_rng(8)))
    # Every kind of draw happens over 64 patches: some untouched, some changed.
    changed = [not np.array_equal(x, y) for x, y in zip(a, clean, strict=True)]
    assert 0 < sum(changed) < len(changed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"jpeg_p": 1.5}, "jpeg_p must be a probability"),
        ({"quality_range": (0, 50)}, "quality_range"),
        ({"sigma_range": (30.0, 10.0)}, "sigma_range"),
        ({"blur_max": 0.1}, "blur_max"),
    ],
)
def test_bad_mix_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DegradeMix(**kwargs)


def test_train_config_builds_the_mix_only_when_asked_and_checks_precision():
    assert RestorerTrainConfig().degrade_mix() is None
    mix = RestorerTrainConfig(**PRESETS["restore-gray-bf16"]).degrade_mix()
    assert mix == DegradeMix(noise_p=0.7, sigma_range=(0.0, 55.0), jpeg_p=0.4, blur_p=0.2)
    fixed = RestorerTrainConfig(sigma=15.0, jpeg_p=0.5).degrade_mix()
    assert fixed.sigma_range == (15.0, 15.0)
    with pytest.raises(ValueError, match="precision='fp16'"):
        RestorerTrainConfig(precision="fp16")


def test_init_weights_loads_a_matching_model_and_names_a_mismatch(tmp_path):
    config = RestorerConfig(arch="fast", depth=4, width=8)
    model = Restorer(config)
    save_model(tmp_path / "m.pt", "restorer", config, model)
    state = init_weights(str(tmp_path / "m.pt"), config)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="but this run trains"):
        init_weights(str(tmp_path / "m.pt"), RestorerConfig(arch="fast", depth=5, width=8))
