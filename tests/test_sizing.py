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

from restoration import data
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


def test_data_share_is_measured_with_the_runs_own_stages(photos):
    folder, tiny = photos
    sample = data.first_row(str(folder))

    def share(model: str, degrade: str | None = None) -> float | None:
        return restore.data_share(restore.RestoreConfig(input="-", output="-", model=model, degrade=degrade), sample)

    bundled = share("denoise-gray")
    cheap = share(tiny)
    degraded = share("denoise-gray", "noise:25")  # degrading, PSNR and SSIM against the reference are data work
    print(f"data share: denoise-gray {bundled:.4f}, degraded {degraded:.4f}; a 3-layer model {cheap:.4f}")
    assert 0.0 < bundled < 0.5  # the bundled denoiser costs more than decoding and encoding its image
    assert cheap > 2 * bundled  # the same data work next to a far cheaper model is a far larger share
    assert degraded > bundled
    assert (
        restore.data_share(restore.RestoreConfig(input="-", output="-", model=tiny), {**sample, "image": b"<html>"})
        is None
    )
    assert restore.data_share(restore.RestoreConfig(input="-", output="-", model=tiny), None) is None


def test_synthesis_data_share_in_sample_mode_only(gan_file):
    share = synthesize.data_share(synthesize.SynthesizeConfig(model=gan_file, output="-", count=10, batch_size=16))
    assert 0.0 < share < 1.0
    reconstruct = synthesize.SynthesizeConfig(model=gan_file, output="-", count=10, mode="reconstruct", inputs="-")
    assert synthesize.data_share(reconstruct) is None


def test_model_runner_slices_cpu_batches_to_the_pixel_budget_and_matches_the_whole_batch(photos):
    _, tiny = photos
    runner = restore.ModelRunner(tiny, precision="fp32")  # the reference pass below runs without autocast
    calls = []
    runner.net.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    side = int(restore.CPU_FORWARD_PIXELS**0.5)
    for shape, passes in (((5, 1, side, side), 5), ((6, 1, side // 2, side // 2), 2), ((3, 1, 40, 40), 1)):
        x = torch.rand(shape)
        calls.clear()
        with torch.inference_mode():
            got = runner.forward(x)
            whole = runner.net(x)
        assert len(calls) == passes + 1, shape  # + 1: the whole-batch reference pass
        assert all(c[0] * c[2] * c[3] <= max(restore.CPU_FORWARD_PIXELS, c[2] * c[3]) for c in calls[:-1])
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
    pyarrow's default, mimalloc, kept all 265 MB of this task's freed arrays."""
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
        for _ in range(10):
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


def test_training_holdout_is_split_off_in_read_workers_without_torch(tmp_path, ray_cluster):
    """Without --val, "val" is the holdout of the training images and "train" the rest: a folder is split by file
    name before it is read (the holdout of a large folder reads 1 file in 20, not all of them), shards row by row.
    The row split runs in Ray Data's read tasks; defined next to the training loops, it made each read worker import
    torch, and a one-epoch run of a tiny model took 57 s instead of 36."""
    import pyarrow as pa

    from restoration.train.run import READ_CPUS, build_datasets

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
        datasets, split = build_datasets("restorer", uri, None)
        assert split == ["train"]
        rows = {
            name: ds.map_batches(torch_loaded, batch_format="pyarrow", num_cpus=READ_CPUS).take_all()
            for name, ds in datasets.items()
        }
        assert sorted(r["key"] for r in rows["val"]) == held, uri
        assert sorted(r["key"] for r in rows["train"]) == sorted(set(keys) - set(held)), uri
        assert not any(r["torch"] for name in rows for r in rows[name]), uri
    # The folder's holdout reads its own files and nothing else.
    datasets, _ = build_datasets("restorer", str(folder), None)
    assert sorted(Path(f).name for f in datasets["val"].input_files()) == held
    # With --val, both sets are read whole.
    datasets, _ = build_datasets("restorer", str(folder), str(shards))
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
