"""Masked inpainting through the restore pipeline's stages: every unmasked pixel comes out bit-exact, bad masks and
masks without an image become error rows with their reasons, an image without a mask comes back unchanged and says
so, --degrade holes:F supplies the mask, and masks in a folder travel with their images (ingest and read).

The model here is untrained but not the identity (plumbing, not quality: quality is `bench quality --task inpaint`'s).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from restoration import data
from restoration.checkpoint import save_model
from restoration.inference import RestoreActor
from restoration.models.inpainter import Inpainter, InpainterConfig
from restoration.pipelines.restore import decode_batch, encode_batch


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")  # uint16 (H, W): I;16, (H, W, 4) uint8: RGBA
    return buf.getvalue()


def samples(encoded: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(encoded)) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def inpainter(tmp_path_factory) -> str:
    """A small untrained inpainter whose tail is not zero, so it changes the holes (and would change everything, were
    the composite not there)."""
    torch.manual_seed(0)
    model = Inpainter(InpainterConfig(width=8, levels=2, bottleneck=1))
    torch.nn.init.normal_(model.tail.weight, std=0.2)
    path = str(tmp_path_factory.mktemp("inpaint") / "inpainter.pt")
    save_model(path, "inpainter", model.config, model)
    return path


def stroke_mask(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 4 + 12, 5 : w - 5] = 255
    mask[10 : h - 10, w // 2 : w // 2 + 9] = 1  # any nonzero value means missing
    return mask


def stages(batch: pa.Table, model: str, degradation: str | None = None, **actor) -> list[dict]:
    decoded = decode_batch(batch, degradation, seed=3)
    actor = {"precision": "fp32", **actor}
    return encode_batch(RestoreActor(model, **actor)(decoded), "m", None, "r").to_pylist()


@pytest.mark.parametrize("raw", [False, True], ids=["model-composite", "raw-model"])
# Tiles and bf16 apart: bf16 emulated on a CPU without bf16 units took 10 s over the 48 tiles this gray image makes.
@pytest.mark.parametrize("actor", [{}, {"tile": 160, "overlap": 16}, {"precision": "bf16"}, {"ensemble": True}])
def test_every_unmasked_pixel_comes_out_bit_exact(inpainter, actor, raw, monkeypatch):
    if raw:  # a model that changes every pixel: the actor's own composite alone must keep the known ones
        monkeypatch.setattr(Inpainter, "forward", lambda self, x, composite=True: self.predict(x))
    gray = skdata.camera()[:250, :180]  # larger than the tile below: tiles blended, and the composite still exact
    colour = skdata.astronaut()[:120, :90]
    rgba = np.dstack([colour, np.full((120, 90), 200, np.uint8)])
    gray16 = (skdata.camera()[:64, :80].astype(np.uint16) * 257 + 3).astype(np.uint16)
    images = [gray, colour, rgba, gray16]
    holes = [stroke_mask(*im.shape[:2]) for im in images]
    batch = pa.table({"key": list("gcaw"), "image": [png(im) for im in images], "mask": [png(m) for m in holes]})
    out = stages(batch, inpainter, **actor)
    assert [r["error"] for r in out] == [None] * 4
    for row, image, hole in zip(out, images, holes, strict=True):
        got = samples(row["image"])
        assert got.dtype == image.dtype and got.shape == image.shape
        known = hole == 0
        np.testing.assert_array_equal(got[known], image[known])  # bit for bit, 8 and 16 bits, alpha too
        assert (got[~known] != image[~known]).mean() > 0.5  # and the holes were filled by the model
        assert row["model_applied"] == ("native" if image.ndim == 2 else "ycbcr")


def test_bad_masks_and_masks_without_an_image_become_error_rows(inpainter):
    gray = skdata.camera()[:40, :50]
    batch = pa.table(
        {
            "key": ["ok", "wrong-size", "unreadable", "empty", "orphan"],
            "image": [png(gray), png(gray), png(gray), png(gray), None],
            "mask": [png(stroke_mask(40, 50)), png(stroke_mask(50, 40)), b"not a png", b"", png(stroke_mask(40, 50))],
        }
    )
    out = stages(batch, inpainter)
    assert len(out) == batch.num_rows  # rows out = rows in
    errors = {r["key"]: r["error"] for r in out}
    assert errors["ok"] is None
    assert errors["wrong-size"] == "mask: mask is 40x50 pixels, the image 50x40: expected the same size"
    assert errors["unreadable"] == "mask: not an image"
    assert errors["empty"] == "mask: empty file"
    assert errors["orphan"].startswith("mask: a mask without an image")
    assert all(r["image"] is None for r in out if r["error"])


def test_an_image_without_a_mask_comes_back_unchanged_and_says_so(inpainter):
    gray, colour = skdata.camera()[:33, :47], skdata.astronaut()[:20, :30]
    batch = pa.table({"key": ["g", "c"], "image": [png(gray), png(colour)], "mask": pa.nulls(2, pa.binary())})
    out = stages(batch, inpainter)
    for row, image in zip(out, [gray, colour], strict=True):
        assert row["error"] is None and row["model_applied"] == "no-mask"
        np.testing.assert_array_equal(samples(row["image"]), image)


def test_degrade_holes_gives_the_mask_and_psnr_inside_it(inpainter):
    gray = skdata.camera()[:128, :128]
    batch = pa.table({"key": ["a"], "image": [png(gray)]})
    decoded = decode_batch(batch, "holes:0.25", seed=3).to_pylist()[0]
    hole = np.frombuffer(decoded["mask"], np.uint8).reshape(128, 128).astype(bool)
    assert 0.25 <= hole.mean() <= 0.3
    row = stages(batch, inpainter, "holes:0.25")[0]
    got = samples(row["image"])
    np.testing.assert_array_equal(got[~hole], gray[~hole])  # the clean pixels outside the holes
    assert row["hole_psnr"] is not None and row["hole_psnr"] < row["psnr"]
    assert row["input_psnr"] < row["psnr"]  # the holes (zeros) were filled with something better


def test_masks_in_a_folder_travel_with_their_images(tmp_path):
    gray = skdata.camera()[:20, :30]
    (tmp_path / "trip").mkdir()
    for name in ("a.png", "trip/b.jpg", "c.png"):
        Image.fromarray(gray).save(tmp_path / name)
    Image.fromarray(stroke_mask(20, 30)).save(tmp_path / "a_mask.png")
    Image.fromarray(stroke_mask(20, 30)).save(tmp_path / "trip" / "b_mask.png")
    Image.fromarray(stroke_mask(20, 30)).save(tmp_path / "lonely_mask.png")
    source = data.resolve_input(str(tmp_path))
    keys = data.input_keys(source)
    assert sorted(keys) == ["a.png", "c.png", "lonely_mask.png", "trip/b.jpg"]  # masks are no rows of their own
    assert data.count_rows(source) == 4
    root = str(tmp_path)
    table = pa.table({"path": [f"{root}/{k}" for k in keys]})
    table = table.append_column("bytes", pa.array([(tmp_path / k).read_bytes() for k in keys], pa.binary()))
    rows = {r["key"]: r for r in data.image_rows(table, len(root) + 1, root, dict(source.masks)).to_pylist()}
    assert rows["a.png"]["mask"] == (tmp_path / "a_mask.png").read_bytes()
    assert rows["trip/b.jpg"]["mask"] == (tmp_path / "trip" / "b_mask.png").read_bytes()
    assert rows["c.png"]["mask"] is None
    assert rows["lonely_mask.png"]["image"] is None and rows["lonely_mask.png"]["mask"] is not None

    # Ingest writes the masks as the `mask` column and reports the one without an image.
    report = data.ingest(root, str(tmp_path / "shards"), executor="local")
    assert report.rows == 3 and report.errors == [("lonely_mask.png", "mask: no image lonely.* beside this mask")]
    shard = pa.parquet.read_table(tmp_path / "shards" / "part-00000.parquet")
    masks = dict(zip(shard.column("key").to_pylist(), shard.column("mask").to_pylist(), strict=True))
    assert masks == {"a.png": (tmp_path / "a_mask.png").read_bytes(), "c.png": None,
                     "trip/b.jpg": (tmp_path / "trip" / "b_mask.png").read_bytes()}  # fmt: skip
