"""`restoration bench quality --task inpaint` on two small images and an untrained tiny model: every method at every
coverage on the same seeded holes, the known pixels kept, the margin row, the report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage import data as skdata

from restoration.bench.quality import inpaint
from restoration.checkpoint import save_model
from restoration.errors import UserError
from restoration.models.inpainter import Inpainter, InpainterConfig


def test_every_method_fills_the_same_seeded_holes(tmp_path):
    torch.manual_seed(0)
    model = Inpainter(InpainterConfig(width=8, levels=2, bottleneck=1))
    save_model(tmp_path / "tiny.pt", "inpainter", model.config, model)
    images = [("camera", skdata.camera()[:64, :96, None] / 255.0), ("moon", skdata.moon()[:80, :64, None] / 255.0)]
    images = [(name, image.astype(np.float32)) for name, image in images]
    config = inpaint.InpaintConfig(
        coverages=(0.1, 0.3), models=(str(tmp_path / "tiny.pt"),), images=images, threads=1, sheet_images=1
    )
    result = inpaint.benchmark(config)
    methods = {r["method"] for r in result["rows"]}
    assert methods == {*inpaint.CLASSICAL, "push-pull", "tiny"}
    for row in result["rows"]:
        assert row["images"] == 2 and row["psnr_hole"] < row["psnr"]  # the known pixels are exact
        assert [v["coverage"] for v in row["per_image"]] == pytest.approx([row["coverage"]] * 2, abs=0.08)
    by = {(r["method"], r["coverage"]): r for r in result["rows"]}
    # The untrained tiny model is the push-pull fill, up to bf16 rounding: the same holes for every method.
    assert by[("tiny", 0.3)]["psnr"] == pytest.approx(by[("push-pull", 0.3)]["psnr"], abs=0.05)
    table = inpaint.format_table(result)
    assert "tiny - best classical" in table and "30% holes" in table
    paths = inpaint.write_report(result, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["models"] == ["tiny"]
    assert paths["sheet"].stat().st_size > 0 and "| method |" in paths["markdown"].read_text()


def test_bad_options_are_refused_in_one_line():
    with pytest.raises(UserError, match="coverages"):
        inpaint.InpaintConfig(coverages=(0.5, 1.0))
    with pytest.raises(UserError, match="method 'median'"):
        inpaint.InpaintConfig(methods=("median",))
