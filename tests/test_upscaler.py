"""The upscaler: shapes at every scale, gradients, exact tiling context, and that its training beats bicubic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from restoration import degrade
from restoration.errors import UserError
from restoration.models import MODELS
from restoration.models.upscaler import Upscaler, UpscalerConfig
from restoration.sources import load_images
from restoration.train import upscaler as train_upscaler
from restoration.train.launcher import resolve_config

TINY = dict(channels=1, width=8, depth=3)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shape_and_backward(scale: int, channels: int) -> None:
    model = Upscaler(UpscalerConfig(scale=scale, channels=channels, width=8, depth=3))
    assert model.scale == scale and model.receptive_radius == 3
    x = torch.rand(2, channels, 13, 10)
    y = model(x)
    assert y.shape == (2, channels, 13 * scale, 10 * scale)
    y.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_starts_near_the_upsampled_input_and_is_registered() -> None:
    assert MODELS["upscaler"] == (UpscalerConfig, Upscaler)
    torch.manual_seed(0)
    model = Upscaler(UpscalerConfig(scale=2, **TINY))
    x = torch.rand(1, 1, 16, 16)
    base = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert (model(x) - base).abs().max() < 0.05


def test_receptive_radius_makes_tiles_exact() -> None:
    """An output tile computed from its input tile plus `receptive_radius` pixels of context equals the same pixels
    of the whole image's output."""
    torch.manual_seed(0)
    model = Upscaler(UpscalerConfig(scale=3, channels=1, width=8, depth=5)).eval()
    x = torch.rand(1, 1, 40, 40)
    r, s = model.receptive_radius, model.scale
    with torch.no_grad():
        full = model(x)
        top, left, size = 12, 15, 10
        tile = model(x[:, :, top - r : top + size + r, left - r : left + size + r])
    inner = tile[:, :, s * r : s * (r + size), s * r : s * (r + size)]
    torch.testing.assert_close(inner, full[:, :, s * top : s * (top + size), s * left : s * (left + size)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(scale=5), "scale=5: expected one of 2, 3, 4"),
        (dict(channels=2), "channels=2"),
        (dict(depth=1), "depth=1"),
        (dict(width=0), "width=0"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UpscalerConfig(**kwargs)


def test_train_config_presets_and_bad_values() -> None:
    for name in train_upscaler.PRESETS:
        assert resolve_config("upscaler", name).model_config().scale in (2, 3, 4)
    with pytest.raises(UserError, match="scale=7"):
        resolve_config("upscaler", None, {"scale": 7})
    with pytest.raises(UserError, match="precision='fp16'"):
        resolve_config("upscaler", None, {"precision": "fp16"})
    with pytest.raises(UserError, match="patch_size must be >= 1"):
        resolve_config("upscaler", None, {"patch_size": 0})


def test_training_pairs_are_aligned_and_made_by_the_lr_step(train400) -> None:
    images = load_images(train400, channels=1, limit=3)
    pairs = train_upscaler.make_pairs(images, 3)
    lo, hi = pairs[0]
    np.testing.assert_array_equal(lo, degrade.apply(images[0], "lr:3", np.random.default_rng(0)))
    assert hi.shape == (3 * lo.shape[0], 3 * lo.shape[1], 1)
    lows, highs = train_upscaler.sample_pairs(pairs, 8, 64, np.random.default_rng(0))
    assert lows.shape == (64, 1, 8, 8) and highs.shape == (64, 1, 24, 24)
    # Every pair is aligned: the LR patch is the bicubic of its HR patch away from the patch border (the bicubic
    # support of a 3x downscale is 6 HR pixels, so the central LR pixels see only HR pixels inside the patch).
    for low, high in zip(lows[:8], highs[:8], strict=True):
        again = degrade.bicubic_down(high.transpose(1, 2, 0), 3).transpose(2, 0, 1)
        np.testing.assert_allclose(again[:, 2:-2, 2:-2], low[:, 2:-2, 2:-2], atol=1e-5)


def _fit(train400, lr: float) -> dict[str, float]:
    """A fixed short training run on 8 Train400 images (seeded, fp32); PSNR on 4 held-out ones."""
    images = load_images(train400, channels=1, limit=12)
    train_pairs = train_upscaler.make_pairs(images[:8], 2)
    val_pairs = train_upscaler.make_pairs(images[-4:], 2)
    cfg = train_upscaler.UpscalerTrainConfig(
        scale=2, width=16, depth=4, patch_size=24, batch_size=16, steps_per_epoch=300, epochs=1, lr=lr
    )
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = Upscaler(cfg.model_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = train_upscaler.training_batches(cfg, train_pairs, (0, 0, 0), torch.device("cpu"))
    train_upscaler.train_epoch(model, optimizer, cfg, batches, epoch=0, epochs=1)
    return train_upscaler.evaluate(model, val_pairs)


def test_training_beats_bicubic_on_held_out_images(train400) -> None:
    result = _fit(train400, lr=2e-3)
    print(result)
    assert result["psnr"] > result["psnr_bicubic"] + 0.2


def test_training_with_zero_learning_rate_does_not_beat_bicubic(train400) -> None:
    """The check above can fail: without updates the model stays the bilinear upsampling, below bicubic."""
    result = _fit(train400, lr=0.0)
    assert result["psnr"] < result["psnr_bicubic"]


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bundled_upscalers_beat_bicubic(scale: int) -> None:
    """The bundled gray models, on a photo none of them trained on (the training data is Train400)."""
    import skimage.data

    from restoration import metrics
    from restoration.checkpoint import load_named

    loaded = load_named(f"upscale-gray-x{scale}", expected_kind="upscaler")
    model = loaded.module.eval()
    assert model.scale == scale and loaded.config.channels == 1
    torch.set_num_threads(2)
    original = skimage.data.camera()[64:256, 128:320].astype(np.float32)[..., None] / 255.0  # (192, 192, 1)
    low = degrade.apply(original, f"lr:{scale}", np.random.default_rng(0))
    with torch.inference_mode():
        out = model(torch.from_numpy(low.transpose(2, 0, 1).copy())[None])[0].numpy().transpose(1, 2, 0)
    bicubic = train_upscaler.bicubic_up(low, scale)
    gain = metrics.psnr_y(np.clip(out, 0, 1), original, scale) - metrics.psnr_y(np.clip(bicubic, 0, 1), original, scale)
    assert gain > 0.5, gain
