"""`--model inpaint` as a run: a folder with `<name>_mask.png` files through a real local Ray, rows out = rows in, the
bad masks as error rows, the image without a mask counted in the manifest, unmasked pixels bit-exact in the output."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from restoration.checkpoint import save_model
from restoration.models.inpainter import Inpainter, InpainterConfig
from restoration.pipelines.restore import RestoreConfig, run_restore
from restoration.runs import read_output


def test_a_folder_with_masks_through_a_run(ray_cluster, tmp_path):
    torch.manual_seed(0)
    model = Inpainter(InpainterConfig(width=8, levels=2, bottleneck=1))
    torch.nn.init.normal_(model.tail.weight, std=0.2)
    save_model(tmp_path / "inpainter.pt", "inpainter", model.config, model)
    photos = tmp_path / "in"
    photos.mkdir()
    gray = skdata.camera()[:64, :80]
    hole = np.zeros((64, 80), np.uint8)
    hole[20:30, 10:70] = 255
    for name in ("a", "b", "plain", "wrong"):
        Image.fromarray(gray).save(photos / f"{name}.png")
    for name in ("a", "b", "orphan"):
        Image.fromarray(hole).save(photos / f"{name}_mask.png")
    Image.fromarray(hole[:40]).save(photos / "wrong_mask.png")

    config = RestoreConfig(str(photos), str(tmp_path / "out"), model=str(tmp_path / "inpainter.pt"), workers=1)
    report = run_restore(config)
    assert (report.rows_in, report.rows_out, report.ok, report.errors) == (5, 5, 3, 2)  # the 4 images + the orphan
    assert report.errors_by_stage == {"mask": 2}
    assert report.model_applied == {"native": 2, "no-mask": 1}
    assert report.models["inpainter"]["rows"] == 2  # the unchanged image was not restored by the model

    rows = {r["key"]: r for r in read_output(report.output, ["key", "image", "error"]).to_pylist()}
    assert rows["orphan_mask.png"]["error"].startswith("mask: a mask without an image")
    assert rows["wrong.png"]["error"].startswith("mask: mask is 80x40 pixels, the image 80x64")
    for key in ("a.png", "b.png", "plain.png"):
        out = np.asarray(Image.open(io.BytesIO(rows[key]["image"])))
        np.testing.assert_array_equal(out[hole == 0], gray[hole == 0])
    assert (np.asarray(Image.open(io.BytesIO(rows["a.png"]["image"])))[hole > 0] != gray[hole > 0]).any()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rows["plain.png"]["image"]))), gray)
