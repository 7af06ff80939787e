"""`restoration bench throughput`: its parts as plain functions, then one tiny run through real Ray and real S3."""

from __future__ import annotations

import io
import json
import math
import time

import numpy as np
import pyarrow as pa
import pytest
import skimage.data
from PIL import Image

from restoration import storage
from restoration.bench import throughput
from restoration.bench.throughput import ThroughputConfig
from restoration.checkpoint import save_model
from restoration.models.restorer import Restorer, RestorerConfig
from restoration.pipelines.restore import RestoreActor, decode_batch, encode_batch, read_output
from restoration.pipelines.synthesize import OUTPUT_SCHEMA as SYNTH_SCHEMA


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    model = Restorer(RestorerConfig(depth=3, width=8))
    save_model(path, "restorer", model.config, model)
    return str(path)


# --------------------------------------------------------------------------------------------- parts, no Ray
def test_crops_have_the_asked_sizes_and_come_from_the_sources():
    # Each pixel holds its own index, so a crop's first pixel says where it was cut from.
    big = np.arange(600 * 700, dtype=np.int64).reshape(600, 700)
    small = np.zeros((100, 100), np.int64)
    crops = throughput.cut_crops([big, small], 6, (180, 256, 512), np.random.default_rng(0))
    assert [c.shape for c in crops] == [(180, 180), (256, 256), (512, 512)] * 2
    for crop in crops:  # too large for the 100x100 source: always a window of the big one
        y, x = divmod(int(crop[0, 0]), 700)
        np.testing.assert_array_equal(crop, big[y : y + len(crop), x : x + len(crop)])
    # No source large enough: the largest one is scaled up (a 0..255 ramp stays a full ramp), not padded.
    ramp = np.tile(np.linspace(0, 255, 100).astype(np.uint8), (100, 1))
    up = throughput.cut_crops([ramp], 1, (128,), np.random.default_rng(0))[0]
    assert up.shape == (128, 128) and up.min() < 5 and up.max() > 250


def test_work_is_noisy_png_with_stable_keys_and_repeats_under_new_keys(tmp_path):
    Image.fromarray(skimage.data.camera()).save(tmp_path / "camera.png")
    config = ThroughputConfig(images=str(tmp_path), count=3, size=64, noise=25.0)
    noisy, clean, origin = throughput.make_work(config)
    assert origin == str(tmp_path) and [w.key for w in noisy] == [w.key for w in clean]
    a = np.asarray(Image.open(io.BytesIO(noisy[0].png)), np.float64)
    b = np.asarray(Image.open(io.BytesIO(clean[0].png)), np.float64)
    assert a.shape == b.shape == (64, 64)
    assert 15 < np.std(a - b) < 26  # sigma 25, a little less where clipping at 0/255 bites
    again, _, _ = throughput.make_work(config)
    assert [w.png for w in again] == [w.png for w in noisy]  # seeded
    repeated = throughput.repeat_work(noisy, 7)
    assert len({w.key for w in repeated}) == 7 and repeated[4].png == noisy[1].png


def test_config_rejects_bad_values_with_the_value_named():
    with pytest.raises(ValueError, match="'restore,bogus'"):
        ThroughputConfig(only=("restore", "bogus"))
    with pytest.raises(ValueError, match="--count must be >= 1, got 0"):
        ThroughputConfig(count=0)
    with pytest.raises(ValueError, match="s3://"):
        ThroughputConfig(store="/tmp/somewhere")


def test_limit_runs_exactly_the_asked_images_over_shape_groups(tiny_model):
    actor = RestoreActor(tiny_model, threads=1).runner(1)  # the model the pipeline runs on gray images
    rng = np.random.default_rng(0)
    work = []
    for i, size in enumerate((16, 16, 16, 24, 24)):
        pixels = rng.integers(0, 255, (size, size), dtype=np.uint8)
        work.append(throughput.WorkImage(f"k{i}", throughput._png(pixels), size, size))
    batches = throughput.limit_batches(actor, work, batch_size=2)
    assert sorted(n for n, _, _ in batches) == [1, 2, 2]  # 16px: 2 + 1, 24px: 2
    assert all(tuple(x.shape[1:]) in ((1, 16, 16), (1, 24, 24)) for _, _, x in batches)
    result = throughput.run_limit(actor, batches, images=7)
    assert result["images"] == 7 and result["seconds"] > 0
    # Batches cycle in order (16px x2, 16px x1, 24px x2, then 16px x2 again): five 16px images and two 24px ones.
    assert result["megapixels"] == pytest.approx((5 * 16 * 16 + 2 * 24 * 24) / 1e6)
    assert result["mp_per_s"] == pytest.approx(result["megapixels"] / result["seconds"])


def test_rows_are_stamped_when_the_model_finished_them_or_at_encode_when_it_never_saw_them(tiny_model):
    gray = [np.random.default_rng(i).integers(0, 255, (20, 20), dtype=np.uint8) for i in range(2)]
    batch = pa.table({"key": ["a", "b", "bad"], "image": [throughput._png(g) for g in gray] + [b"not an image"]})
    before = time.time()
    restored = RestoreActor(tiny_model)(decode_batch(batch))
    after_model = time.time()
    time.sleep(0.05)
    out = encode_batch(restored, model="tiny", model_sha256="x", run_id="r")
    after = time.time()
    stamps = dict(zip(out.column("key").to_pylist(), out.column("restored_at").to_pylist(), strict=True))
    assert out.schema.field("restored_at").type == pa.float64()
    assert before <= stamps["a"] == stamps["b"] <= after_model  # one model batch, one stamp, before the encode
    assert after_model + 0.05 <= stamps["bad"] <= after  # a decode error reaches no model: stamped when encoded


def test_sampler_sees_the_driver_peak_of_its_own_block():
    with throughput.ResourceSampler() as outer:
        pass
    with throughput.ResourceSampler() as sampler:
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        del block
    if sampler.result["driver_peak_since"] == "start of this measurement":
        assert sampler.result["driver_peak_mb"] > outer.result["driver_peak_mb"] + 250
    else:  # no peak reset on this kernel: the lifetime peak still covers the block
        assert sampler.result["driver_peak_mb"] > 300
    assert sampler.result["wall_s"] > 0 and sampler.result["driver_cpu_s"] >= 0


def test_sampler_window_splits_out_the_cpu_of_a_stretch_of_its_block():
    """The steady-state split (`steady_cpu`) rests on `window`: CPU burnt by the driver between two times is found
    there, and not in the idle stretch before it."""
    with throughput.ResourceSampler() as sampler:
        begin = time.time()
        time.sleep(1.5)
        t0, cpu0 = time.time(), time.process_time()
        while time.process_time() - cpu0 < 3.0:  # 3 s of CPU on this thread
            sum(range(10_000))
        t1 = time.time()
        time.sleep(0.6)
    idle, busy = sampler.window(begin, t0), sampler.window(t0, t1)
    assert idle["seconds"] > 0.4 and idle["cpu_s_by_role"]["driver"] < 0.2 * idle["seconds"]
    # The window runs from the first sample after t0 to the last before t1, samples SAMPLE_INTERVAL_S apart: it
    # misses at most that much wall time (and one core's CPU in it) at either end.
    assert t0 <= busy["from"] < busy["to"] <= t1
    assert 3.0 - 2 * (throughput.SAMPLE_INTERVAL_S + 0.3) < busy["cpu_s_by_role"]["driver"] < 3.3
    assert sampler.window(t1 + 60, t1 + 70) is None  # no samples there

    # steady_cpu: rows stamped inside the window count, and the "model" role's cores are the driver's here.
    stamps = np.linspace(t0, t1, 21)
    steady = throughput.steady_cpu(sampler, stamps, np.full(21, 2.0), model="driver")
    inside = (stamps > busy["from"]) & (stamps <= busy["to"])
    assert steady["work"] == 2.0 * inside.sum() and 0 < inside.sum() < 21
    assert steady["model_cores"] == pytest.approx(busy["cpu_s_by_role"]["driver"] / busy["seconds"])
    assert steady["work_per_model_cpu_s"] == pytest.approx(steady["work"] / busy["cpu_s_by_role"]["driver"])
    assert throughput.steady_cpu(sampler, stamps, np.ones(21), model="NoSuchActor")["work_per_model_cpu_s"] is None


# --------------------------------------------------------------------------------------- end to end, Ray + S3
@pytest.mark.slow
def test_tiny_benchmark_end_to_end(s3, ray_cluster, tmp_path):
    config = ThroughputConfig(
        only=("restore", "synthesis"),
        count=16,
        size=64,
        min_model_seconds=0,
        shard_mb=0.2,
        synth_count=256,
        store=s3.uri("bench-throughput-test"),
        out_dir=str(tmp_path / "out"),
    )
    lines = []
    result = throughput.benchmark(config, progress=lines.append)
    paths = throughput.write_report(result, config.out_dir)

    restore, synthesis = result["restore"], result["synthesis"]
    numbers = [
        restore["limit"]["mp_per_s"],
        restore["ours"]["mp_per_s"],
        restore["ours"]["end_to_end_mp_per_s"],
        restore["ours"]["steady_mp_per_s"],
        restore["naive"]["mp_per_s"],
        restore["limit_again"]["mp_per_s"],
        synthesis["raw_again"]["images_per_s"],
        *restore["ratios"].values(),
        synthesis["raw"]["images_per_s"],
        synthesis["pipeline"]["images_per_s"],
        synthesis["ratio_pipeline_over_raw"],
        restore["ours"]["resources"]["driver_peak_mb"],
        restore["ours"]["resources"]["worker_peak_mb_max"],
    ]
    assert all(math.isfinite(v) and v > 0 for v in numbers), numbers
    assert restore["images"] == 16 and restore["ours"]["workers"] >= 1
    # A steady state the report calls valid never outruns the raw model.
    ours = restore["ours"]
    assert not ours["steady_valid"] or ours["steady_mp_per_s"] <= throughput.STEADY_SLACK * restore["limit"]["mp_per_s"]
    assert result["ray_startup_s"] is None and not result["ray_started_here"]  # the session's Ray was reused
    # The actor's process was found and sampled (it exits when the dataset is done).
    res = restore["ours"]["resources"]
    roles = [r for w in res["top_workers"] for r in w["roles"]]
    assert any("RestoreActor" in r for r in roles), roles
    # What the workers held at one time is at most what they held at their own peaks, and the largest of them is named.
    assert 0 < res["worker_anon_mb_concurrent"] <= res["worker_anon_mb_sum"]
    assert res["largest_worker"]["peak_anon_mb"] == res["worker_anon_mb_max"]
    # The CPU split by process adds up to the run's CPU and names the model actor's share.
    split = res["cpu_s_by_role"]
    assert sum(split.values()) == pytest.approx(throughput._pipeline_cpu(res))
    assert split["driver"] == res["driver_cpu_s"]
    assert sum(cpu for role, cpu in split.items() if "RestoreActor" in role) > 0, split

    # Every input key came out once, from the pipeline and from the naive script.
    keys = sorted(f"img-{i:06d}.png" for i in range(16))
    out = read_output(restore["ours"]["output"], ["key", "error", "restored_at"])
    assert sorted(out.column("key").to_pylist()) == keys
    assert out.column("error").null_count == 16 and out.column("restored_at").null_count == 0
    assert restore["ours"]["every_key_once"] and restore["ours"]["errors"] == 0
    assert result["store"].startswith(config.store + "/")
    naive_root = storage.join(result["store"], "restore", "naive")
    _, root = storage.resolve(naive_root)
    assert sorted(i.path[len(root) + 1 :] for i in storage.list_files(naive_root)) == keys
    synth = read_output(synthesis["pipeline"]["output"], ["index", "generated_at"], SYNTH_SCHEMA)
    assert sorted(synth.column("index").to_pylist()) == list(range(256))
    # 256 images on 2 actors are 4 tasks of one generator batch each: 4 stamps, the steady state after the first.
    pipe = synthesis["pipeline"]
    assert synth.column("generated_at").null_count == 0
    assert pipe["steady_batches"] == len(set(synth.column("generated_at").to_pylist())) == 256 // 64
    assert pipe["steady_valid"] and 0 < pipe["first_image_s"] < pipe["seconds"]
    assert pipe["steady_images_per_s"] == pytest.approx(192 / pipe["steady_span_s"])
    # A steady state this short may fall between two samples; where the sampler saw it, the generator worked in it.
    assert pipe["steady_cpu"] is None or pipe["steady_cpu"]["model_cores"] > 0

    # The report files hold the same numbers.
    written = json.loads(paths["json"].read_text())
    assert written["restore"]["limit"]["mp_per_s"] == pytest.approx(restore["limit"]["mp_per_s"])
    md = paths["md"].read_text()
    assert "limit: raw model loop" in md and "run_synthesize" in md and "limit loop again at the end" in md
    assert "raw loop again at the end" in md
    assert md.count("CPU s by process: ") == 2  # restore and synthesis
    assert throughput.format_table(result) in md
