"""Super-resolution through the restore pipeline: sizes at every scale, tiles cut on the input and blended on the
output, alpha and 16-bit kept, colour on its luma, the output pixel limit, and bad scale settings refused in one line.

The models here are untrained (plumbing, not quality); quality is `restoration bench quality --task upscale`'s."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from restoration import codec, metrics
from restoration.checkpoint import save_model
from restoration.errors import UserError
from restoration.inference import ModelRunner, RestoreActor
from restoration.models.upscaler import Upscaler, UpscalerConfig
from restoration.pipelines.restore import RestoreConfig, check_scale, decode_batch, encode_batch, run_restore
from restoration.runs import read_output


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")  # uint16 (H, W): I;16, (H, W, 4) uint8: RGBA
    return buf.getvalue()


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory) -> dict[int, str]:
    """Untrained gray upscaler files for x2, x3, x4 (their bilinear skip makes them roughly bilinear)."""
    folder = tmp_path_factory.mktemp("upscalers")
    paths = {}
    for scale in (2, 3, 4):
        torch.manual_seed(scale)
        model = Upscaler(UpscalerConfig(scale=scale, width=8, depth=3))
        paths[scale] = str(folder / f"x{scale}.pt")
        save_model(paths[scale], "upscaler", model.config, model)
    return paths


def stages(batch: pa.Table, model: str, scale: int, degradation: str | None = None, **actor) -> pa.Table:
    decoded = decode_batch(batch, degradation, seed=1, scale=scale)
    return encode_batch(RestoreActor(model, precision="fp32", **actor)(decoded), "m", None, "r")


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_rows_come_out_scale_times_larger_and_say_both_sizes(upscalers, scale):
    gray = skdata.camera()[:61, :47]
    colour = skdata.astronaut()[:30, :41]
    rgba = np.dstack([colour, np.tile(np.arange(41, dtype=np.uint8) * 6, (30, 1))])
    gray16 = (skdata.camera()[:20, :24].astype(np.uint16) * 257).astype(np.uint16)
    batch = pa.table({"key": ["g", "c", "a", "w"], "image": [png(gray), png(colour), png(rgba), png(gray16)]})
    out = stages(batch, upscalers[scale], scale).to_pylist()
    assert [r["error"] for r in out] == [None] * 4
    for row, (h, w) in zip(out, [(61, 47), (30, 41), (30, 41), (20, 24)], strict=True):
        assert (row["input_height"], row["input_width"]) == (h, w)
        assert (row["height"], row["width"]) == (scale * h, scale * w)
        image = Image.open(io.BytesIO(row["image"]))
        assert image.size == (scale * w, scale * h)
    assert [r["mode"] for r in out] == ["L", "RGB", "RGBA", "I;16"]
    assert [r["model_applied"] for r in out] == ["native", "luma", "luma", "native"]
    alpha = np.asarray(Image.open(io.BytesIO(out[2]["image"])))[..., 3].astype(float)
    expected = codec.resize(rgba[..., 3].astype(np.float32), scale * 41, scale * 30)
    assert np.abs(alpha - expected).max() <= 1  # alpha upscaled bicubic, apart from the model
    sixteen = codec.decode(out[3]["image"])
    assert sixteen.bit_depth == 16 and len(np.unique(np.asarray(Image.open(io.BytesIO(out[3]["image"]))) % 257)) > 1


def test_an_upscaler_tiled_on_its_input_equals_the_whole_image(upscalers):
    image = skdata.camera()[:150, :170].astype(np.float32)[None, :, :, None] / 255  # (1, H, W, 1)
    whole = ModelRunner(upscalers[3], tile=1024, precision="fp32").restore_array(image)
    tiled = ModelRunner(upscalers[3], tile=48, precision="fp32").restore_array(image)
    assert whole.shape == tiled.shape == (1, 450, 510, 1)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5)


def test_lr_degradation_keeps_the_cropped_original_as_the_reference_and_bicubic_as_the_baseline(upscalers):
    photo = skdata.camera()[:101, :83]  # not a multiple of 2: cropped to 100 x 82 for the reference
    batch = pa.table({"key": ["p"], "image": [png(photo)]})
    decoded = decode_batch(batch, "lr:2", seed=0, scale=2).to_pylist()[0]
    assert (decoded["height"], decoded["width"]) == (50, 41)
    reference = codec.from_raw(decoded["reference"], 100, 82, 1)
    np.testing.assert_array_equal(reference[..., 0], photo[:100, :82])
    small = codec.from_raw(decoded["pixels"], 50, 41, 1)
    bicubic = codec.resize(small, 82, 100)
    assert decoded["input_psnr"] == pytest.approx(metrics.psnr(bicubic, codec.as_float(reference)))
    row = encode_batch(
        RestoreActor(upscalers[2], precision="fp32")(decode_batch(batch, "lr:2", 0, scale=2)), "m", None, "r"
    )
    row = row.to_pylist()[0]
    assert (row["width"], row["height"], row["input_width"], row["input_height"]) == (82, 100, 41, 50)
    assert row["psnr"] > 20 and row["input_psnr"] > 20  # measured against the full-size original


def test_the_pixel_limit_applies_to_the_output(upscalers):
    batch = pa.table(
        {"key": ["big", "ok"], "image": [png(np.zeros((40, 40), np.uint8)), png(np.zeros((10, 10), np.uint8))]}
    )
    rows = decode_batch(batch, max_pixels=40 * 40 * 3, scale=2).to_pylist()  # the input fits; its 80 x 80 output not
    assert rows[0]["error"].startswith("decode: the 2x output (80 x 80) would exceed --max-pixels 4800")
    assert rows[1]["error"] is None


def test_scale_settings_that_disagree_are_refused_in_one_line(upscalers):
    assert check_scale(RestoreConfig("i", "o", model="upscale", scale=3, degrade="lr:3"), {"upscale-gray-x3": 3}) == 3
    assert check_scale(RestoreConfig("i", "o", model=upscalers[2], degrade="lr:2,noise:5"), {"m": 2}) == 2
    with pytest.raises(UserError, match="shrinks images 3x but .* upscales 2x"):
        check_scale(RestoreConfig("i", "o", model=upscalers[2], degrade="lr:3"), {"m": 2})
    with pytest.raises(UserError, match="--scale 3, but"):
        check_scale(RestoreConfig("i", "o", model=upscalers[2], scale=3), {"m": 2})
    with pytest.raises(UserError, match="--scale must be one of 2, 3, 4"):
        RestoreConfig("i", "o", model="upscale", scale=5)
    with pytest.raises(UserError, match="shrinks images 2x but denoise upscales 1x"):
        check_scale(RestoreConfig("i", "o", model="denoise", degrade="lr:2"), {"denoise-gray": 1, "denoise-color": 1})


def test_an_upscale_run_through_ray_writes_every_row_at_the_larger_size(ray_cluster, tmp_path, upscalers):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "gray.png").write_bytes(png(skdata.camera()[:64, :48]))
    (folder / "colour.png").write_bytes(png(skdata.astronaut()[:40, :40]))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    config = RestoreConfig(
        str(folder), str(tmp_path / "out"), model=upscalers[2], degrade="lr:2", run_id="sr", tile=32, overlap=8
    )
    report = run_restore(config)
    assert (report.rows_in, report.rows_out, report.ok, report.errors) == (3, 3, 2, 1)
    rows = {
        r["key"]: r for r in read_output(report.output, ["key", "width", "height", "input_width", "error"]).to_pylist()
    }
    assert (rows["gray.png"]["width"], rows["gray.png"]["height"], rows["gray.png"]["input_width"]) == (48, 64, 24)
    assert (rows["colour.png"]["width"], rows["colour.png"]["height"]) == (40, 40)
    assert rows["broken.png"]["error"].startswith("decode:")
    assert report.mean_input_psnr is not None and report.mean_psnr is not None
