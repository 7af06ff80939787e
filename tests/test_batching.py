"""The restore pipeline's default batch: sized in output pixels from the run's first image."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from restoration import storage
from restoration.bench.throughput.work import png
from restoration.pipelines.restore import (
    AUTO_BATCH_PIXELS,
    MAX_AUTO_BATCH,
    RestoreConfig,
    auto_batch_size,
    run_restore,
    spread_batch_size,
)
from restoration.runs import read_output


def _row(width: int, height: int) -> dict:
    return {"key": "a.png", "image": png(np.zeros((height, width), np.uint8))}


def test_the_default_batch_holds_about_two_megapixels_of_output():
    assert AUTO_BATCH_PIXELS == 2 * 1024 * 1024 and MAX_AUTO_BATCH == 32
    assert auto_batch_size(_row(256, 256)) == 32
    assert auto_batch_size(_row(512, 512)) == 8
    assert auto_batch_size(_row(640, 480)) == 6  # 2,097,152 // 307,200
    assert auto_batch_size(_row(2048, 1024)) == 1 == auto_batch_size(_row(4000, 3000))  # never below one image
    assert auto_batch_size(_row(64, 64)) == 32  # never above MAX_AUTO_BATCH
    # An upscaler's output is scale^2 times its input; --degrade lr:F shrinks the input first.
    assert auto_batch_size(_row(256, 256), scale=2) == 8
    assert auto_batch_size(_row(512, 512), scale=2, shrink=2) == 8
    # Nothing to size from: an empty input or a first row that is not an image (it becomes an error row).
    assert auto_batch_size(None) == MAX_AUTO_BATCH
    assert auto_batch_size({"key": "x", "image": b"not an image"}) == MAX_AUTO_BATCH
    assert auto_batch_size({"key": "x", "image": None}) == MAX_AUTO_BATCH


def test_a_small_run_spreads_its_rows_over_every_actor():
    assert spread_batch_size(8, rows=10, actors=2) == 5  # 5 + 5, not 8 + 2
    assert spread_batch_size(8, rows=9, actors=2) == 5  # 5 + 4
    assert spread_batch_size(8, rows=3, actors=4) == 1  # one row per actor while rows last
    assert spread_batch_size(32, rows=1000, actors=2) == 32  # runs of many batches keep the default
    assert spread_batch_size(32, rows=0, actors=2) == 1 == spread_batch_size(1, rows=50, actors=2)


def test_a_bad_batch_size_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"--batch-size must be > 0, got 0"):
        RestoreConfig(input="in", output="out", batch_size=0)


@pytest.mark.slow
def test_the_run_restores_in_batches_of_the_default_size(s3, ray_cluster, tiny_model):
    # 40 images of 128 x 128: the default batch is 32 of them, cut to 20 where the pool has two actors so that each
    # gets half. Each actor call stamps its rows with one time, so the rows sharing a stamp are one batch: never more
    # than the batch size, and with the default more than 8 at once.
    prefix = s3.uri("batching", "raw")
    rng = np.random.default_rng(0)
    for i in range(40):
        storage.write_bytes(storage.join(prefix, f"img-{i:02d}.png"), png(rng.integers(0, 256, (128, 128), np.uint8)))
    out = s3.uri("batching", "out")
    largest = {}
    for run_id, batch_size in (("auto", None), ("eight", 8)):
        config = RestoreConfig(input=prefix, output=out, model=tiny_model, run_id=run_id, batch_size=batch_size)
        report = run_restore(config)
        assert report.rows_out == 40 and report.errors == 0
        manifest = json.loads(storage.read_bytes(storage.join(out, f"run_id={run_id}", "_manifest.json")))
        default = min(32, -(-40 // report.config["workers"]))
        assert report.config["batch_size"] == manifest["config"]["batch_size"] == (batch_size or default)
        stamps = read_output(storage.join(out, f"run_id={run_id}"), ["restored_at"]).column("restored_at").to_pylist()
        largest[run_id] = (max(Counter(stamps).values()), batch_size or default)
    assert 8 < largest["auto"][0] <= largest["auto"][1] and largest["eight"][0] <= 8, largest
