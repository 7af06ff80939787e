"""Restorer nets (DnCNN, the FFDNet-style "fast" variant and the U-Net): tiny configs on CPU."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from torch import nn

from restoration.models import MODELS
from restoration.models.restorer import Restorer, RestorerConfig

ARCHS = ["dncnn", "fast", "unet"]
CHANNELS = [1, 3]


def tiny(arch: str, channels: int, **overrides) -> RestorerConfig:
    depth = 3 if arch == "unet" else 5  # for "unet", levels
    return RestorerConfig(**{"arch": arch, "channels": channels, "depth": depth, "width": 16, **overrides})


def conv_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Input shape of every Conv2d call during one forward pass."""
    shapes = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of all 3x3 convs: out_positions * in_channels * out_channels * 9."""
    total = 0

    def count(m, _args, out):
        nonlocal total
        total += out.shape[0] * out.shape[2] * out.shape[3] * m.in_channels * m.out_channels * 9

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs: thread hand-offs would dominate on a small, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_models_table_lists_the_restorer():
    assert MODELS["restorer"] == (RestorerConfig, Restorer)


@pytest.mark.parametrize("size", [(17, 23), (32, 32), (1, 5), (6, 1)])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_keeps_shape(arch, channels, size):
    model = Restorer(tiny(arch, channels)).eval()
    x = torch.rand(2, channels, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_backward_reaches_every_parameter(arch, channels):
    model = Restorer(tiny(arch, channels)).train()
    clean = torch.rand(4, channels, 24, 20)
    noisy = clean + 0.1 * torch.randn_like(clean)
    F.mse_loss(model(noisy), clean).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
def test_output_is_input_minus_predicted_residual(arch):
    model = Restorer(tiny(arch, 3)).eval()
    x = torch.rand(1, 3, 15, 18)
    with torch.no_grad():
        assert not torch.equal(model(x), x)
        # With the last conv silenced the predicted residual is 0, so the model must return its input.
        model.last_conv.weight.zero_()
        model.last_conv.bias.zero_()
        assert torch.equal(model(x), x)


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fold_batch_norm_keeps_eval_outputs(arch, channels):
    model = Restorer(tiny(arch, channels))
    # A few Adam steps in train mode so BN running statistics and affine parameters are far from their init.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        clean = torch.rand(4, channels, 16, 16)
        loss = F.mse_loss(model(clean + 0.2 * torch.randn_like(clean)), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == (10 if arch == "unet" else 3)  # unet: 2 per residual block, 5 blocks at 3 levels
    assert all((bn.running_var - 1).abs().max() > 1e-3 and bn.running_mean.abs().max() > 1e-3 for bn in bns)

    x = torch.rand(2, channels, 19, 22)
    model.eval()
    with torch.no_grad():
        before = model(x)
        assert model.fold_batch_norm() is model
        after = model(x)
        model.train()  # no BN left, so train mode must give the same result
        after_train_mode = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert (before - after).abs().max() < 1e-4
    assert (before - after_train_mode).abs().max() < 1e-4
    # Folded, the model is structurally the batch_norm=False model, and its config says so.
    assert model.config == dataclasses.replace(tiny(arch, channels), batch_norm=False)
    plain = Restorer(model.config).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain.items()}


def test_fold_batch_norm_without_batch_norm_changes_nothing():
    model = Restorer(tiny("dncnn", 1, batch_norm=False)).eval()
    x = torch.rand(1, 1, 12, 12)
    with torch.no_grad():
        before = model(x)
        after = model.fold_batch_norm()(x)
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("arch", "resnet", "dncnn, fast, unet"),
        ("channels", 2, "1 (gray) or 3 (RGB)"),
        ("depth", 2, ">= 3"),
        ("width", 0, ">= 1"),
        ("batch_norm", "yes", "bool"),
    ],
)
def test_config_validation_names_field_value_and_expectation(field, value, expected):
    with pytest.raises(ValueError) as err:
        RestorerConfig(**{field: value})
    message = str(err.value)
    assert f"{field}={value!r}" in message
    assert expected in message


def test_forward_rejects_wrong_channel_count():
    model = Restorer(tiny("dncnn", 3))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(1, 1, 8, 8\)"):
        model(torch.rand(1, 1, 8, 8))


@pytest.mark.parametrize("channels", CHANNELS)
def test_fast_body_runs_at_half_resolution_and_costs_a_quarter(channels):
    x = torch.rand(1, channels, 256, 256)
    dncnn = Restorer(RestorerConfig(arch="dncnn", channels=channels, depth=6, width=16)).eval()
    fast = Restorer(RestorerConfig(arch="fast", channels=channels, depth=6, width=16)).eval()

    dncnn_shapes, fast_shapes = conv_inputs(dncnn, x), conv_inputs(fast, x)
    assert len(dncnn_shapes) == len(fast_shapes) == 6
    assert dncnn_shapes[0] == (1, channels, 256, 256)
    assert fast_shapes[0] == (1, 4 * channels, 128, 128)
    assert all(s[-2:] == (128, 128) for s in fast_shapes)
    # Same hidden layers at a quarter of the positions; only the first/last convs see 4C instead of C channels:
    # ratio = (4C*w + (depth-2)*w*w + w*4C) / (4 * (C*w + (depth-2)*w*w + w*C)), 0.27 (C=1) and 0.31 (C=3) here.
    c, w = channels, 16
    expected = (8 * c * w + 4 * w * w) / (4 * (2 * c * w + 4 * w * w))
    assert conv_macs(fast, x) / conv_macs(dncnn, x) == pytest.approx(expected)
    assert expected < 1 / 3


@pytest.mark.parametrize("arch", ["dncnn", "fast"])
def test_receptive_radius_matches_the_measured_support(arch):
    model = Restorer(tiny(arch, 1)).eval()
    size = 64
    radii = []
    for center in (31, 32):  # both positions inside a 2x2 block of the "fast" arch
        x = torch.rand(1, 1, size, size, requires_grad=True)
        model(x)[0, 0, center, center].backward()
        rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
        radii.append(int(max((rows - center).abs().max(), (cols - center).abs().max())))
    assert max(radii) == model.receptive_radius
    assert model.receptive_radius == (5 if arch == "dncnn" else 11)
    assert model.downscale == (1 if arch == "dncnn" else 2)


@pytest.mark.parametrize("levels", [2, 3, 4])
def test_unet_receptive_radius_bounds_the_measured_support_at_every_grid_position(levels):
    model = Restorer(RestorerConfig(arch="unet", depth=levels, width=8, batch_norm=False)).eval()
    grid, size = model.downscale, 4 * model.receptive_radius
    assert grid == 2 ** (levels - 1)
    measured = 0
    for offset in range(grid):  # every position of a pixel inside its grid cell
        center = size // 2 + offset
        x = torch.rand(1, 1, size, size, requires_grad=True)
        model(x)[0, 0, center, center].backward()
        rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
        measured = max(measured, int(max((rows - center).abs().max(), (cols - center).abs().max())))
    # An upper bound, and not a loose one: at most one grid cell beyond what is measured.
    assert measured <= model.receptive_radius <= measured + grid
    assert model.receptive_radius == 2 ** (levels + 2) - 4


def test_unet_levels_halve_the_resolution_and_double_the_width():
    model = Restorer(RestorerConfig(arch="unet", channels=3, depth=4, width=8)).eval()
    shapes = conv_inputs(model, torch.rand(1, 3, 50, 70))  # padded to multiples of 8: 56 x 72
    assert shapes[0] == (1, 3, 56, 72)
    assert {s[1:] for s in shapes} >= {(8, 56, 72), (16, 28, 36), (32, 14, 18), (64, 7, 9)}
    assert max(s[1] for s in shapes) == 64 and min(s[2] for s in shapes) == 7


@pytest.mark.parametrize("arch", ARCHS)
def test_a_short_adam_run_learns_to_denoise_a_real_photo(arch):
    camera = torch.from_numpy(data.camera().astype(np.float32) / 255.0)  # (512, 512)
    gen = torch.Generator().manual_seed(1)
    model = Restorer(tiny(arch, 1, width=16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        tops = torch.randint(0, 512 - 40, (8,), generator=gen)
        lefts = torch.randint(0, 512 - 40, (8,), generator=gen)
        clean = torch.stack([camera[t : t + 40, s : s + 40] for t, s in zip(tops, lefts, strict=True)])[:, None]
        noisy = clean + 25 / 255 * torch.randn(clean.shape, generator=gen)
        loss = F.mse_loss(model(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()

    clean = camera[None, None, 256:384, 256:384]
    noisy = clean + 25 / 255 * torch.randn(clean.shape, generator=gen)
    model.eval()
    with torch.no_grad():
        restored = model(noisy)

    def psnr(a):
        return float(10 * torch.log10(1 / F.mse_loss(a, clean)))

    # Measured: about +6 dB (dncnn) and +2.5 dB (fast, which learns more slowly at this depth) over the noisy input.
    assert psnr(restored) > psnr(noisy) + 1.5


def test_batch_norm_recalibration_is_the_plain_average_over_the_batches_and_keeps_the_weights():
    from restoration.train.restorer_core import recalibrate_batch_norm

    torch.manual_seed(0)
    model = Restorer(tiny("dncnn", 1))
    bn = model.body[1].bn
    bn.running_mean.fill_(5.0)  # stale statistics, as training can leave them
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.rand(4, 1, 16, 16) * (i + 1) for i in range(3)]  # three different input scales
    # What each batch alone gives the first BN layer: the per-channel mean of its input, averaged over the batches.
    means = []
    for x in batches:
        feats = model.body[0](x)
        means.append(model.body[1].conv(feats).mean(dim=(0, 2, 3)))
    model.eval()
    assert recalibrate_batch_norm(model, iter(batches)) == 3
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and not model.training  # restored
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
