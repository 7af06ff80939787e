"""Colour restoration: the per-image model choice for every input mode, alpha and size kept, and the bundled colour
models (load by name, denoise a colour photo, beat the gray model per channel)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import skimage.data
import torch
from PIL import Image

from restoration import degrade, inference, metrics, runs
from restoration.checkpoint import save_model
from restoration.inference import RestoreActor, models_by_channels
from restoration.models.restorer import Restorer, RestorerConfig
from restoration.pipelines import restore
from restoration.pipelines.restore import decode_batch, encode_batch


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[str, str]:
    """Untrained but real gray and colour restorer files (routing and plumbing, not quality)."""
    folder = tmp_path_factory.mktemp("pair")
    paths = []
    for channels, name in ((1, "tiny-gray"), (3, "tiny-color")):
        torch.manual_seed(channels)
        model = Restorer(RestorerConfig(channels=channels, depth=3, width=8))
        save_model(folder / f"{name}.pt", "restorer", model.config, model)
        paths.append(str(folder / f"{name}.pt"))
    return paths[0], paths[1]


def _photo(side: int = 40) -> np.ndarray:
    return skimage.data.astronaut()[100 : 100 + side, 180 : 180 + side + 8]  # (H, W, 3) uint8, not square


def _encoded(mode: str) -> bytes:
    rgb = Image.fromarray(_photo())
    if mode == "RGBA":
        image = rgb.copy()
        image.putalpha(Image.fromarray(np.tile(np.arange(rgb.width, dtype=np.uint8) * 5, (rgb.height, 1))))
    elif mode == "LA":
        image = rgb.convert("LA")
        image.putalpha(128)
    elif mode == "P":
        image = rgb.quantize(64)
    else:
        image = rgb.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    return buf.getvalue()


def _name(mode: str) -> str:
    return f"{mode}.jpg" if mode == "CMYK" else f"{mode}.png"


# Input mode -> (model variant the family picks, mode of the restored PNG).
EXPECTED = {
    "L": ("tiny-gray", "L"),
    "LA": ("tiny-gray", "LA"),
    "RGB": ("tiny-color", "RGB"),
    "RGBA": ("tiny-color", "RGBA"),
    "P": ("tiny-color", "RGB"),  # palette images are restored as the RGB they show
    "CMYK": ("tiny-color", "RGB"),  # PNG has no CMYK: restored as RGB
}


def _restore_modes(model: str, modes) -> list[dict]:
    batch = pa.table({"key": [f"{m}.img" for m in modes], "image": [_encoded(m) for m in modes]})
    restored = RestoreActor(model, tile=64, overlap=8, precision="fp32")(decode_batch(batch))
    return encode_batch(restored, model=model, model_sha256=None, run_id="r").to_pylist()


def test_a_family_picks_the_gray_or_colour_variant_per_image_mode(tiny_pair, monkeypatch):
    monkeypatch.setitem(inference.MODEL_FAMILIES, "tiny", tiny_pair)
    rows = _restore_modes("tiny", list(EXPECTED))
    for row, (mode, (model, out_mode)) in zip(rows, EXPECTED.items(), strict=True):
        assert row["error"] is None, row
        assert (row["model"], row["model_applied"], row["mode"]) == (model, "native", out_mode), mode
        assert len(row["model_sha256"]) == 64
        with Image.open(io.BytesIO(row["image"])) as out:
            assert out.mode == out_mode and out.size == (48, 40), mode
    rgba = next(r for r in rows if r["key"] == "RGBA.img")
    with Image.open(io.BytesIO(rgba["image"])) as out, Image.open(io.BytesIO(_encoded("RGBA"))) as src:
        assert np.array_equal(np.asarray(out)[..., 3], np.asarray(src)[..., 3])  # alpha untouched
    la = next(r for r in rows if r["key"] == "LA.img")
    with Image.open(io.BytesIO(la["image"])) as out:
        assert (np.asarray(out)[..., 1] == 128).all()


def test_an_explicit_model_is_honoured_and_the_row_says_how_it_was_applied(tiny_pair):
    gray, color = tiny_pair
    assert models_by_channels(gray) == {1: gray, 3: gray}
    assert models_by_channels("denoise") == {1: "denoise-gray", 3: "denoise-color"}
    on_color = _restore_modes(gray, ["RGB", "L"])
    assert [(r["model"], r["model_applied"], r["mode"]) for r in on_color] == [
        ("tiny-gray", "per-channel", "RGB"),
        ("tiny-gray", "native", "L"),
    ]
    on_gray = _restore_modes(color, ["L", "RGBA"])
    assert [(r["model"], r["model_applied"], r["mode"]) for r in on_gray] == [
        ("tiny-color", "replicated", "L"),
        ("tiny-color", "native", "RGBA"),
    ]


def test_a_family_with_a_missing_variant_is_refused_before_any_work(tiny_pair, monkeypatch, tmp_path):
    monkeypatch.setitem(inference.MODEL_FAMILIES, "half", (tiny_pair[0], str(tmp_path / "missing.pt")))
    with pytest.raises(Exception, match="missing.pt"):
        RestoreActor("half")


# ---------------------------------------------------------------------------------------- bundled colour models
@pytest.mark.parametrize("family", ["denoise", "restore"])
def test_bundled_colour_models_beat_the_gray_model_per_channel(family):
    clean = skimage.data.astronaut()[:128, 200:328].astype(np.float32) / 255.0  # (128, 128, 3): face and hair
    noisy = clean + np.random.default_rng(1).normal(0, 25 / 255, clean.shape).astype(np.float32)
    actor = RestoreActor(family, precision="fp32")
    assert actor.runner(3).channels == 3 and actor.runner(1).channels == 1
    color = actor.restore_array(noisy[None])[0]
    per_channel = RestoreActor(f"{family}-gray", precision="fp32").restore_array(noisy[None])[0]
    assert color.shape == clean.shape
    psnr_noisy, psnr_color = metrics.psnr(np.clip(noisy, 0, 1), clean), metrics.psnr(color, clean)
    psnr_gray = metrics.psnr(per_channel, clean)
    assert psnr_color > psnr_noisy + 6, (psnr_noisy, psnr_color)
    assert psnr_color > psnr_gray, (psnr_gray, psnr_color)


def test_bundled_restore_color_removes_jpeg_damage_without_shifting_colours():
    clean = skimage.data.coffee()[100:228, 200:328].astype(np.float32) / 255.0
    damaged = degrade.jpeg(clean, 10)  # 4:2:0 chroma subsampling, as real JPEG files have
    restored = RestoreActor("restore", precision="fp32").restore_array(damaged[None])[0]
    assert metrics.psnr(restored, clean) > metrics.psnr(damaged, clean) + 0.5
    # No colour cast: the mean of each channel stays where the clean image has it.
    assert np.abs(restored.mean(axis=(0, 1)) - clean.mean(axis=(0, 1))).max() < 0.01


def test_pipeline_restores_a_folder_of_mixed_modes_with_the_family_and_counts_models(ray_cluster, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for mode in EXPECTED:
        (folder / _name(mode)).write_bytes(_encoded(mode))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    report = restore.run_restore(
        restore.RestoreConfig(input=str(folder), output=str(tmp_path / "out"), run_id="mixed", precision="fp32")
    )
    assert (report.rows_in, report.rows_out, report.ok, report.errors) == (7, 7, 6, 1)
    assert report.model == "denoise" and report.model_applied == {"native": 6}
    assert {name: entry["rows"] for name, entry in report.models.items()} == {"denoise-gray": 2, "denoise-color": 4}
    rows = {r["key"]: r for r in runs.read_output(report.output, ["key", "model", "mode", "error"]).to_pylist()}
    assert rows["broken.png"]["error"].startswith("decode:") and rows["broken.png"]["model"] == "denoise"
    for mode, (variant, out_mode) in EXPECTED.items():
        assert rows[_name(mode)]["model"] == variant.replace("tiny", "denoise"), mode
        assert rows[_name(mode)]["mode"] == out_mode, mode
