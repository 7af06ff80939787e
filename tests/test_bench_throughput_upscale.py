"""`restoration bench throughput --only upscale`: the upscaler against its raw loop and the naive script, counted in
megapixels of the output, through real Ray and real S3."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from restoration import runs, schemas, storage
from restoration.bench import throughput
from restoration.bench.throughput import ThroughputConfig
from restoration.bench.throughput.restore import limit_batches, run_limit
from restoration.bench.throughput.work import WorkImage, png
from restoration.inference import RestoreActor


def test_limit_loop_counts_the_upscalers_output_megapixels():
    crops = [WorkImage(f"img-{i}.png", png(np.full((40, 30), 10 * i, np.uint8)), 40, 30) for i in range(5)]
    actor = RestoreActor("upscale-gray-x3", threads=1).runner(1)
    batches = limit_batches(actor, crops, batch_size=2)
    assert [b.images for b in batches] == [2, 2, 1]
    assert [b.megapixels for b in batches] == pytest.approx([2 * 120 * 90 / 1e6] * 2 + [120 * 90 / 1e6])
    timing = run_limit(actor, batches, images=7, streams=2)  # cycles through the batches, split over 2 streams
    assert timing.images == 7 and timing.megapixels == pytest.approx(7 * 120 * 90 / 1e6)


@pytest.mark.slow
def test_tiny_upscale_section_end_to_end(s3, ray_cluster, tmp_path):
    config = ThroughputConfig(
        only=("upscale",),
        count=16,
        size=48,
        batch_size=4,  # 4 model batches, enough for a steady state (the default would take all 16 at once)
        min_model_seconds=0,
        shard_mb=0.1,
        upscale_model="upscale-gray-x2",
        store=s3.uri("bench-throughput-upscale-test"),
        out_dir=str(tmp_path / "out"),
    )
    result = throughput.benchmark(config)
    paths = throughput.write_report(result, config.out_dir)
    assert result.restore is None and result.synthesis is None
    up = result.upscale
    assert (up.section, up.model, up.scale, up.images) == ("upscale", "upscale-gray-x2", 2, 16)

    out_mp = 16 * 96 * 96 / 1e6  # megapixels of the outputs, 2x the 48 px inputs a side
    assert up.megapixels == pytest.approx(out_mp)
    # The limit loops, ours and the naive script all count the same work: the outputs' megapixels.
    for measured in (up.limit.megapixels, up.limit_again.megapixels, up.ours.megapixels, up.naive.megapixels):
        assert measured == pytest.approx(out_mp)
    assert up.limit_again.images == up.limit.images == 16  # the second limit loop as long as the first
    assert all(math.isfinite(v) and v > 0 for v in up.ratios.values()), up.ratios
    assert up.ratios["ours_steady_over_limit_mean"] == pytest.approx(
        up.ours.steady.work_per_s / ((up.limit.mp_per_s + up.limit_again.mp_per_s) / 2)
    )

    # Every key came out once, 96 x 96, from the pipeline (the clean crops, no noise) and from the naive script.
    keys = sorted(f"img-{i:06d}.png" for i in range(16))
    out = runs.read_output(up.ours.output, ["key", "width", "height", "error"], schemas.RESTORE_OUTPUT_SCHEMA)
    assert sorted(out.column("key").to_pylist()) == keys and up.ours.every_key_once
    assert set(out.column("width").to_pylist()) == set(out.column("height").to_pylist()) == {96}
    assert out.column("error").null_count == 16
    naive_root = storage.join(result.store, "upscale", "naive")
    _, root = storage.resolve(naive_root)
    assert sorted(i.path[len(root) + 1 :] for i in storage.list_files(naive_root)) == keys
    for key in keys:
        assert Image.open(io.BytesIO(storage.read_bytes(storage.join(naive_root, key)))).size == (96, 96)

    md = paths["md"].read_text()
    assert "UPSCALE  upscale-gray-x2 (x2, megapixels of the output)" in md and "RESTORE" not in md
    assert "```\nMACHINE  " in md  # the table's first line names the CPU kind
    assert json.loads(paths["json"].read_text())["upscale"]["scale"] == 2
