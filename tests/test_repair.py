"""Blind damage repair: the repairer model, its training steps, the actor's bit-exact composite and found mask, the
pipeline's `--emit-mask` column and error rows, and `bench quality --task repair` (no Ray here)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from restoration import codec, degrade, inference, train
from restoration.bench.quality import repair as bench_repair
from restoration.checkpoint import save_model
from restoration.errors import UserError
from restoration.models.repairer import Repairer, RepairerConfig
from restoration.pipelines.restore import RestoreConfig, decode_batch, encode_batch, run_restore
from restoration.train import repairer as train_repairer

TINY = RepairerConfig(detector_width=8, detector_depth=3, fill_width=8, fill_levels=1, fill_bottleneck=0)


def _gratings(n: int, size: int, seed: int, channels: int = 1) -> list[np.ndarray]:
    """Smooth random images (sums of two oriented sinusoids) in [0.15, 0.85]: never the 0 and 1 of the damage."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for _ in range(n):
        image = np.zeros((size, size, channels), np.float32)
        for c in range(channels):
            for _ in range(2):
                fx, fy, phase = rng.uniform(-0.15, 0.15, 2).tolist() + [rng.uniform(0, 6.3)]
                image[..., c] += np.sin(fx * xx + fy * yy + phase)
        out.append((0.5 + 0.35 * image / 2).astype(np.float32))
    return out


def _saturated(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) 1 where x is at 0 or 1 (the values scratches and spots hold; the gratings never are)."""
    return ((x <= 0) | (x >= 1)).any(1, keepdim=True).to(x.dtype)


def _model_file(tmp_path, config: RepairerConfig = TINY, seed: int = 0) -> str:
    torch.manual_seed(seed)
    path = tmp_path / "repairer.pt"
    save_model(path, "repairer", config, Repairer(config))
    return str(path)


@pytest.mark.parametrize("channels", [1, 3])
def test_the_untrained_repairer_returns_its_input_and_trains_both_stages(channels):
    config = RepairerConfig(**{**TINY.__dict__, "channels": channels})
    model = Repairer(config)
    x = torch.rand(2, channels, 37, 45)
    y = model(x)
    assert y.shape == (2, channels + 1, 37, 45)
    assert torch.equal(y[:, :channels], x) and not y[:, channels:].any()  # finds nothing, changes nothing
    damage = (torch.rand(2, 1, 37, 45) > 0.9).float()
    logits, fill = model(x, damage)
    assert logits.shape == (2, 1, 37, 45) and fill.shape == (2, channels, 37, 45)
    (logits.mean() + fill.mean()).backward()
    assert model.detector.logit.weight.grad is not None and model.fill.tail.weight.grad is not None


def test_repair_array_keeps_every_pixel_outside_the_found_mask_bit_exact(tmp_path):
    runner = inference.ModelRunner(_model_file(tmp_path), precision="fp32")
    assert runner.repairing and runner.applied(1) == "native"
    runner.net.find = _saturated  # a detector that marks exactly the 0 and 1 the damage drew
    image = _gratings(1, 40, seed=1)[0]
    damaged = degrade.scratches(image, 3, np.random.default_rng(0))
    white = (damaged[..., 0] <= 0) | (damaged[..., 0] >= 1)
    out, found = runner.repair_array(damaged[None])
    assert np.array_equal(found[0], white) and white.any()
    assert np.array_equal(out[0][~white], damaged[~white])  # bit for bit
    assert np.abs(out[0][white] - image[white]).mean() < np.abs(damaged[white] - image[white]).mean() / 2
    # Colour through a gray model: each channel, the mask found in any of them.
    color = np.concatenate([damaged, image, image], axis=2)
    out, found = runner.repair_array(color[None])
    assert np.array_equal(found[0], white) and np.array_equal(out[0][~white], color[~white])


def test_a_clean_image_comes_back_unchanged_where_nothing_is_found(tmp_path):
    actor = inference.RestoreActor(_model_file(tmp_path), precision="fp32")
    image = _gratings(1, 48, seed=2, channels=1)[0]
    assert np.array_equal(actor.restore_array(image[None]), image[None])


def test_repair_family_picks_the_gray_and_colour_variants():
    assert inference.models_by_channels("repair") == {1: "repair-gray", 3: "repair-color"}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(codec.to_uint(pixels, 8)[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_pipeline_stages_emit_the_found_mask_and_keep_error_rows(tmp_path):
    model = _model_file(tmp_path)
    image = _gratings(1, 32, seed=3)[0]
    batch = pa.table({"key": ["a.png", "bad.png"], "image": pa.array([_png(image), b"not an image"], pa.binary())})
    decoded = decode_batch(batch, "scratch:2", seed=0)
    actor = inference.RestoreActor(model, precision="fp32")
    actor.runners[1].net.find = _saturated
    restored = actor(decoded)
    rows = encode_batch(restored, model, None, "run", emit_mask=True).to_pylist()
    assert [r["key"] for r in rows] == ["a.png", "bad.png"]  # rows out = rows in
    assert rows[1]["error"].startswith("decode:") and rows[1]["image"] is None and rows[1]["mask"] is None
    ok = rows[0]
    assert ok["error"] is None and ok["model_applied"] == "native"
    mask = np.asarray(Image.open(io.BytesIO(ok["mask"])))
    damaged = degrade.apply(image, "scratch:2", degrade.rng_for(0, "a.png"))
    hit = (damaged[..., 0] <= 0) | (damaged[..., 0] >= 1)
    assert set(np.unique(mask)) == {0, 255} and np.array_equal(mask == 255, hit)
    assert encode_batch(restored, model, None, "run").to_pylist()[0]["mask"] is None  # only when asked


def test_emit_mask_with_a_model_that_is_not_a_repairer_fails_in_one_line(tmp_path):
    with pytest.raises(UserError, match="--emit-mask needs a repair model"):
        run_restore(RestoreConfig(str(tmp_path / "in"), str(tmp_path / "out"), model="denoise-gray", emit_mask=True))


def test_train_config_presets_and_bad_values():
    config = train.resolve_config("repairer", "repair-tiny")
    assert config.model_config().detector_depth == 3
    for bad in ({"clean_share": 1.5}, {"max_scratches": 0, "max_spots": 0}, {"val_damage": "scratch:x"}, {"grow": 9}):
        with pytest.raises(UserError):
            train.resolve_config("repairer", "repair-tiny", bad)


def test_damage_batches_record_their_masks_and_leave_a_share_clean():
    cfg = train.resolve_config("repairer", "repair-tiny", {"clean_share": 0.5, "tone_share": 0.0, "batch_size": 64})
    batches = train_repairer.training_batches(cfg, _gratings(4, 48, seed=4), (0, 0, 0), torch.device("cpu"))
    damaged, mask, clean = next(batches)
    changed = (damaged != clean).any(1, keepdim=True)  # (B, 1, p, p)
    assert not (changed & (mask == 0)).any()  # every changed pixel is in the recorded mask
    untouched = (mask.flatten(1).sum(1) == 0).float().mean().item()
    assert 0.3 < untouched < 0.8  # about clean_share (+ patches drawn with no damage)


def test_a_tiny_repairer_learns_on_held_out_images():
    """200 steps on random gratings: the repaired held-out images gain over the damaged input (the untrained model
    returns the input), and the detector's mask overlaps the damage."""
    cfg = train.resolve_config("repairer", "repair-tiny", {"lr": 3e-3, "tone_share": 0.0, "val_damage": "scratch:3"})
    torch.manual_seed(0)
    model = Repairer(cfg.model_config())
    pairs = train_repairer.validation_pairs(_gratings(4, 48, seed=5), cfg)
    before = train_repairer.evaluate(model, pairs)
    assert before["psnr"] == pytest.approx(before["psnr_input"]) and before["iou"] == 0
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = train_repairer.training_batches(cfg, _gratings(16, 64, seed=6), (0, 0, 0), torch.device("cpu"))
    for _ in range(200):
        train_repairer.repairer_step(model, optimizer, *next(batches), cfg)
    after = train_repairer.evaluate(model, pairs)
    assert after["psnr"] > before["psnr"] + 3.0
    assert after["iou"] > 0.15  # of a mask grown by a pixel: about 0.4 for the trained models
    assert after["clean_psnr"] > 40.0


def test_bench_repair_rows_on_two_small_images(tmp_path):
    images = [(f"g{i}", np.round(im * 255) / 255) for i, im in enumerate(_gratings(2, 40, seed=7))]  # 8-bit
    config = bench_repair.RepairConfig(damage="scratch:2,spots:3", models=(_model_file(tmp_path),), images=images)
    result = bench_repair.benchmark(config)
    rows = {(r["method"], r["damage"]): r for r in result["rows"]}
    assert set(rows) == {(m, d) for m in ("input", "median 3x3", "repairer") for d in ("scratch:2,spots:3", "none")}
    assert rows[("input", "none")]["psnr"] == bench_repair.EXACT_PSNR  # the input against itself
    assert rows[("repairer", "none")]["psnr"] == bench_repair.EXACT_PSNR  # an untrained repairer changes nothing
    assert rows[("repairer", "scratch:2,spots:3")]["psnr"] == pytest.approx(
        rows[("input", "scratch:2,spots:3")]["psnr"]
    )
    assert rows[("median 3x3", "none")]["psnr"] < 60  # the median filter blurs clean images
    assert "repairer - median 3x3" in bench_repair.format_table(result)
    paths = bench_repair.write_report(result, tmp_path / "out")
    assert all(p.exists() for p in paths.values())
    for bad in ({"damage": "noise:5"}, {"damage": "scratch:x"}, {"limit": 0}):
        with pytest.raises(UserError):
            bench_repair.RepairConfig(**bad)

    # `--images FOLDER`: that folder's images, not Set12.
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, image in images:
        Image.fromarray(codec.to_uint(image, 8)[..., 0]).save(folder / f"{name}.png")
    from_folder = bench_repair.benchmark(bench_repair.RepairConfig(damage="scratch:2,spots:3", images=str(folder)))
    assert from_folder["description"] == str(folder)
    assert [v["image"] for v in from_folder["rows"][0]["per_image"]] == ["g0", "g1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        bench_repair.benchmark(bench_repair.RepairConfig(images=str(tmp_path / "empty")))


@pytest.mark.slow
def test_model_repair_through_ray_picks_each_variant_repairs_and_emits_masks(ray_cluster, tmp_path):
    """`restore --model repair --emit-mask` on a folder: the bundled gray and colour repairers, chosen per image, fill
    the damage they find, return an undamaged photo all but unchanged, and write the mask of what they changed."""
    import skimage.data

    from restoration import metrics, runs

    gray = skimage.data.camera()[96:224, 160:288, None].astype(np.float32) / 255
    colour = skimage.data.astronaut()[:160, 100:260].astype(np.float32) / 255
    clean = skimage.data.camera()[300:428, 200:328, None].astype(np.float32) / 255
    folder = tmp_path / "in"
    folder.mkdir()
    originals, damage = {"gray.png": gray, "colour.png": colour, "clean.png": clean}, {}
    for i, (key, photo) in enumerate(originals.items()):
        damaged, mask = (
            (photo, None)
            if key == "clean.png"
            else degrade.apply_masked(photo, "scratch:10,spots:20", np.random.default_rng(i))
        )
        pixels = codec.to_uint(damaged, 8)
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(folder / key)
        damage[key] = (pixels.astype(np.float32) / 255, mask)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    report = run_restore(
        RestoreConfig(str(folder), str(tmp_path / "out"), model="repair", run_id="r", emit_mask=True, precision="fp32")
    )
    assert (report.rows_in, report.rows_out, report.ok, report.errors) == (4, 4, 3, 1)
    assert {name: entry["rows"] for name, entry in report.models.items()} == {"repair-gray": 2, "repair-color": 1}
    rows = {r["key"]: r for r in runs.read_output(report.output, ["key", "image", "mask", "error"]).to_pylist()}
    assert rows["broken.png"]["error"].startswith("decode:")
    for key, photo in originals.items():
        out = np.asarray(Image.open(io.BytesIO(rows[key]["image"])), np.float32).reshape(photo.shape) / 255
        found = np.asarray(Image.open(io.BytesIO(rows[key]["mask"]))) == 255
        given, mask = damage[key]
        assert np.array_equal(out[~found], given[~found]), key  # nothing outside the mask it reports changed
        if mask is None:
            assert metrics.psnr(out, given) >= 40.0 and found.mean() < 0.01
        else:
            assert metrics.psnr(out, photo) > metrics.psnr(given, photo) + 4.0, key
            assert (found & mask).sum() > 0.5 * mask.sum(), key
