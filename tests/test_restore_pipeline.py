"""The restore pipeline: its stages as plain callables, then end to end through a real local Ray and real S3."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from restoration import codec, data, metrics, storage
from restoration.codec import from_raw as stage_pixels
from restoration.inference import ModelRunner, RestoreActor, load_restorer
from restoration.pipelines.restore import OUTPUT_SCHEMA, RestoreConfig, decode_batch, encode_batch, run_restore
from restoration.runs import read_output


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=kwargs.pop("format", "PNG"), **kwargs)
    return buf.getvalue()


def decode_png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


# --------------------------------------------------------------------------------------------- stages, no Ray
def test_decode_batch_turns_bad_bytes_into_error_rows_and_degrades_with_key_seeds():
    gray = Image.fromarray(np.full((20, 30), 128, np.uint8))
    batch = pa.table({"key": ["a.png", "b.png", "c.png"], "image": [png_bytes(gray), b"", png_bytes(gray)]})
    out = decode_batch(batch, degradation="noise:25", seed=7)
    assert out.num_rows == 3 and out.schema == decode_batch(batch.slice(0, 0)).schema
    rows = out.to_pylist()
    assert rows[1]["error"] == "decode: empty file" and rows[1]["pixels"] is None
    a = np.frombuffer(rows[0]["pixels"], np.float32)
    c = np.frombuffer(rows[2]["pixels"], np.float32)
    assert 20 < np.std(a) * 255 < 30  # σ = 25 noise on a flat image
    assert not np.array_equal(a, c)  # same image, different keys: different noise
    again = decode_batch(batch.slice(2, 1), degradation="noise:25", seed=7).to_pylist()[0]
    assert again["pixels"] == rows[2]["pixels"]  # the seed depends on (seed, key), not on batch position
    assert rows[0]["degradation"] == "noise:25" and 19 < rows[0]["input_psnr"] < 21


def test_actor_and_encoder_as_plain_callables(tiny_model):
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 20, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 20), dtype=np.uint8))
    batch = pa.table({"key": ["rgba", "gray", "bad"], "image": [png_bytes(rgba), png_bytes(gray), b"<html>"]})
    stage = decode_batch(batch)
    restored = RestoreActor(tiny_model, tile=16, overlap=4)(stage)
    out = encode_batch(restored, model="tiny", model_sha256="x" * 64, run_id="r")
    assert out.schema == OUTPUT_SCHEMA
    rows = {r["key"]: r for r in out.to_pylist()}
    assert rows["bad"]["error"].startswith("decode: ") and rows["bad"]["image"] is None
    result = decode_png(rows["rgba"]["image"])
    assert result.mode == "RGBA" and result.size == (20, 24) and rows["rgba"]["mode"] == "RGBA"
    np.testing.assert_array_equal(np.asarray(result)[..., 3], np.asarray(rgba)[..., 3])  # alpha untouched
    assert decode_png(rows["gray"]["image"]).mode == "L"
    assert all(r["elapsed_ms"] >= 0 for r in rows.values())


def test_stage_pixels_are_the_files_integer_samples_except_a_degraded_input(tiny_model):
    """Into the model, pixels travel as the file's own uint8/uint16 samples (a quarter of float32's bytes for 8-bit
    images); a degraded input, whose noise is not quantised, and the model's output travel as float32. The PNG holds
    the output quantised to the image's depth, and the row's PSNR is that of the file written."""
    rng = np.random.default_rng(2)
    gray8 = rng.integers(0, 256, (24, 20), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (24, 20)).astype(np.uint16)
    batch = pa.table(
        {"key": ["g8", "g16"], "image": [png_bytes(Image.fromarray(gray8)), png_bytes(Image.fromarray(gray16))]}
    )
    plain = decode_batch(batch).to_pylist()
    assert [len(r["pixels"]) for r in plain] == [24 * 20, 2 * 24 * 20]
    np.testing.assert_array_equal(stage_pixels(plain[0]["pixels"], 24, 20, 1)[:, :, 0], gray8)
    np.testing.assert_array_equal(stage_pixels(plain[1]["pixels"], 24, 20, 1)[:, :, 0], gray16)

    degraded = decode_batch(batch, degradation="noise:25", seed=1)
    rows = degraded.to_pylist()
    assert [len(r["pixels"]) for r in rows] == [4 * 24 * 20, 4 * 24 * 20]  # float32: noise kept unquantised
    assert [len(r["reference"]) for r in rows] == [24 * 20, 2 * 24 * 20]  # the clean file's samples
    actor = RestoreActor(tiny_model, tile=16, overlap=4)
    restored = actor(degraded).to_pylist()
    for row, stage in zip(restored, rows, strict=True):
        noisy = stage_pixels(stage["pixels"], 24, 20, 1)
        # Alone or batched with the other image: float32 convolutions may differ in the last bit between batch sizes.
        alone = actor.restore_array(noisy[None])[0]
        np.testing.assert_allclose(stage_pixels(row["pixels"], 24, 20, 1), alone, rtol=0, atol=1e-6)
    out = encode_batch(pa.Table.from_pylist(restored, schema=degraded.schema), model="t", model_sha256=None, run_id="r")
    for row, stage, depth, clean in zip(out.to_pylist(), restored, (8, 16), (gray8, gray16), strict=True):
        written = codec.decode(row["image"]).pixels
        expected = codec.to_uint(stage_pixels(stage["pixels"], 24, 20, 1), depth)
        np.testing.assert_array_equal(codec.to_uint(written, depth), expected)
        assert codec.decode(row["image"]).bit_depth == depth
        reference = clean[:, :, None] / np.float32(2**depth - 1)
        assert row["psnr"] == pytest.approx(metrics.psnr(written, reference), abs=1e-6)  # float32 rounding


def test_bf16_inference_matches_fp32_and_auto_follows_the_hardware(tiny_model):
    import torch

    from restoration.device import cpu_has_bf16_units, use_bf16

    photo = skimage.data.camera()[128:256, 128:256].astype(np.float32)[None, ..., None] / 255.0  # (1, H, W, 1)
    noisy = photo + np.random.default_rng(0).normal(0, 25 / 255, photo.shape).astype(np.float32)
    fp32 = ModelRunner(tiny_model, tile=64, overlap=8, precision="fp32")
    bf16 = ModelRunner(tiny_model, tile=64, overlap=8, precision="bf16")
    assert not fp32.bf16 and bf16.bf16
    a, b = fp32.restore_array(noisy), bf16.restore_array(noisy)
    assert a.shape == b.shape == noisy.shape
    assert not np.array_equal(a, b)  # bf16 really ran
    # bf16 keeps 8 bits of mantissa: the two outputs agree far below the noise level (PSNR between them > 40 dB).
    assert 10 * np.log10(1.0 / np.mean((a - b) ** 2)) > 40
    assert use_bf16("auto", torch.device("cpu")) == cpu_has_bf16_units()
    assert use_bf16("fp32", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="precision='half'"):
        use_bf16("half", torch.device("cpu"))


@pytest.mark.slow
def test_compiled_model_matches_eager_on_whole_images_and_tiles(tiny_model):
    import torch

    from restoration.cli import build_parser, restore_config

    eager = ModelRunner(tiny_model, tile=64, overlap=8, precision="fp32")
    compiled = ModelRunner(tiny_model, tile=64, overlap=8, precision="fp32", compile=True)
    assert isinstance(compiled.net, torch._dynamo.eval_frame.OptimizedModule) and compiled.compiled
    assert (compiled.overlap, compiled.align) == (eager.overlap, eager.align)  # read from the model, not the wrapper
    rng = np.random.default_rng(0)
    for shape in [(2, 48, 40, 1), (1, 150, 97, 1)]:  # one whole; one in tiles of several shapes
        noisy = rng.random(shape, dtype=np.float32)
        a, b = eager.restore_array(noisy), compiled.restore_array(noisy)
        assert a.shape == b.shape == shape
        assert np.abs(a - b).max() < 1e-4, shape  # the same maths, fused differently
        assert np.abs(a - noisy).max() > 1e-3  # the model did something to compare
    args = build_parser().parse_args(["restore", "in", "out", "--compile"])
    assert restore_config(args).compile and not restore_config(build_parser().parse_args(["restore", "i", "o"])).compile


# --------------------------------------------------------------------------------------------- end to end
def test_model_actors_take_niceness_0_from_ray_and_a_driver_keeps_its_own(ray_cluster, tiny_model, gan_file):
    import os

    from restoration.inference import GeneratorActor
    from restoration.pipelines.synthesize import SynthesizeConfig

    ray = ray_cluster

    @ray.remote(num_cpus=0.5)
    class Probe:  # a Ray actor, like the pipelines' MapWorkers, that builds a model actor inside its process
        def build(self, kind: str, path: str) -> tuple[int, int]:
            before = os.getpriority(os.PRIO_PROCESS, 0)
            if kind == "restore":
                RestoreActor(path)
            else:
                GeneratorActor(SynthesizeConfig(model=path, output="unused", count=1), run_id="r")
            return before, os.getpriority(os.PRIO_PROCESS, 0)

    may_lower = os.geteuid() == 0  # lowering niceness needs CAP_SYS_NICE
    # Ray's RAY_worker_niceness (15) is added to the niceness the local cluster started with (this process's, when
    # the suite itself runs under `nice`), up to the maximum, 19.
    workers = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 15)
    for kind, path in (("restore", tiny_model), ("synthesize", gan_file)):
        probe = Probe.remote()
        before, after = ray.get(probe.build.remote(kind, path))
        ray.kill(probe)
        assert before == workers
        assert after == (0 if may_lower else before), kind
    driver = os.getpriority(os.PRIO_PROCESS, 0)
    RestoreActor(tiny_model)  # in a driver (the benchmarks do this): its niceness is left alone
    assert os.getpriority(os.PRIO_PROCESS, 0) == driver


def test_set12_noise25_restored_by_a_model_trained_in_the_test(s3, ray_cluster, set12, trained_restorer):
    trained_model = trained_restorer.path  # 40 steps on Train400 (conftest), about +5 dB on Set12
    shards = s3.uri("e2e", "set12")
    data.ingest(str(set12), shards)
    out = s3.uri("e2e", "restored")
    report = run_restore(RestoreConfig(input=shards, output=out, model=trained_model, degrade="noise:25", run_id="e2e"))
    files = sorted(p for p in set12.iterdir() if p.is_file())
    assert report.rows_in == report.rows_out == report.ok == len(files) and report.errors == 0
    table = read_output(storage.join(out, "run_id=e2e"), ["key", "image", "psnr", "ssim", "input_psnr", "error"])
    assert sorted(table.column("key").to_pylist()) == sorted(p.name for p in files)
    restored = np.mean(table.column("psnr").to_pylist())
    degraded = np.mean(table.column("input_psnr").to_pylist())
    print(f"Set12 σ=25: degraded {degraded:.2f} dB -> restored {restored:.2f} dB")
    assert restored > degraded + 3.0
    # The PNGs in the output are the restored images: recompute PSNR from them against the clean files.
    for key, image in zip(table.column("key").to_pylist()[:3], table.column("image").to_pylist()[:3], strict=True):
        clean = np.asarray(Image.open(set12 / key), np.float64) / 255
        got = np.asarray(decode_png(image), np.float64) / 255
        assert 10 * np.log10(1 / np.mean((got - clean) ** 2)) > degraded + 3.0
    manifest = json.loads(storage.read_bytes(storage.join(out, "run_id=e2e", "_manifest.json")))
    assert manifest["rows_in"] == len(files) and manifest["errors"] == 0
    assert manifest["mean_psnr"] == pytest.approx(restored, abs=1e-6)
    assert manifest["model_sha256"] == load_restorer(trained_model).sha256
    # The run's seconds are accounted for by its phases, the streaming write taking the lion's share.
    phases = manifest["phase_seconds"]
    assert list(phases) == ["setup", "write", "commit", "summary"] and min(phases.values()) >= 0
    assert sum(phases.values()) == pytest.approx(manifest["seconds"], abs=1e-6)
    assert phases["write"] == max(phases.values())


def _bomb_png() -> bytes:
    """A valid 1×1 PNG whose header claims 30000×30000 pixels (a decompression bomb's calling card)."""
    raw = png_bytes(Image.new("L", (1, 1)))
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def bad_corpus() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    good_png, good_jpg = png_bytes(photo), png_bytes(photo, format="JPEG", quality=90)
    sixteen = Image.fromarray((np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16))
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    # EXIF orientation 6: the stored pixels are rotated; viewers turn them 90° clockwise. Upright, the image is 40 wide
    # and 60 tall, dark on top and bright below.
    upright = np.zeros((60, 40), np.uint8)
    upright[30:] = 220
    stored = Image.fromarray(np.rot90(upright, 1).copy())  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6
    la = Image.fromarray(
        np.dstack([rng.integers(0, 255, (20, 20)), rng.integers(0, 255, (20, 20))]).astype(np.uint8), "LA"
    )
    return {
        "ok/photo.png": good_png,
        "ok/photo.jpg": good_jpg,
        "ok/sixteen.png": png_bytes(sixteen),
        "ok/cmyk.jpg": png_bytes(photo.convert("CMYK"), format="JPEG"),
        "ok/palette.png": png_bytes(palette),
        "ok/animated.gif": gif.getvalue(),
        "ok/exif.jpg": png_bytes(stored, format="JPEG", exif=exif.tobytes(), quality=95),
        "ok/one.png": png_bytes(Image.new("L", (1, 1), 77)),
        "ok/la.png": png_bytes(la),
        "ok/large.png": png_bytes(Image.fromarray(rng.integers(0, 255, (150, 230), dtype=np.uint8))),
        "bad/empty.png": b"",
        "bad/truncated.png": good_png[: len(good_png) // 2],
        "bad/truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "bad/random.jpg": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "bad/page.png": b"<!doctype html><html><body>not found</body></html>",
        "bad/bomb.png": _bomb_png(),
    }


def test_bad_input_corpus_every_row_accounted_for(s3, ray_cluster, tiny_model):
    corpus = bad_corpus()
    prefix = s3.uri("corpus", "raw")
    for key, payload in corpus.items():
        storage.write_bytes(storage.join(prefix, key), payload)
    out = s3.uri("corpus", "restored")
    report = run_restore(RestoreConfig(input=prefix, output=out, model=tiny_model, run_id="c", tile=128, overlap=16))
    assert report.rows_in == report.rows_out == len(corpus)
    table = read_output(storage.join(out, "run_id=c"), ["key", "image", "mode", "width", "height", "error"])
    rows = {r["key"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(corpus)  # every key exactly once
    for key, row in rows.items():
        if key.startswith("bad/"):
            assert row["error"] and row["error"].startswith("decode: ") and row["image"] is None, row
        else:
            assert row["error"] is None and row["image"], row
    reasons = {k.removeprefix("bad/"): rows[k]["error"] for k in rows if k.startswith("bad/")}
    assert "empty" in reasons["empty.png"] and "truncated" in reasons["truncated.png"]
    assert "truncated" in reasons["truncated.jpg"] and "too large" in reasons["bomb.png"]
    assert "not an image" in reasons["page.png"] and "not an image" in reasons["random.jpg"]
    assert report.errors_by_stage == {"decode": 6}

    sixteen = decode_png(rows["ok/sixteen.png"]["image"])
    assert sixteen.mode.startswith("I") and np.asarray(sixteen).max() > 255  # 16-bit precision survives
    palette = decode_png(rows["ok/palette.png"]["image"])
    assert palette.mode == "RGBA" and (np.asarray(palette)[..., 3] == 0).any()  # transparency kept as alpha
    la_in = np.asarray(decode_png(corpus["ok/la.png"]))[..., 1]
    np.testing.assert_array_equal(np.asarray(decode_png(rows["ok/la.png"]["image"]))[..., 1], la_in)
    upright = np.asarray(decode_png(rows["ok/exif.jpg"]["image"]).convert("L"), np.float64)
    # The untrained model shifts grey levels, so compare the halves with each other: 220 stored against 0 before it.
    assert upright.shape == (60, 40) and upright[:25].mean() + 50 < upright[35:].mean(), upright.mean(axis=1)
    assert (rows["ok/large.png"]["width"], rows["ok/large.png"]["height"]) == (230, 150)
    assert rows["ok/cmyk.jpg"]["mode"] == "RGB"
    assert (rows["ok/one.png"]["width"], rows["ok/one.png"]["height"]) == (1, 1)


def test_resume_writes_only_the_missing_keys(s3, ray_cluster, set12, tiny_model):
    shards = s3.uri("resume", "all")
    data.ingest(str(set12), shards)
    fs, _ = storage.resolve(shards)
    table = pa.concat_tables(pq.read_table(f, filesystem=fs) for f in data.shard_files(shards))
    subset = s3.uri("resume", "subset")
    storage.write_bytes(storage.join(subset, "part-00000.parquet"), data.table_to_parquet(table.slice(0, 5)))
    out = s3.uri("resume", "out")
    # A first attempt that only got through 5 of the 12 images...
    first = run_restore(RestoreConfig(input=subset, output=out, model=tiny_model, run_id="r"))
    assert first.rows_out == 5
    run_folder = storage.join(out, "run_id=r")
    files_before = {i.path for i in storage.list_files(run_folder) if i.path.endswith(".parquet")}
    # ...a rerun without --resume refuses to mix runs...
    with pytest.raises(ValueError, match="--resume"):
        run_restore(RestoreConfig(input=shards, output=out, model=tiny_model, run_id="r"))
    # ...and --resume finishes it: only the 7 missing keys are written, no duplicates.
    second = run_restore(RestoreConfig(input=shards, output=out, model=tiny_model, run_id="r", resume=True))
    assert second.skipped_resumed == 5 and second.rows_out == table.num_rows
    new_files = [i.path for i in storage.list_files(run_folder) if i.path.endswith(".parquet")]
    new_rows = sum(pq.read_metadata(p, filesystem=fs).num_rows for p in new_files if p not in files_before)
    assert new_rows == table.num_rows - 5
    keys = read_output(run_folder, ["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == table.num_rows
    # Resuming a complete run writes nothing.
    third = run_restore(RestoreConfig(input=shards, output=out, model=tiny_model, run_id="r", resume=True))
    assert third.rows_out == table.num_rows and third.skipped_resumed == table.num_rows


def test_restore_cli_summary_and_clear_errors(s3, ray_cluster, tiny_model, tmp_path, capsys):
    from restoration.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "a.png")
    assert main(["restore", str(folder), str(tmp_path / "out"), "--model", tiny_model, "--run-id", "x"]) == 0
    assert "restored 1 ok, 0 errors of 1 rows" in capsys.readouterr().out
    assert main(["restore", str(folder), str(tmp_path / "out"), "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model 'no-such-model' not found" in err
    not_a_model = tmp_path / "junk.pt"
    not_a_model.write_bytes(b"junk")
    assert main(["restore", str(folder), str(tmp_path / "out"), "--model", str(not_a_model)]) == 2
    assert "is not a valid model file" in capsys.readouterr().err
    assert main(["restore", str(tmp_path / "nothing"), str(tmp_path / "out"), "--model", tiny_model]) == 2
    assert "input not found" in capsys.readouterr().err


def noise_shards(folder, uri: str, count: int, side: int, seed: int) -> str:
    """`count` gray noise PNGs of side x side in `folder`, ingested as shards at `uri` (small enough for one shard)."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    data.ingest(str(folder), uri, shard_mb=64)
    return uri


ACTOR_TASK = "MapWorker(MapBatches(RestoreActor)).submit"


@pytest.fixture(scope="module")
def small_shard_run(s3, ray_cluster, tmp_path_factory) -> tuple:
    """One restore of one shard of 24 small images in batches of 2 on a pool of 2 actors, and the finished Ray tasks
    it ran: (report, tasks). Ray Data is told to wait until both actors are up before it hands out the first batch
    (otherwise the first actor to load its model may restore everything before the second one is ready, on a fast
    machine), so what the pool does with the batches does not depend on how fast the models load."""
    import time

    from ray.data import DataContext
    from ray.util.state import list_tasks

    folder = tmp_path_factory.mktemp("pool") / "small"
    shards = noise_shards(folder, s3.uri("pool", "shards"), count=24, side=128, seed=5)
    assert len(data.shard_files(shards)) == 1
    context = DataContext.get_current()
    saved = context.wait_for_min_actors_s
    context.wait_for_min_actors_s = 600  # copied into the run's dataset when it is created
    started_ms = time.time() * 1000
    try:
        report = run_restore(
            RestoreConfig(input=shards, output=s3.uri("pool", "out"), model="denoise-gray", batch_size=2, workers=2)
        )
    finally:
        context.wait_for_min_actors_s = saved

    address = ray_cluster.get_runtime_context().gcs_address  # the session's cluster, whatever else runs here

    def finished() -> list:  # this run's finished tasks
        tasks = list_tasks(address=address, filters=[("state", "=", "FINISHED")], limit=10_000, detail=True)
        return [t for t in tasks if (t.start_time_ms or 0) >= started_ms]

    # The state API hears of a finished task within about a second (workers report task events every second); the
    # deadline only keeps a run that never reports them from waiting for ever.
    deadline = time.monotonic() + 120
    tasks = finished()
    while time.monotonic() < deadline and (
        sum(t.name == ACTOR_TASK for t in tasks) < 12 or not any("encode_batch" in t.name for t in tasks)
    ):
        time.sleep(1)
        tasks = finished()
    return report, tasks


def test_every_actor_of_the_pool_restores_batches_of_one_small_shard(small_shard_run):
    """One shard of small images is one block of hundreds of rows; an actor task takes a whole block, so without the
    pipeline's repartition into model batches a single actor would restore everything while the others idle."""
    report, tasks = small_shard_run
    assert report.rows_in == report.rows_out == report.ok == 24
    per_actor = Counter(t.actor_id for t in tasks if t.name == ACTOR_TASK)
    print(f"restore batches per actor: {sorted(per_actor.values())}")
    assert sum(per_actor.values()) == 12  # 24 rows in batches of 2 (without the repartition: 1)
    assert len(per_actor) == 2, per_actor


def test_encoding_fuses_with_the_parquet_write(small_shard_run):
    """The encode operator and the Parquet write reserve the same CPUs and the same cap (none, in restore), so Ray
    Data fuses them into one task; unfused, every restored batch would go through the object store once more."""
    _, tasks = small_shard_run
    names = {t.name for t in tasks}
    assert "MapBatches(encode_batch)->Write" in names and "Write" not in names, sorted(names)
