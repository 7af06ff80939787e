"""`restoration bench quality` on small crops of real photos: numbers, ordering, protocol and the files it writes."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from restoration import degrade, metrics
from restoration.bench import quality
from restoration.bench.quality.images import center_crop
from restoration.checkpoint import load_named


def _gray(name: str) -> np.ndarray:
    image = Image.fromarray(getattr(skdata, name)()).convert("L")
    return np.asarray(image, dtype=np.float32)[..., None] / 255.0  # (H, W, 1)


def _rgb(name: str) -> np.ndarray:
    return np.asarray(getattr(skdata, name)(), dtype=np.float32) / 255.0  # (H, W, 3)


def _rows(result: quality.QualityResult) -> dict[tuple[str, str], dict]:
    return {(r["method"], r["degradation"]): r for r in result.rows}


def test_gray_benchmark_orders_methods_follows_the_protocol_and_writes_files(tmp_path):
    import bm3d

    clean = [_gray("camera"), _gray("astronaut")]
    config = quality.QualityConfig(
        images=clean,
        sigmas=(25,),
        models=("denoise-gray",),
        methods=("noisy", "bm3d"),
        crop=96,
        threads=1,
        out_dir=str(tmp_path / "out"),
    )
    result = quality.benchmark(config)
    rows = _rows(result)
    assert set(rows) == {("noisy", "noise:25"), ("bm3d", "noise:25"), ("denoise-gray", "noise:25")}
    for row in result.rows:
        assert row["images"] == 2 and len(row["per_image"]) == 2
        assert all(math.isfinite(row[k]) for k in ("psnr", "ssim", "seconds_per_mp", "cpu_seconds_per_mp"))
        assert row["seconds_per_mp"] >= 0 and row["cpu_seconds_per_mp"] >= 0
    noisy, ours, bm = (rows[(m, "noise:25")] for m in ("noisy", "denoise-gray", "bm3d"))
    # sigma 25 noise is 20.2 dB before clipping; denoisers gain 6+ dB on these photos.
    assert 19.5 < noisy["psnr"] < 22.0
    assert bm["psnr"] > noisy["psnr"] + 5.0 and ours["psnr"] > noisy["psnr"] + 5.0
    assert bm["ssim"] > noisy["ssim"] + 0.2 and ours["ssim"] > noisy["ssim"] + 0.2

    # The protocol, recomputed outside the benchmark for the first image: noise seeded by (image, sigma), BM3D fed
    # the unclipped noisy array, every output clipped before PSNR.
    crop = center_crop(clean[0], 96)
    noisy_image = degrade.gaussian_noise(crop, 25, degrade.rng_for(0, "array-0/noise:25"))
    assert noisy["per_image"][0]["psnr"] == pytest.approx(metrics.psnr(np.clip(noisy_image, 0, 1), crop), abs=1e-9)
    profile = bm3d.BM3DProfile()
    profile.num_threads = 1
    expected = bm3d.bm3d(noisy_image[..., 0].astype(np.float64), sigma_psd=25 / 255, profile=profile)
    assert bm["per_image"][0]["psnr"] == pytest.approx(metrics.psnr(np.clip(expected, 0, 1), crop[..., 0]), abs=1e-6)

    paths = quality.write_report(result, config.out_dir)
    payload = json.loads(paths["json"].read_text())
    assert payload["threads"] == 1 and payload["mode"] == "gray"
    assert [r["method"] for r in payload["rows"]] == ["noisy", "bm3d", "denoise-gray"]
    assert payload["rows"][1]["psnr"] == pytest.approx(bm["psnr"])
    assert [v["image"] for v in payload["rows"][2]["per_image"]] == ["array-0", "array-1"]
    markdown = paths["markdown"].read_text()
    assert "| method | noise:25 | s/MP | CPU s/MP |" in markdown and "2 arrays given by the caller" in markdown
    assert f"| bm3d | {bm['psnr']:.2f} / {bm['ssim']:.4f} |" in markdown
    with Image.open(paths["sheet"]) as sheet:
        # 2 images x (full row + crop row), 4 columns (clean | noisy | bm3d | denoise-gray), cells 256 px high.
        assert sheet.mode == "RGB" and sheet.width > 4 * 256 and sheet.height > 4 * 250
    table = quality.format_table(result.rows).splitlines()
    assert table[0].split() == ["method", "noise:25", "s/MP", "CPU", "s/MP"] and len(table) == 2 + 3


def test_color_benchmark_cbm3d_and_gray_model_per_channel_beat_the_noise(tmp_path):
    clean = skdata.astronaut().astype(np.float32) / 255.0
    config = quality.QualityConfig(
        color=True,
        images=[clean],
        sigmas=(25,),
        models=("denoise-gray",),
        methods=("noisy", "cbm3d"),
        crop=96,
        threads=1,
        sheet_images=1,
    )
    result = quality.benchmark(config)
    rows = _rows(result)
    assert set(rows) == {("noisy", "noise:25"), ("cbm3d", "noise:25"), ("denoise-gray (per channel)", "noise:25")}
    assert all(math.isfinite(r["psnr"]) and math.isfinite(r["ssim"]) for r in result.rows)
    noisy = rows[("noisy", "noise:25")]["psnr"]
    assert rows[("cbm3d", "noise:25")]["psnr"] > noisy + 5.0
    assert rows[("denoise-gray (per channel)", "noise:25")]["psnr"] > noisy + 4.0
    assert quality.quality_sheet(result).shape[2] == 3


def _restore_independently(name: str, degraded: np.ndarray) -> np.ndarray:
    """A bundled restorer on one (H, W, 1) image, straight from its model file: no ModelRunner, no BN folding, fp32."""
    loaded = load_named(name, expected_kind="restorer")
    with torch.inference_mode():
        out = loaded.module.eval()(torch.from_numpy(np.ascontiguousarray(degraded.transpose(2, 0, 1)))[None])
    return np.clip(out[0].numpy().transpose(1, 2, 0), 0, 1)


def test_restore_models_get_jpeg_and_blur_rows_and_each_model_its_own_numbers():
    # A restore-* model adds JPEG and blur rows, which every model of the run gets (denoise-gray as the reference)
    # and which the input rows show the damage of.
    clean = _gray("camera")
    config = quality.QualityConfig(
        images=[clean], sigmas=(25,), models=("denoise-gray", "restore-gray"), methods=("noisy",), crop=64, threads=1
    )
    result = quality.benchmark(config)
    rows = _rows(result)
    specs = ["noise:25", "jpeg:10", "jpeg:20", "blur:1"]
    assert list(dict.fromkeys(r["degradation"] for r in result.rows)) == specs
    crop = center_crop(clean, 64)
    inputs = {
        "noise:25": degrade.gaussian_noise(crop, 25, degrade.rng_for(0, "array-0/noise:25")),
        "jpeg:10": degrade.jpeg(crop, 10),
        "jpeg:20": degrade.jpeg(crop, 20),
        "blur:1": degrade.gaussian_blur(crop, 1),
    }
    for spec, degraded in inputs.items():
        if spec != "noise:25":
            assert rows[("input", spec)]["psnr"] == pytest.approx(metrics.psnr(degraded, crop), abs=1e-9)
        # Each model's row is its own model's output, recomputed here from the model file (the benchmark runs the
        # pipeline's ModelRunner: BN folded, bf16 on CPUs with bf16 units, which moved the U-Net's PSNR by up to 0.05 dB;
        # two models differ by more than 0.3 dB, checked below).
        for model in ("denoise-gray", "restore-gray"):
            expected = metrics.psnr(_restore_independently(model, degraded), crop)
            assert rows[(model, spec)]["psnr"] == pytest.approx(expected, abs=0.1), (model, spec)
    # Two different models, two different sets of numbers; the one trained on JPEG restores it.
    for spec in specs:
        assert abs(rows[("restore-gray", spec)]["psnr"] - rows[("denoise-gray", spec)]["psnr"]) > 0.3, spec
    assert rows[("restore-gray", "jpeg:10")]["psnr"] > rows[("input", "jpeg:10")]["psnr"] + 0.5
    assert rows[("input", "jpeg:10")]["psnr"] < rows[("input", "jpeg:20")]["psnr"]
    assert ("noisy", "jpeg:10") not in rows and ("input", "noise:25") not in rows


def test_cli_runs_on_a_folder_and_prints_the_table(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("camera", "moon"):
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.png")
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(
        ["--images", str(folder), "--sigmas", "15,50", "--methods", "noisy,tv,wavelet", "--models", "denoise-gray"]
        + ["--crop", "64", "--threads", "1", "--limit", "1", "--out", str(out)]
    )
    assert quality.run(args) == 0
    printed = capsys.readouterr().out
    assert f"folder {folder}" in printed and "threads: 1" in printed
    header = next(line for line in printed.splitlines() if line.startswith("method"))
    assert header.split() == ["method", "noise:15", "noise:50", "s/MP", "CPU", "s/MP"]
    payload = json.loads((out / "quality.json").read_text())
    assert [i["name"] for i in payload["images"]] == ["camera.png"]
    by_key = {(r["method"], r["degradation"]): r["psnr"] for r in payload["rows"]}
    assert len(by_key) == 4 * 2
    for method in ("tv", "wavelet", "denoise-gray"):
        # More noise, lower PSNR; and every method beats the input at both levels.
        assert by_key[(method, "noise:15")] > by_key[(method, "noise:50")]
        for spec in ("noise:15", "noise:50"):
            assert by_key[(method, spec)] > by_key[("noisy", spec)] + 1.0
    assert (out / "quality.md").is_file() and (out / "quality_sheet.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigmas": (25, -5)}, r"sigma -5: expected a number in \(0, 255\]"),
        ({"sigmas": ()}, "sigmas is empty"),
        ({"methods": ("bm3d", "median")}, r"method 'median': expected one of noisy, bm3d"),
        ({"color": True, "methods": ("bm3d",)}, r"method 'bm3d': expected one of noisy, cbm3d"),
        ({"crop": 8}, r"crop=8: expected an integer >= 16"),
        ({"limit": 0}, r"limit=0: expected an integer >= 1"),
        ({"threads": 1.5}, r"threads=1.5: expected an integer >= 1"),
    ],
)
def test_bad_option_values_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quality.QualityConfig(**kwargs)


def test_bad_cli_values_and_unknown_models_raise_value_error(tmp_path):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    with pytest.raises(ValueError, match=r"--sigmas value 'x25': expected numbers"):
        quality.config_from_args(parser.parse_args(["--sigmas", "15,x25"]))
    config = quality.QualityConfig(images=[_gray("camera")], sigmas=(25,), models=("no-such-model",), crop=32)
    with pytest.raises(ValueError, match="no-such-model"):
        quality.benchmark(config)
    with pytest.raises(ValueError, match="does not exist"):
        quality.benchmark(quality.QualityConfig(images=str(tmp_path / "missing"), models=()))


def test_a_datasets_folder_that_was_asked_for_must_exist(tmp_path, monkeypatch):
    from restoration import sources
    from restoration.errors import UserError

    monkeypatch.delenv(sources.DATASETS_ENV, raising=False)
    assert sources.datasets_dir() == sources.DEFAULT_DATASETS  # the default may be missing: callers fall back
    assert sources.datasets_dir(tmp_path) == tmp_path
    with pytest.raises(UserError, match="missing"):
        sources.datasets_dir(tmp_path / "missing")
    monkeypatch.setenv(sources.DATASETS_ENV, str(tmp_path / "missing"))
    with pytest.raises(UserError, match="RESTORATION_DATASETS"):
        sources.datasets_dir()


def test_upscale_benchmark_protocol_rows_and_files(tmp_path):
    """`--task upscale` on one scale, two images of each set and an untrained tiny model: rows, protocol, files."""
    from restoration.bench.quality import upscale
    from restoration.checkpoint import save_model
    from restoration.models.upscaler import Upscaler, UpscalerConfig

    torch.manual_seed(0)
    model_file = tmp_path / "tiny-x3.pt"
    config = UpscalerConfig(scale=3, channels=1, width=8, depth=3)
    save_model(model_file, "upscaler", config, Upscaler(config))
    photos = {"colour": [("astronaut", _rgb("astronaut")[:100, :131])], "gray": [("camera", _gray("camera")[:90, :97])]}
    result = upscale.benchmark(
        upscale.UpscaleConfig(scales=(3,), models=(str(model_file),), images=photos, threads=1, sheet_images=1)
    )
    rows = {(r["method"], r["set"]): r for r in result["rows"]}
    assert set(rows) == {(m, s) for m in ("nearest", "bicubic", "lanczos", "tiny-x3") for s in ("colour", "gray")}
    assert all(r["scale"] == 3 and r["images"] == 1 and r["seconds_per_mp"] >= 0 for r in result["rows"])
    assert rows[("bicubic", "colour")]["psnr"] > rows[("nearest", "colour")]["psnr"]
    # The protocol, recomputed outside the benchmark: modcrop, lr:3, Pillow bicubic up, Y PSNR with a 3-pixel border.
    original = photos["colour"][0][1]
    hr = degrade.modcrop(original, 3)
    lr = degrade.apply(original, "lr:3", np.random.default_rng(0))
    assert lr.shape == (33, 43, 3) and hr.shape == (99, 129, 3)
    expected = metrics.psnr_y(np.clip(upscale.pillow_up(lr, 3, "bicubic"), 0, 1), hr, border=3)
    assert rows[("bicubic", "colour")]["psnr"] == pytest.approx(expected, abs=1e-9)
    # A gray model runs on Y of colour images: Y in, Y out, the colour round trip exact.
    ycbcr = upscale.rgb_to_ycbcr(hr)
    np.testing.assert_allclose(ycbcr[..., 0], metrics.rgb_to_y(hr), atol=1e-6)
    np.testing.assert_allclose(upscale.ycbcr_to_rgb(ycbcr), hr, atol=1e-5)

    paths = upscale.write_report(result, tmp_path / "out")
    markdown = paths["markdown"].read_text()
    assert "| method | colour x3 | gray x3 | s/MP |" in markdown and "SRCNN (published)" not in markdown
    assert json.loads(paths["json"].read_text())["rows"][0]["method"] == "nearest"
    with Image.open(paths["sheet"]) as sheet:
        assert sheet.mode == "RGB" and sheet.width > 4 * 99
    table = upscale.format_table(result).splitlines()
    assert table[0].split() == ["method", "colour", "x3", "gray", "x3", "s/MP"] and len(table) == 2 + 4


def test_upscale_options_reject_bad_values():
    from restoration.bench.quality import upscale
    from restoration.errors import UserError

    with pytest.raises(UserError, match="scale 5: expected one of 2, 3, 4"):
        upscale.UpscaleConfig(scales=(5,))
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(["--task", "upscale", "--scales", "2,x"])
    with pytest.raises(UserError, match="--scales value 'x'"):
        quality.cli.upscale_config_from_args(args)
    assert parser.parse_args([]).task == "denoise"
