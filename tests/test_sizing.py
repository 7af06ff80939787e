"""How the pipelines size their model actors: the CPU split, the data share it is measured from, and the CPU slices
of a model batch."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from restoration import data, inference
from restoration.checkpoint import save_model
from restoration.cluster import DATA_TASK_CPUS, MAX_CPU_ACTORS, data_task_cap, split_cpus
from restoration.models.restorer import Restorer, RestorerConfig
from restoration.pipelines import restore, synthesize


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("nodes", "workers", "share", "expected"),
    [
        ([2.0], None, None, (1, 1, 1.0)),  # unmeasured: half the CPU to the data side, a core for the data tasks
        ([2.0], None, 0.02, (2, 1, 0.5)),  # an fp32 model on 2 cores: an actor per core, reservations leave a core
        ([2.0], None, 0.27, (1, 1, 1.0)),  # a cheap (bf16) model: the data side needs a core of its own
        ([1.0], None, 0.02, (1, 1, 0.5)),  # one core: half of it stays unreserved
        ([3.0, 3.0], 2, 0.02, (2, 3, 2.0)),  # 2 actors asked for on two 3-CPU nodes: 3 threads, a core free per node
        ([16.0, 16.0], None, 0.02, (MAX_CPU_ACTORS, 4, 3.75)),  # past MAX_CPU_ACTORS, threads; 4 actors fit a node
        ([4.0], 4, None, (4, 1, 0.75)),
    ],
)
def test_split_cpus(nodes, workers, share, expected):
    assert split_cpus(nodes, workers, share) == pytest.approx(expected)


def test_split_cpus_never_reserves_what_a_data_task_reserves():
    """Equal reservations would let Ray Data fuse decode into the model actor, in series with the model."""
    actors, threads, cpus_per_actor = split_cpus([3.0], 5, None)  # 5 actors in the 2 cores left: 0.4 CPU each
    assert (actors, threads) == (5, 1)
    assert cpus_per_actor != DATA_TASK_CPUS and cpus_per_actor == pytest.approx(DATA_TASK_CPUS, rel=0.05)
    assert actors * cpus_per_actor <= 3.0 - 1.0


@pytest.mark.parametrize(
    ("cpus", "share", "expected"),
    [
        (2.0, 0.02, 1),  # the fp32 denoiser on 2 cores: one task per data operator is 12x what it needs
        (2.0, 0.27, 2),  # bf16: about half a core of data work, twice that
        (64.0, 0.05, 7),  # a cluster: scales with the cores
        (2.0, 0.0, 1),  # never 0: every operator needs a task
        (2.0, 3.0, 4),  # a share past 1 counts as 1
        (2.0, None, None),  # unmeasured (a GPU pool): Ray Data's own limit
    ],
)
def test_data_task_cap_is_twice_the_cores_the_data_side_needs(cpus, share, expected):
    assert data_task_cap(cpus, share) == expected


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of two gray PNGs, the first larger than the share's crop, and a model file 100x cheaper than the
    bundled denoiser."""
    folder = tmp_path_factory.mktemp("share")
    camera = skimage.data.camera()  # 512 x 512 uint8
    (folder / "a.png").write_bytes(png(camera[:300, :400]))
    (folder / "b.png").write_bytes(png(camera[300:, 400:]))
    tiny = folder.parent / "tiny.pt"
    model = Restorer(RestorerConfig(depth=3, width=4, batch_norm=False))
    save_model(tiny, "restorer", model.config, model)
    return folder, str(tiny)


def test_first_row_is_the_first_input_read_without_ray(photos, tmp_path):
    folder, _ = photos
    row = data.first_row(str(folder))
    assert row == {"key": "a.png", "image": (folder / "a.png").read_bytes()}
    shards = tmp_path / "shards"
    data.ingest(str(folder), str(shards), executor="local")
    row = data.first_row(str(shards), ("reference", "no_such_column"))
    assert row["key"] in ("a.png", "b.png") and row["image"] == (folder / row["key"]).read_bytes()
    assert set(row) <= {"key", "image", "reference"}


def test_measure_share_is_the_data_steps_fraction_of_the_cpu_time_on_one_thread(monkeypatch):
    """The clock is the test's: the model step takes 3 s, the data steps 1 s, so the share is exactly 1/4."""
    import types

    from restoration import cluster

    now, threads = [0.0], []

    def step(seconds: float):
        def run() -> None:
            threads.append(torch.get_num_threads())
            now[0] += seconds

        return run

    monkeypatch.setattr(cluster, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    before = torch.get_num_threads()
    assert cluster.measure_share(step(3.0), step(1.0)) == 0.25
    assert cluster.measure_share(step(0.0), step(0.0)) == 0.5  # nothing measured: an even split
    assert threads == [1, 1, 1, 1] and torch.get_num_threads() == before


def test_data_share_is_measured_with_the_runs_own_stages(photos, monkeypatch):
    """`data_share` times the run's own model against the run's own data stages (decode with the run's degradation,
    encode with the metrics against the reference) on a crop of the first image. The timing itself is
    `measure_share`'s (above); here its two steps are run and what they call is recorded."""
    from restoration import cluster

    folder, tiny = photos
    sample = data.first_row(str(folder))  # a.png, 400 x 300
    calls: list[tuple] = []
    real_decode, real_encode, real_actor = restore.decode_batch, restore.encode_batch, inference.RestoreActor.__call__

    def decode_batch(batch, degradation=None, seed=0, max_pixels=0, scale=1):
        calls.append(("decode", degradation, seed, max_pixels))
        return real_decode(batch, degradation, seed, max_pixels, scale)

    def encode_batch(batch, *args):
        out = real_encode(batch, *args)
        calls.append(("encode", out.column("psnr")[0].as_py() is not None, out.column("ssim")[0].as_py() is not None))
        return out

    def actor_call(self, batch):
        calls.append(
            ("model", self.runner(1).label, batch.column("height")[0].as_py(), batch.column("width")[0].as_py())
        )
        return real_actor(self, batch)

    steps = {}

    def measure_share(model_step, data_steps):
        for name, fn in (("model", model_step), ("data", data_steps)):
            calls.clear()
            fn()
            steps[name] = list(calls)
        return 0.125

    monkeypatch.setattr(restore, "decode_batch", decode_batch)
    monkeypatch.setattr(restore, "encode_batch", encode_batch)
    monkeypatch.setattr(inference.RestoreActor, "__call__", actor_call)
    monkeypatch.setattr(cluster, "measure_share", measure_share)

    def share(model: str, degrade: str | None = None) -> float | None:
        config = restore.RestoreConfig(input="-", output="-", model=model, degrade=degrade, seed=3, max_pixels=10**6)
        return restore.data_share(config, sample)

    crop = restore.SHARE_SAMPLE_SIDE
    assert share(tiny) == 0.125
    assert steps["model"] == [("model", "tiny", crop, crop)]  # the run's model on a 256 x 256 crop, nothing else
    assert steps["data"] == [("decode", None, 3, 10**6), ("encode", False, False)]  # no reference: no metrics
    assert share("denoise-gray", "noise:25") == 0.125
    assert steps["model"] == [("model", "denoise-gray", crop, crop)]
    # Degrading, and PSNR and SSIM against the clean crop, are data work too.
    assert steps["data"] == [("decode", "noise:25", 3, 10**6), ("encode", True, True)]
    # Nothing to measure on: no share (the run then splits the cores as if unmeasured).
    assert (
        restore.data_share(restore.RestoreConfig(input="-", output="-", model=tiny), {**sample, "image": b"<html>"})
        is None
    )
    assert restore.data_share(restore.RestoreConfig(input="-", output="-", model=tiny), None) is None


def test_data_share_of_a_real_measurement_is_a_fraction(photos):
    folder, tiny = photos
    share = restore.data_share(restore.RestoreConfig(input="-", output="-", model=tiny), data.first_row(str(folder)))
    assert 0.0 < share < 1.0


def test_synthesis_data_share_in_sample_mode_only(gan_file):
    share = synthesize.data_share(synthesize.SynthesizeConfig(model=gan_file, output="-", count=10, batch_size=16))
    assert 0.0 < share < 1.0
    reconstruct = synthesize.SynthesizeConfig(model=gan_file, output="-", count=10, mode="reconstruct", inputs="-")
    assert synthesize.data_share(reconstruct) is None


def test_model_runner_slices_cpu_batches_to_the_pixel_budget_and_matches_the_whole_batch(photos):
    _, tiny = photos
    runner = inference.ModelRunner(tiny, precision="fp32")  # the reference pass below runs without autocast
    calls = []
    runner.net.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    side = int(inference.CPU_FORWARD_PIXELS**0.5)
    for shape, passes in (((5, 1, side, side), 5), ((6, 1, side // 2, side // 2), 2), ((3, 1, 40, 40), 1)):
        x = torch.rand(shape)
        calls.clear()
        with torch.inference_mode():
            got = runner.forward(x)
            whole = runner.net(x)
        assert len(calls) == passes + 1, shape  # + 1: the whole-batch reference pass
        assert all(c[0] * c[2] * c[3] <= max(inference.CPU_FORWARD_PIXELS, c[2] * c[3]) for c in calls[:-1])
        torch.testing.assert_close(got, whole, atol=1e-5, rtol=0)


def test_the_data_stages_import_without_torch():
    """Every Ray worker that runs a decode, encode or write task imports the pipeline module; with torch in its imports
    each of them paid about 1.5 CPU seconds and 200 MB for it, which on 2 cores was most of the pipeline's fill."""
    import subprocess
    import sys

    code = "import sys, restoration.pipelines.restore, restoration.pipelines.synthesize; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_data_worker_gives_back_the_arrow_memory_its_task_freed(ray_cluster):
    """Ray keeps a data worker alive between tasks, so what its allocator keeps after a task stays counted until the
    run ends. The workers allocate Arrow memory through jemalloc, which returns freed pages within a few seconds;
    pyarrow's default, mimalloc, kept all 265 MB of this task's freed arrays. The task waits until the pages are back
    (or a minute has gone by), so the outcome does not depend on how soon the worker gets a core."""
    import pyarrow as pa

    from restoration.cluster import DATA_TASK_CPUS

    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow has no jemalloc (its macOS and Windows wheels), so the workers keep its default")

    @ray_cluster.remote(num_cpus=DATA_TASK_CPUS)
    def allocate_and_free() -> tuple[str, int, list[int]]:
        import time

        import pyarrow.compute as pc

        def private_mb() -> int:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) >> 10 for line in f if line.startswith("RssAnon"))

        before = private_mb()
        ones = pa.array(np.ones(1 << 18))  # 2 MB
        arrays = [pc.add(ones, i) for i in range(100)]  # 200 MB in Arrow's pool, written
        held = private_mb() - before
        del arrays
        after = []
        deadline = time.monotonic() + 60  # jemalloc's decay is counted in wall time: seconds, on any machine
        while time.monotonic() < deadline and (not after or after[-1] > 60):
            time.sleep(0.5)
            pa.allocate_buffer(1024)  # allocator activity, as the next batch of a task would bring
            after.append(private_mb() - before)
        return pa.default_memory_pool().backend_name, held, after

    backend, held, after = ray_cluster.get(allocate_and_free.remote())
    assert backend == "jemalloc"
    assert held >= 190, held
    assert min(after) <= 60, f"the worker still held {after} MB of the {held} MB its task freed"


def test_the_drivers_own_arrow_allocator_is_the_one_its_workers_get(monkeypatch):
    from restoration.cluster import forwarded_env

    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "system")
    assert forwarded_env()["ARROW_DEFAULT_MEMORY_POOL"] == "system"


SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIATESTKEYID0000000",
    "AWS_SECRET_ACCESS_KEY": "test/secret+access/key",
    "AWS_SESSION_TOKEN": "test-session-token-value",
}


def test_keys_and_tokens_are_never_forwarded_to_the_workers(monkeypatch):
    """Ray writes every runtime env into its logs: what `init_ray` hands the workers carries the endpoint and region,
    and neither the access keys nor a session token (workers take those from their own environment)."""
    import json

    import ray

    from restoration import cluster

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    env = cluster.forwarded_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and env["AWS_REGION"] == "eu-west-3"
    assert sorted(set(SECRETS) & set(env)) == []  # names only: a failure must not print the values

    # What init_ray passes to ray.init for a local cluster is that same env, and no secret appears anywhere in it.
    passed = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: passed.update(kwargs))
    cluster.init_ray(num_cpus=1)
    assert passed["runtime_env"] == {"env_vars": env}
    text = json.dumps(passed, default=str)
    assert [name for name, value in SECRETS.items() if value in text or name in text] == []


def test_the_session_clusters_workers_get_no_keys_through_the_runtime_env(ray_cluster):
    """The session's Ray was started by `init_ray` with the S3 server's keys in the driver's environment: its workers'
    runtime env (which Ray logs) holds the endpoint, and not the keys."""
    import os

    assert os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")

    @ray_cluster.remote(num_cpus=0)
    def runtime_env_vars() -> dict:
        return dict(ray_cluster.get_runtime_context().runtime_env.get("env_vars", {}))

    env_vars = ray_cluster.get(runtime_env_vars.remote())
    assert env_vars.get("AWS_ENDPOINT_URL") == os.environ["AWS_ENDPOINT_URL"]
    secrets = {os.environ[name] for name in SECRETS if os.environ.get(name)}
    # Names only: a failure must not print the values.
    assert sorted(name for name, value in env_vars.items() if name in SECRETS or value in secrets) == []


def test_training_holdout_is_split_off_in_read_workers_without_torch(tmp_path, ray_cluster):
    """Without --val, "val" is the holdout of the training images and "train" the rest: a folder is split by file
    name before it is read (the holdout of a large folder reads 1 file in 20, not all of them), shards row by row.
    The row split runs in Ray Data's read tasks; defined next to the training loops, it made each read worker import
    torch, and a one-epoch run of a tiny model took 57 s instead of 36."""
    import pyarrow as pa

    from restoration.train.launcher import READ_CPUS, build_datasets

    def torch_loaded(batch: pa.Table) -> pa.Table:  # nested: Ray pickles it by value, it imports nothing itself
        import sys

        return pa.table({"key": batch.column("key"), "torch": [("torch" in sys.modules)] * batch.num_rows})

    folder = tmp_path / "images"
    folder.mkdir()
    keys = [f"img{i:03d}.png" for i in range(60)]
    for i, key in enumerate(keys):
        (folder / key).write_bytes(png(np.full((8, 8), i, np.uint8)))
    held = sorted(k for k in keys if data.held_out(k))
    assert 0 < len(held) < 10  # about 1 in 20
    shards = tmp_path / "shards"
    data.ingest(str(folder), str(shards), executor="local")

    for uri in (str(folder), str(shards)):
        datasets = build_datasets(uri)
        rows = {
            name: ds.map_batches(torch_loaded, batch_format="pyarrow", num_cpus=READ_CPUS).take_all()
            for name, ds in datasets.items()
        }
        assert sorted(r["key"] for r in rows["val"]) == held, uri
        assert sorted(r["key"] for r in rows["train"]) == sorted(set(keys) - set(held)), uri
        assert not any(r["torch"] for name in rows for r in rows[name]), uri
    # The folder's holdout reads its own files and nothing else.
    datasets = build_datasets(str(folder))
    assert sorted(Path(f).name for f in datasets["val"].input_files()) == held
    # With --val, both sets are read whole.
    datasets = build_datasets(str(folder), str(shards))
    assert datasets["train"].count() == datasets["val"].count() == 60


@pytest.mark.parametrize(
    ("count", "batch", "size", "workers", "expected"),
    [
        (100_000, 64, 28, 2, 1024),  # TASK_PIXELS of 28x28 images, in 16 generator batches
        (100_000, 64, 64, 2, 192),  # bigger images: fewer per task, still whole batches
        (100_000, 2048, 28, 2, 2048),  # never less than one generator batch
        (1_000, 64, 28, 2, 128),  # a small run still gives each of 2 actors 4 tasks
        (60, 7, 28, 1, 21),
    ],
)
def test_sample_tasks_are_whole_generator_batches_near_the_pixel_budget(count, batch, size, workers, expected):
    config = synthesize.SynthesizeConfig(model="unused", output="unused", count=count, batch_size=batch)
    rows = synthesize.task_rows(config, size, workers)
    assert rows == expected
    assert rows % batch == 0
    assert rows * size * size <= max(synthesize.TASK_PIXELS, batch * size * size)


def test_a_shard_read_starts_one_footer_reader_not_ray_datas_32(photos, tmp_path, ray_cluster):
    from ray.util.state import list_actors

    def footer_readers() -> int:
        address = ray_cluster.get_runtime_context().gcs_address
        return len(list_actors(address=address, filters=[("class_name", "=", "FooterReader")], limit=10_000))

    folder, _ = photos
    shards = tmp_path / "shards"
    data.ingest(str(folder), str(shards), shard_mb=0.1, executor="local")  # one shard per image
    before = footer_readers()
    keys = sorted(data.read_images(str(shards)).to_pandas()["key"])
    assert keys == ["a.png", "b.png"]
    assert footer_readers() - before == 1  # Ray Data's default provisions 32 of them


def test_shards_hold_row_groups_and_reads_take_read_units_of_at_most_row_group_bytes(tmp_path, ray_cluster):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    mb = 2**20
    blobs = [rng.bytes(mb) for _ in range(24)]  # 24 MiB of incompressible "images" per shard
    table = pa.table({"key": [f"k{i:02d}" for i in range(24)], "image": blobs})
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("a", "b"):
        (shards / f"{name}.parquet").write_bytes(data.table_to_parquet(table))
    meta = pq.ParquetFile(shards / "a.parquet").metadata
    sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
    assert len(sizes) >= 2 and max(sizes) <= data.ROW_GROUP_BYTES + mb  # 1,024-row groups made one of 24 MiB
    # Ray Data packs row groups into read units of up to 128 MiB by default: 48 MiB would be one read, one block.
    ds = data.read_images(str(shards)).materialize()
    assert ds.count() == 48 and ds.num_blocks() >= 3
