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

from restoration import runs, schemas, storage
from restoration.bench import throughput
from restoration.bench.throughput import ThroughputConfig, sampler, work
from restoration.bench.throughput.restore import STEADY_SLACK, limit_batches, run_limit
from restoration.bench.throughput.sampler import ResourceSampler, steady_cpu
from restoration.inference import RestoreActor
from restoration.pipelines.restore import decode_batch, encode_batch


# --------------------------------------------------------------------------------------------- parts, no Ray
def test_crops_have_the_asked_sizes_and_come_from_the_sources():
    # Each pixel holds its own index, so a crop's first pixel says where it was cut from.
    big = np.arange(600 * 700, dtype=np.int64).reshape(600, 700)
    small = np.zeros((100, 100), np.int64)
    crops = work.cut_crops([big, small], 6, (180, 256, 512), np.random.default_rng(0))
    assert [c.shape for c in crops] == [(180, 180), (256, 256), (512, 512)] * 2
    for crop in crops:  # too large for the 100x100 source: always a window of the big one
        y, x = divmod(int(crop[0, 0]), 700)
        np.testing.assert_array_equal(crop, big[y : y + len(crop), x : x + len(crop)])
    # No source large enough: the largest one is scaled up (a 0..255 ramp stays a full ramp), not padded.
    ramp = np.tile(np.linspace(0, 255, 100).astype(np.uint8), (100, 1))
    up = work.cut_crops([ramp], 1, (128,), np.random.default_rng(0))[0]
    assert up.shape == (128, 128) and up.min() < 5 and up.max() > 250


def test_work_is_noisy_png_with_stable_keys_and_repeats_under_new_keys(tmp_path):
    Image.fromarray(skimage.data.camera()).save(tmp_path / "camera.png")
    config = ThroughputConfig(images=str(tmp_path), count=3, size=64, noise=25.0)
    noisy, clean, origin = work.make_work(config)
    assert origin == str(tmp_path) and [w.key for w in noisy] == [w.key for w in clean]
    a = np.asarray(Image.open(io.BytesIO(noisy[0].png)), np.float64)
    b = np.asarray(Image.open(io.BytesIO(clean[0].png)), np.float64)
    assert a.shape == b.shape == (64, 64)
    assert 15 < np.std(a - b) < 26  # sigma 25, a little less where clipping at 0/255 bites
    again, _, _ = work.make_work(config)
    assert [w.png for w in again] == [w.png for w in noisy]  # seeded
    repeated = work.repeat_work(noisy, 7)
    assert len({w.key for w in repeated}) == 7 and repeated[4].png == noisy[1].png


def test_config_rejects_bad_values_with_the_value_named():
    with pytest.raises(ValueError, match="'restore,bogus'"):
        ThroughputConfig(only=("restore", "bogus"))
    with pytest.raises(ValueError, match="--count must be >= 1, got 0"):
        ThroughputConfig(count=0)
    with pytest.raises(ValueError, match="s3://"):
        ThroughputConfig(store="/tmp/somewhere")
    # The benchmarks import no training code: without it handed in, the training section refuses before any work.
    with pytest.raises(ValueError, match="the training section needs trainer="):
        throughput.benchmark(ThroughputConfig(only=("restore", "training")))


def test_limit_runs_exactly_the_asked_images_over_shape_groups(tiny_model):
    actor = RestoreActor(tiny_model, threads=1).runner(1)  # the model the pipeline runs on gray images
    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate((16, 16, 16, 24, 24)):
        pixels = rng.integers(0, 255, (size, size), dtype=np.uint8)
        images.append(work.WorkImage(f"k{i}", work.png(pixels), size, size))
    batches = limit_batches(actor, images, batch_size=2)
    assert sorted(n for n, _, _ in batches) == [1, 2, 2]  # 16px: 2 + 1, 24px: 2
    assert all(tuple(x.shape[1:]) in ((1, 16, 16), (1, 24, 24)) for _, _, x in batches)
    result = run_limit(actor, batches, images=7)
    assert result.images == 7 and result.seconds > 0
    # Batches cycle in order (16px x2, 16px x1, 24px x2, then 16px x2 again): five 16px images and two 24px ones.
    assert result.megapixels == pytest.approx((5 * 16 * 16 + 2 * 24 * 24) / 1e6)
    assert result.mp_per_s == pytest.approx(result.megapixels / result.seconds)


def test_rows_are_stamped_when_the_model_finished_them_or_at_encode_when_it_never_saw_them(tiny_model, monkeypatch):
    """The pipeline's clock is the test's: the model batch finishes at t = 500, the encode runs at t = 600."""
    import types

    from restoration import inference
    from restoration.pipelines import restore

    now = [500.0]
    clock = types.SimpleNamespace(time=lambda: now[0], perf_counter=time.perf_counter)
    monkeypatch.setattr(inference, "time", clock)
    monkeypatch.setattr(restore, "time", clock)
    gray = [np.random.default_rng(i).integers(0, 255, (20, 20), dtype=np.uint8) for i in range(2)]
    batch = pa.table({"key": ["a", "b", "bad"], "image": [work.png(g) for g in gray] + [b"not an image"]})
    restored = RestoreActor(tiny_model)(decode_batch(batch))
    now[0] = 600.0
    out = encode_batch(restored, model="tiny", model_sha256="x", run_id="r")
    stamps = dict(zip(out.column("key").to_pylist(), out.column("restored_at").to_pylist(), strict=True))
    assert out.schema.field("restored_at").type == pa.float64()
    assert stamps == {"a": 500.0, "b": 500.0, "bad": 600.0}  # one model batch, one stamp; a decode error at encode


def test_sampler_sees_the_driver_peak_of_its_own_block():
    with ResourceSampler() as outer:
        pass
    with ResourceSampler() as watched:
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        del block
    if watched.result.driver_peak_since == "start of this measurement":
        assert watched.result.driver_peak_mb > outer.result.driver_peak_mb + 250
    else:  # no peak reset on this kernel: the lifetime peak still covers the block
        assert watched.result.driver_peak_mb > 300
    assert watched.result.wall_s > 0 and watched.result.driver_cpu_s >= 0


def test_sampler_counts_the_cpu_its_block_burnt():
    """The real counters: the block burns half a CPU second of this process (the counter the sampler reads), so the
    sampler sees at least that much, however fast the machine and whatever else the process runs."""
    with ResourceSampler() as watched:
        cpu0 = time.process_time()
        while time.process_time() - cpu0 < 0.5:
            sum(range(10_000))
    assert watched.result.driver_cpu_s >= 0.5
    assert watched.result.cpu_s_by_role["driver"] == watched.result.driver_cpu_s


ACTOR_TITLE = "ray::MapWorker(MapBatches(RestoreActor)).submit"


def test_sampler_window_splits_out_the_cpu_of_a_stretch_of_its_block(monkeypatch):
    """The steady-state split (`steady_cpu`) rests on `window`: CPU burnt between two times is found there, and not in
    the idle stretch before it. The samples are driven here (a clock and CPU counters the test sets, one sample per
    half second), so what each stretch holds is known exactly: the driver idles from t = 1000 to 1002, then burns a
    core until 1005; a RestoreActor worker starts at 1002.5, burns half a core and exits after 1004."""
    import types

    state = {"t": 0.0, "driver": 10.0, "workers": {}}
    monkeypatch.setattr(sampler, "time", types.SimpleNamespace(time=lambda: state["t"]))
    monkeypatch.setattr(sampler, "own_cpu", lambda: state["driver"])
    monkeypatch.setattr(sampler, "_machine_cpu", lambda: (0.0, 0.0))
    monkeypatch.setattr(ResourceSampler, "_worker_pids", lambda self: list(state["workers"]))
    monkeypatch.setattr(sampler, "_cpu_seconds", lambda pid: state["workers"].get(pid))
    monkeypatch.setattr(sampler, "_read_status", lambda pid: {"RssAnon": 2**20, "VmHWM": 2**20})
    monkeypatch.setattr(sampler, "_title", lambda pid: ACTOR_TITLE)
    monkeypatch.setattr(sampler, "_nice", lambda pid: 0)
    watched = ResourceSampler(reset_workers=False)
    watched._cuda = False
    for k in range(21):  # t = 1000.0, 1000.5, ..., 1010.0
        state["t"] = 1000 + k / 2
        if 1002 < state["t"] <= 1005:
            state["driver"] += 0.5
        if 1002.5 <= state["t"] <= 1004:
            state["workers"][7] = 0.25 * (2 * state["t"] - 2005)  # 0 at its start, 0.25 more every sample
        else:
            state["workers"].pop(7, None)
        watched._sample()

    idle, busy = watched.window(1000, 1002), watched.window(1002, 1005)
    assert idle == sampler.CpuWindow(
        start=1000, stop=1002, seconds=2, cpu_s_by_role={"driver": 0.0}, machine_busy_cores=None
    )
    assert (busy.start, busy.stop, busy.seconds) == (1002, 1005, 3)
    # The worker exited inside the window and keeps the CPU it used there.
    assert busy.cpu_s_by_role == {"driver": 3.0, "MapWorker(MapBatches(RestoreActor))": 0.75}
    # A window between samples takes the samples inside it only.
    assert watched.window(1002.2, 1004.8).seconds == 2 and watched.window(1002.2, 1004.8).start == 1002.5
    assert watched.window(1070, 1080) is None  # no samples there
    assert watched.window(1004.9, 1005.1) is None  # one sample: no stretch

    # steady_cpu: rows stamped inside the window count (after its first sample, up to its last), and the model
    # actors' cores are their CPU seconds per second of it.
    stamps = np.array([1002.0, 1002.5, 1003.0, 1004.0, 1005.0])
    steady = steady_cpu(watched, stamps, np.full(5, 2.0), model="RestoreActor")
    assert (steady.window.start, steady.window.stop) == (1002, 1005)
    assert steady.work == 8.0  # the 4 rows after 1002
    assert steady.model_cores == pytest.approx(0.75 / 3)
    assert steady.work_per_model_cpu_s == pytest.approx(8.0 / 0.75)
    assert steady_cpu(watched, stamps, np.ones(5), model="NoSuchActor").work_per_model_cpu_s is None
    assert steady_cpu(watched, np.array([]), np.array([]), model="RestoreActor") is None


# --------------------------------------------------------------------------------------- end to end, Ray + S3
@pytest.mark.slow
def test_tiny_benchmark_end_to_end(s3, ray_cluster, tmp_path):
    config = ThroughputConfig(
        only=("restore", "synthesis"),
        count=16,
        size=64,
        batch_size=4,  # 4 model batches, enough for a steady state (the default would take all 16 at once)
        min_model_seconds=0,
        shard_mb=0.2,
        synth_count=256,
        store=s3.uri("bench-throughput-test"),
        out_dir=str(tmp_path / "out"),
    )
    lines = []
    result = throughput.benchmark(config, progress=lines.append)
    paths = throughput.write_report(result, config.out_dir)

    restore, synthesis = result.restore, result.synthesis
    ours, res = restore.ours, restore.ours.resources
    numbers = [
        restore.limit.mp_per_s,
        ours.mp_per_s,
        restore.end_to_end_mp_per_s,
        ours.steady.work_per_s,
        restore.naive.mp_per_s,
        restore.limit_again.mp_per_s,
        synthesis.raw_again.images_per_s,
        *restore.ratios.values(),
        synthesis.raw.images_per_s,
        synthesis.pipeline.images_per_s,
        synthesis.ratios["pipeline_over_raw"],
        res.driver_peak_mb,
        res.worker_peak_mb_max,
    ]
    assert all(math.isfinite(v) and v > 0 for v in numbers), numbers
    assert restore.images == 16 and ours.workers >= 1
    # A steady state the report calls valid never outruns the raw model.
    assert not restore.steady_valid or ours.steady.work_per_s <= STEADY_SLACK * restore.limit.mp_per_s
    assert result.ray_startup_s is None and not result.ray_started_here  # the session's Ray was reused
    # The actor's process was found and sampled (it exits when the dataset is done).
    roles = [r for w in res.top_workers for r in w.roles]
    assert any("RestoreActor" in r for r in roles), roles
    # What the workers held at one time is at most what they held at their own peaks, and the largest of them is named.
    assert 0 < res.worker_anon_mb_concurrent <= res.worker_anon_mb_sum
    assert res.largest_worker.peak_anon_mb == res.worker_anon_mb_max
    # The CPU split by process adds up to the run's CPU and names the model actor's share.
    split = res.cpu_s_by_role
    assert sum(split.values()) == pytest.approx(res.run_cpu_s)
    assert split["driver"] == res.driver_cpu_s
    assert sum(cpu for role, cpu in split.items() if "RestoreActor" in role) > 0, split

    # Every input key came out once, from the pipeline and from the naive script.
    keys = sorted(f"img-{i:06d}.png" for i in range(16))
    out = runs.read_output(ours.output, ["key", "error", "restored_at"], schemas.RESTORE_OUTPUT_SCHEMA)
    assert sorted(out.column("key").to_pylist()) == keys
    assert out.column("error").null_count == 16 and out.column("restored_at").null_count == 0
    assert ours.every_key_once and ours.errors == 0
    assert result.store.startswith(config.store + "/")
    naive_root = storage.join(result.store, "restore", "naive")
    _, root = storage.resolve(naive_root)
    assert sorted(i.path[len(root) + 1 :] for i in storage.list_files(naive_root)) == keys
    pipe = synthesis.pipeline
    synth = runs.read_output(pipe.output, ["index", "generated_at"], schemas.SYNTH_OUTPUT_SCHEMA)
    assert sorted(synth.column("index").to_pylist()) == list(range(256))
    # 256 images on 2 actors are 4 tasks of one generator batch each: 4 stamps, the steady state after the first.
    assert synth.column("generated_at").null_count == 0
    assert pipe.steady.batches == len(set(synth.column("generated_at").to_pylist())) == 256 // 64
    assert pipe.steady.valid and 0 < pipe.first_image_s < pipe.seconds
    assert pipe.steady.work_per_s == pytest.approx(192 / pipe.steady.span_s)
    # A steady state this short may fall between two samples; where the sampler saw it, the generator worked in it.
    assert pipe.steady.cpu is None or pipe.steady.cpu.model_cores > 0

    # The report files hold the same numbers.
    written = json.loads(paths["json"].read_text())
    assert written["restore"]["limit"]["mp_per_s"] == pytest.approx(restore.limit.mp_per_s)
    assert written["restore"]["ours"]["resources"]["top_workers"][0]["pid"] == res.top_workers[0].pid
    md = paths["md"].read_text()
    assert "limit: raw model loop" in md and "run_synthesize" in md and "limit loop again at the end" in md
    assert "raw loop again at the end" in md
    assert md.count("CPU s by process: ") == 2  # restore and synthesis
    assert throughput.format_table(result) in md
