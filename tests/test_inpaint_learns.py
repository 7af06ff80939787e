"""The inpainter's training step learns: a tiny net, a fixed number of steps of the training loop's own batches and
loss, and PSNR inside the holes of held-out images rises above the push-pull fill it starts from.

The images are random gratings (oriented sinusoids): the push-pull fill smears a hole into the local mean, so what a
net gains by continuing the stripes shows within a hundred steps of a tiny model, where on photos it takes thousands.
The held-out gratings are drawn from another seed, so the net must generalise, not remember.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from restoration.checkpoint import save_model
from restoration.errors import UserError
from restoration.models.inpainter import Inpainter, push_pull
from restoration.train.inpainter import (
    InpainterTrainConfig,
    evaluate,
    init_weights,
    inpaint_loss,
    inpainter_step,
    training_batches,
    validation_set,
)


def gratings(count: int, size: int, seed: int) -> list[np.ndarray]:
    """`count` float32 (size, size, 1) images 0.5 + 0.4 sin(f <(cos t, sin t), (x, y)> + phase), random t, f, phase."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(count):
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.15, 0.4), rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.4 * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
        out.append(wave[..., None].astype(np.float32))
    return out


CFG = dict(width=8, levels=2, bottleneck=1, patch_size=48, batch_size=8, lr=3e-3, val_max_side=64)
CFG |= dict(coverage_min=0.05, coverage_max=0.3, val_coverage=0.2)


def test_psnr_inside_held_out_holes_rises_within_a_fixed_number_of_steps():
    torch.manual_seed(0)
    cfg = InpainterTrainConfig(**CFG)
    model = Inpainter(cfg.model_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    held_out = validation_set(gratings(6, 64, seed=1), cfg)
    before = evaluate(model, held_out)
    assert before["psnr_hole"] == pytest.approx(before["psnr_fill_hole"])  # the untrained net is the push-pull fill

    batches = training_batches(cfg, gratings(64, 64, seed=0), (0, 0, 0), torch.device("cpu"))
    for _ in range(100):
        x, target = next(batches)
        inpainter_step(model, optimizer, x, target, cfg.outside_weight, cfg.grad_clip)
    after = evaluate(model, held_out)
    assert after["psnr_hole"] > before["psnr_hole"] + 0.5, (before, after)
    assert after["psnr"] > before["psnr"]  # the whole image too (the known pixels are the same)


def test_the_loss_weighs_the_holes_and_a_little_outside():
    target = torch.zeros(1, 1, 4, 4)
    missing = torch.zeros(1, 1, 4, 4)
    missing[..., :2, :] = 1  # 8 pixels in the holes, 8 outside
    inside_wrong = torch.where(missing > 0, 1.0, 0.0)
    outside_wrong = 1 - inside_wrong
    assert float(inpaint_loss(inside_wrong, target, missing, 0.1)) == pytest.approx(8 / (8 + 0.8))
    assert float(inpaint_loss(outside_wrong, target, missing, 0.1)) == pytest.approx(0.8 / (8 + 0.8))


def test_a_step_cuts_the_gradients_global_norm_to_grad_clip():
    """With plain SGD at lr 1 a step moves the weights by exactly the gradient it applied: cut to `grad_clip` when the
    gradient is larger, and left whole when clipping is off (0)."""
    cfg = InpainterTrainConfig(**CFG)
    x, target = next(training_batches(cfg, gratings(8, 64, seed=0), (0, 0, 0), torch.device("cpu")))
    moved = {}
    for clip in (0.0, 1e-3):
        torch.manual_seed(0)
        model = Inpainter(cfg.model_config())
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        stats = inpainter_step(model, torch.optim.SGD(model.parameters(), lr=1.0), x, target, cfg.outside_weight, clip)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        moved[clip] = (float((after - before).norm()), stats["grad_norm"])
    (whole, norm), (cut, norm_again) = moved[0.0], moved[1e-3]
    assert norm == pytest.approx(norm_again) and norm > 1e-2  # the same gradient both times, far above the cut
    assert whole == pytest.approx(norm, rel=1e-3)
    assert cut == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("grad_clip", -1.0, r"grad_clip must be >= 0 \(0: no clipping\), got -1.0"),
        ("outside_weight", -0.1, "outside_weight"),
    ],
)
def test_bad_training_fields_are_one_line_errors(field, value, expected):
    with pytest.raises(UserError, match=expected):
        InpainterTrainConfig(**{field: value})


def test_a_gray_model_starts_an_rgb_run_that_inpaints_gray_images_as_it_did(tmp_path):
    """`init_from` a gray inpainter into an RGB run: on an image whose three channels are equal the RGB net predicts,
    in each channel, what the gray net predicts; on a colour image each channel keeps its own fill (the nets differ
    from the push-pull fill by the same amount in every channel). A net of another size is refused."""
    torch.manual_seed(0)
    cfg = InpainterTrainConfig(**CFG)
    gray = Inpainter(cfg.model_config())
    torch.nn.init.normal_(gray.tail.weight, std=0.05)  # a trained tail: the untrained one predicts the fill alone
    path = tmp_path / "gray.pt"
    save_model(path, "inpainter", gray.config, gray)
    rgb_config = InpainterTrainConfig(**CFG, channels=3).model_config()
    rgb = Inpainter(rgb_config)
    rgb.load_state_dict(init_weights(str(path), rgb_config))

    image, missing = torch.rand(2, 1, 64, 64), (torch.rand(2, 1, 64, 64) < 0.3).float()
    with torch.no_grad():
        expected = gray.predict(torch.cat([image, missing], 1))
        got = rgb.predict(torch.cat([image.expand(-1, 3, -1, -1), missing], 1))
        np.testing.assert_allclose(got.numpy(), expected.expand(-1, 3, -1, -1).numpy(), atol=1e-5)
        assert float((expected - push_pull(image, 1 - missing)).abs().max()) > 1e-2  # the tail does change the fill

        colour = torch.rand(2, 3, 64, 64)
        residual = rgb.predict(torch.cat([colour, missing], 1)) - push_pull(colour, 1 - missing)
        luma_residual = gray.predict(torch.cat([colour.mean(1, keepdim=True), missing], 1)) - push_pull(
            colour.mean(1, keepdim=True), 1 - missing
        )
        np.testing.assert_allclose(residual.numpy(), luma_residual.expand(-1, 3, -1, -1).numpy(), atol=1e-5)

    wider = InpainterTrainConfig(**{**CFG, "width": 16}, channels=3).model_config()
    with pytest.raises(UserError, match="but this run trains"):
        init_weights(str(path), wider)
