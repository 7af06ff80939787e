"""Reliability and security (issue 9): faults survived, bad input contained, nothing lost, nothing leaked.

Every fault here is real: actor and training-worker processes are killed with SIGKILL (found by PID through Ray's
state API of this session's own cluster, never by name), the embedded S3 server is stopped and started again on the
same port and data folder, and the inputs are real files. Each test prints the rows in / out / errors / duplicates it
saw.

Covered elsewhere and not repeated here: resume without a fault (test_restore_pipeline.py
`test_resume_writes_only_the_missing_keys`, test_synthesize.py `test_counts_keys_resume_and_preview`), an injected
training exception (test_train.py `fail_at_epoch`), the crafted pickle at the loader (test_checkpoint.py), wrong
credentials and `redact` in the storage layer (test_storage.py), decompression bombs in the codec, in a small address
space (test_codec.py), a junk model file and a missing model (test_restore_pipeline.py), a restorer given to
synthesize and a negative --count (test_synthesize.py).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import posixpath
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from restoration import data, storage
from restoration.checkpoint import save_model
from restoration.cli import main
from restoration.models.restorer import Restorer, RestorerConfig
from restoration.pipelines.restore import RestoreConfig, read_output, run_restore
from restoration.pipelines.synthesize import GeneratorActor, SynthesizeConfig, encode_images, run_synthesize

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def restorer_file(tmp_path_factory) -> str:
    """An untrained but real restorer (the pipeline's plumbing is under test, not its quality)."""
    torch.manual_seed(0)
    model = Restorer(RestorerConfig(depth=6, width=16))
    path = tmp_path_factory.mktemp("models") / "restorer.pt"
    save_model(path, "restorer", model.config, model)
    return str(path)


def png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def noise_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, (size, size), dtype=np.uint8)) for _ in range(n)]


def write_shards(uri: str, keys: list[str], images: list[bytes], shards: int) -> None:
    table = pa.table({"key": keys, "image": images})
    per = -(-len(keys) // shards)
    for i in range(shards):
        part = table.slice(i * per, per)
        storage.write_bytes(storage.join(uri, f"part-{i:05d}.parquet"), data.table_to_parquet(part))


def bomb_png() -> bytes:
    """A valid 1×1 PNG whose header claims 30000×30000 pixels."""
    raw = png(np.zeros((1, 1), np.uint8))
    chunk = b"IHDR" + struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def run_folder_files(run_uri: str) -> list[str]:
    return [i.path for i in storage.list_files(run_uri) if i.path.endswith(".parquet")]


def check_exactly_once(output: str, run_id: str, keys: list[str]) -> pa.Table:
    """Every key once in the run folder, every Parquet file there whole, nothing left in staging."""
    run_uri = storage.join(output, f"run_id={run_id}")
    fs, _ = storage.resolve(run_uri)
    files = run_folder_files(run_uri)
    rows_in_files = sum(pq.ParquetFile(fs.open_input_file(f)).metadata.num_rows for f in files)  # each file whole
    table = read_output(run_uri, ["key", "image", "error"])
    got = table.column("key").to_pylist()
    duplicates = len(got) - len(set(got))
    errors = len(got) - table.column("error").null_count
    print(f"  rows in {len(keys)}, out {len(got)}, errors {errors}, duplicates {duplicates}, files {len(files)}")
    assert rows_in_files == len(got) == len(keys) and duplicates == 0 and sorted(got) == sorted(keys)
    assert not list(storage.list_files(storage.join(output, "_staging", f"run_id={run_id}")))
    manifest = json.loads(storage.read_bytes(storage.join(run_uri, "_manifest.json")))
    assert manifest["rows_out"] == len(keys) and manifest["duplicates"] == 0
    return table


def state_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def alive_actor_ids() -> set[str]:
    """IDs of the actors alive now: taken before a run starts, so that actors of earlier runs on this session's
    cluster (whose ends the state API reports a little late) are never mistaken for the run's own."""
    from ray.util.state import list_actors

    return {
        a.actor_id
        for a in list_actors(address=state_address(), filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    }


def live_actor(match: str, ignore: set[str] = frozenset()):
    """The first live actor of this session's cluster whose class name contains `match` and whose ID is not in
    `ignore`, or None."""
    from ray.util.state import list_actors

    for actor in list_actors(address=state_address(), filters=[("state", "=", "ALIVE")], raise_on_missing_output=False):
        if match in actor.class_name and actor.pid and actor.actor_id not in ignore:
            return actor
    return None


def _not_seen(match: str, running: Background) -> AssertionError:
    ended = "the run ended first" + (f" with {running.error!r}" if running.error is not None else "")
    return AssertionError(f"no {match} actor of this run seen at work while the run was in flight ({ended})")


def wait_until_busy(match: str, running: Background, ignore: set[str], timeout: float = 600.0):
    """Wait until a new actor matching `match` (not in `ignore`) is inside a data batch (a `submit` task of it running
    or done, per the state API, which reports task events about once a second) while `running` is still in flight;
    returns the actor."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running.is_alive():
        actor = live_actor(match, ignore)
        if actor is not None:
            tasks = list_tasks(
                address=state_address(),
                filters=[("actor_id", "=", actor.actor_id), ("type", "=", "ACTOR_TASK")],
                raise_on_missing_output=False,
            )
            working = any(t.name.endswith("submit") and t.state in ("RUNNING", "FINISHED") for t in tasks)
            if working and running.is_alive():
                return actor
        time.sleep(0.1)
    raise _not_seen(match, running)


def wait_until_alive(match: str, running: Background, ignore: set[str], timeout: float = 600.0):
    """Wait until a new actor matching `match` (not in `ignore`) is up (model loaded) while `running` is in flight;
    returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running.is_alive():
        actor = live_actor(match, ignore)
        if actor is not None:
            return actor
        time.sleep(0.1)
    raise _not_seen(match, running)


def kill9(pid: int) -> None:
    """SIGKILL a Ray worker process of this session (the PID came from this cluster's state API)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert cmdline.startswith(b"ray::"), cmdline[:80]  # a Ray worker, nothing else
    os.kill(pid, signal.SIGKILL)


class Background(threading.Thread):
    """Runs `fn` in a thread, keeping its result or exception."""

    def __init__(self, fn) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def finish(self, timeout: float = 900.0):
        """Wait for the run; its result (an exception it raised fails the test)."""
        self.join(timeout)
        assert not self.is_alive(), f"the run did not finish within {timeout:.0f} s"
        assert self.error is None, self.error
        return self.result


def cli(args: list[str]) -> int:
    """`restoration ARGS` in process; argparse's own errors exit through SystemExit."""
    try:
        return main(args)
    except SystemExit as e:
        return int(e.code)


# ----------------------------------------------------------------------------------------------------- 1. restore
@pytest.mark.slow
def test_restore_actor_killed_mid_run_every_key_exactly_once(s3, ray_cluster, restorer_file):
    keys = [f"photos/{i:04d}.png" for i in range(400)]
    # 128x128: the actor's one data batch lasts seconds, long enough to be seen running and killed inside it.
    images = noise_images(398, 128) + [b"", b"<html>not an image</html>"]  # two error rows ride along
    shards = s3.uri("rel", "kill", "in")
    write_shards(shards, keys, images, shards=4)
    out = s3.uri("rel", "kill", "out")

    before = alive_actor_ids()
    run = Background(lambda: run_restore(RestoreConfig(shards, out, model=restorer_file, run_id="k", batch_size=8)))
    actor = wait_until_busy("RestoreActor", run, ignore=before)
    kill9(actor.pid)
    print(f"killed restore actor pid {actor.pid} mid-run")
    report = run.finish()
    assert report.rows_in == report.rows_out == 400 and report.errors == 2 and report.duplicates == 0
    table = check_exactly_once(out, "k", keys)
    assert sorted(k for k, e in zip(*(table.column(c).to_pylist() for c in ("key", "error")), strict=True) if e) == [
        "photos/0398.png",
        "photos/0399.png",
    ]


# ----------------------------------------------------------------------------------------------------- 2. S3 outage
@pytest.mark.slow
def test_store_outage_mid_run_completes_or_resumes_without_loss(s3, ray_cluster, restorer_file, capsys):
    keys = [f"img/{i:04d}.png" for i in range(320)]
    shards = s3.uri("rel", "outage", "in")
    write_shards(shards, keys, noise_images(320, 40, seed=1), shards=4)
    out = s3.uri("rel", "outage", "out")

    # The filesystem Ray ships to every read and write task keeps the driver's retries (pyarrow's own pickling drops
    # them, and a restart then failed the run within a second).
    shipped = pickle.loads(pickle.dumps(storage.s3_filesystem()))
    assert shipped._kwargs["retry_strategy"].max_attempts == storage.S3_RETRY_ATTEMPTS > 3

    def outage_while(run: Background, before: set[str], down_s: float | None) -> float:
        """Stop the store once the restore actor is up (mid-run: nothing committed yet); start it again after
        `down_s` seconds (None: once the run has ended)."""
        wait_until_alive("RestoreActor", run, ignore=before)
        t0 = time.monotonic()
        s3.pause()  # SIGTERM, keeps port and data folder
        try:
            if down_s is None:
                run.join(timeout=900)
            else:
                time.sleep(down_s)
        finally:
            s3.start()
        return time.monotonic() - t0

    # With the product's retries (pickled into every Ray task with the filesystem), a restart is ridden out.
    before = alive_actor_ids()
    run = Background(lambda: run_restore(RestoreConfig(shards, out, model=restorer_file, run_id="a", batch_size=8)))
    down = outage_while(run, before, down_s=3.0)
    run.join(timeout=900)
    assert not run.is_alive(), "the run did not finish within 900 s"
    with capsys.disabled():
        print(f"store down {down:.1f} s mid-run: {'completed' if run.error is None else f'failed: {run.error}'}")
    if run.error is not None:  # allowed, if it is one clear line; --resume must then finish the run
        assert isinstance(run.error, ValueError) and "\n" not in str(run.error)
        run_restore(RestoreConfig(shards, out, model=restorer_file, run_id="a", resume=True))
    with capsys.disabled():
        check_exactly_once(out, "a", keys)

    # A store that stays down longer than the retries last stops the run: one clear line and exit code 2, nothing of
    # the attempt committed; --resume after the store is back finishes it with no loss or duplicates. The failing run
    # is a `restoration restore` process of its own on this cluster (its leftover tasks end with it, as a real job's
    # do), with the client's and Ray Data's retries cut to none to stand for a long outage. Ray Data's Parquet footer
    # readers ignore the context's `retried_io_errors` and retry with its defaults (10 attempts, about 155 s of
    # back-off), so a setup hook cuts those defaults in every worker of the drill's job as well.
    drill = (
        "import sys, ray, ray.data\n"
        "from restoration import cluster, storage\n"
        "from restoration.cli import main\n"
        "def no_io_retries():\n"
        "    import ray.data.context\n"
        "    ray.data.context.DEFAULT_RETRIED_IO_ERRORS = ()\n"
        "storage.S3_RETRY_ATTEMPTS = 1\n"
        "ray.data.DataContext.get_current().retried_io_errors = []\n"
        "env = {'env_vars': cluster.forwarded_env(), 'worker_process_setup_hook': no_io_retries}\n"
        "ray.init(runtime_env=env, logging_level='WARNING')\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["restore", shards, out, "--model", restorer_file, "--run-id", "b", "--batch-size", "8"]
    env = {**os.environ, "RAY_ADDRESS": state_address()}
    before = alive_actor_ids()
    run = Background(
        lambda: subprocess.run([sys.executable, "-c", drill, *args], capture_output=True, text=True, env=env, cwd=REPO)
    )
    down = outage_while(run, before, down_s=None)
    proc = run.finish()
    lines = [line for line in proc.stderr.splitlines() if line.startswith("restoration: error:")]
    with capsys.disabled():
        print(f"store down {down:.1f} s, no retries: exit {proc.returncode}; {lines}")
    assert proc.returncode == 2 and len(lines) == 1 and "--resume" in lines[0], proc.stderr[-3000:]
    assert "restoration/cli.py" not in proc.stderr  # Ray may log the failed task; the CLI itself prints one line
    assert s3.secret_key not in proc.stderr and s3.access_key not in proc.stderr
    committed = run_folder_files(storage.join(out, "run_id=b"))
    assert cli([*args, "--resume"]) == 0
    with capsys.disabled():
        table = check_exactly_once(out, "b", keys)
        print(f"  files committed by the failed attempt: {len(committed)}; rows after --resume: {table.num_rows}")


# ----------------------------------------------------------------------------------------------------- 3. training
@pytest.mark.slow
def test_training_worker_killed_mid_epoch_resumes_from_checkpoint(s3, ray_cluster, train400, tmp_path):
    from restoration.train.launcher import LaunchConfig
    from restoration.train.restorer import RestorerTrainConfig, decode_rows, init_weights, train_epoch
    from restoration.train.restorer_core import NoiseSpec, evaluate_psnr
    from restoration.train.run import resolve_config, run_training

    files = sorted(p for p in Path(train400).iterdir() if p.suffix == ".png")[:40]
    folder = tmp_path / "train"
    folder.mkdir()
    for p in files:
        (folder / p.name).write_bytes(p.read_bytes())
    shards = s3.uri("rel", "train", "shards")
    data.ingest(str(folder), shards)  # one shard: the worker sees the images in key order, as the reference below
    # Both runs start from the same weights (init_from), so they differ only by the interruption.
    tiny = {"depth": 4, "width": 16, "patch_size": 32, "batch_size": 8, "steps_per_epoch": 250, "val_max_side": 96}
    tiny |= {"epochs": 3, "batch_norm": False, "init_from": s3.uri("rel", "train", "init.pt")}
    torch.manual_seed(0)
    start = Restorer(RestorerConfig(depth=4, width=16, batch_norm=False))
    save_model(tmp_path / "init.pt", "restorer", start.config, start)
    storage.write_bytes(tiny["init_from"], (tmp_path / "init.pt").read_bytes())
    runs = s3.uri("rel", "train", "runs")
    snapshot = storage.join(runs, "killed", "checkpoint_manager_snapshot.json")

    t0 = time.monotonic()
    launch = LaunchConfig(storage=runs, name="killed", max_failures=2, num_to_keep=None)
    before = alive_actor_ids()
    run = Background(lambda: run_training("restorer", shards, launch, resolve_config("restorer", None, tiny)))
    # Kill the worker once Ray Train has registered a checkpoint: it is then in the next epoch.
    deadline, registered, worker = time.monotonic() + 600, 0, None
    while run.is_alive() and time.monotonic() < deadline:
        if storage.exists(snapshot):
            registered = len(json.loads(storage.read_bytes(snapshot))["checkpoint_results"])
            worker = live_actor("RayTrainWorker", ignore=before)
            if registered and worker is not None:
                kill9(worker.pid)
                break
        time.sleep(0.2)
    assert registered and worker is not None, "no checkpoint registered while the run was in flight"
    print(f"killed train worker pid {worker.pid} after {registered} checkpoint(s), {time.monotonic() - t0:.0f} s in")
    report = run.finish()
    resumed_from = {m["epoch"]: m["started_from_epoch"] for m in report.history}
    print(f"  run finished {time.monotonic() - t0:.0f} s in; epochs {report.epochs}, started_from_epoch {resumed_from}")
    assert report.epochs == [0, 1, 2] and resumed_from[0] == 0
    assert resumed_from[2] in (registered, registered + 1) and resumed_from[2] >= 1  # from the checkpoint, not zero
    killed_psnr = report.history[-1]["val_psnr"]
    checkpoints = {posixpath.dirname(i.path) for i in storage.list_files(storage.join(runs, "killed"))} - {
        storage.resolve(storage.join(runs, "killed"))[1]
    }
    # 3 checkpoints: the killed worker died inside epoch `registered` before reporting it; 4: while reporting it.
    print(f"  checkpoint folders written: {len(checkpoints)}")

    # The uninterrupted run: the same epochs of the same loop on the same images from the same weights, in this
    # process with the worker's one thread.
    keys = [p.name for p in files]
    train = decode_rows([pa.table({"image": [(folder / k).read_bytes() for k in keys if not data.held_out(k)]})], 1)
    val = decode_rows([pa.table({"image": [(folder / k).read_bytes() for k in keys if data.held_out(k)]})], 1)
    cfg = RestorerTrainConfig(**tiny)
    model = Restorer(cfg.model_config())
    model.load_state_dict(init_weights(str(tmp_path / "init.pt"), cfg.model_config()))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epoch in range(cfg.epochs):
            train_epoch(model, optimizer, cfg, train, 0, epoch, torch.device("cpu"))
        clean_psnr = evaluate_psnr(model, val, NoiseSpec(sigma=cfg.val_sigma), max_side=cfg.val_max_side)["psnr"]
    finally:
        torch.set_num_threads(threads)
    print(f"  final val PSNR: killed and resumed {killed_psnr:.4f} dB, uninterrupted {clean_psnr:.4f} dB")
    assert abs(killed_psnr - clean_psnr) < 0.02


# ----------------------------------------------------------------------------------------------------- 4. synthesis
@pytest.mark.slow
def test_generator_actor_killed_mid_run_exact_count_identical_images(s3, ray_cluster, gan_file):
    n = 4000
    out = s3.uri("rel", "synth")
    config = SynthesizeConfig(model=gan_file, output=out, count=n, seed=3, run_id="k", batch_size=16)
    before = alive_actor_ids()
    run = Background(lambda: run_synthesize(config))
    actor = wait_until_busy("GeneratorActor", run, ignore=before)
    kill9(actor.pid)
    print(f"killed generator actor pid {actor.pid} mid-run")
    report = run.finish()
    table = read_output(storage.join(out, "run_id=k"), ["key", "index", "image", "error"])
    indices = table.column("index").to_pylist()
    print(f"  requested {n}, rows {table.num_rows}, unique {len(set(indices))}, errors {report.errors}")
    assert report.complete and report.rows_out == n and report.duplicates == 0 and report.errors == 0
    assert sorted(indices) == list(range(n)) and len(set(table.column("key").to_pylist())) == n
    assert not list(storage.list_files(storage.join(out, "_staging", "run_id=k")))

    # The uninterrupted run, in this process: row i depends on (model, seed, i) alone.
    generator = GeneratorActor(config, run_id="k", threads=1)
    expected = {}
    for start in range(0, n, 500):
        rows = encode_images(generator(pa.table({"start": [start], "stop": [min(n, start + 500)]})))
        expected.update(zip(rows.column("index").to_pylist(), rows.column("image").to_pylist(), strict=True))
    got = dict(zip(indices, table.column("image").to_pylist(), strict=True))
    assert got == expected


# ----------------------------------------------------------------------------------------------------- 5. bad input
@pytest.fixture(scope="module")
def scale_runs(s3, ray_cluster, restorer_file, tmp_path_factory) -> SimpleNamespace:
    """2,000 tiny images restored into a local folder twice by `restoration restore` processes: clean, then with 1%
    corrupt inputs of six kinds and four hostile keys, keeping the second's whole output (item 7 reads it)."""
    n = 2000
    rng = np.random.default_rng(5)
    good = noise_images(n, 16, seed=5)
    jpeg = png(rng.integers(0, 256, (16, 16), dtype=np.uint8), fmt="JPEG")
    kinds = {  # 20 corrupt inputs of six kinds, and the reason each must give
        "empty": ([b""] * 4, "empty"),
        "truncated-png": ([good[0][: len(good[0]) // 2]] * 3, "truncated"),
        "truncated-jpeg": ([jpeg[: len(jpeg) // 2]] * 3, "truncated"),
        "html": ([b"<!doctype html><html><body>503</body></html>"] * 3, "not an image"),
        "random": ([rng.integers(0, 256, 600, dtype=np.uint8).tobytes() for _ in range(3)], "not an image"),
        "bomb": ([bomb_png()] * 4, "too large"),  # a 30000×30000 header: refused before any pixel is allocated
    }
    tag = uuid.uuid4().hex[:8]
    hostile = [f"../../escape-{tag}.png", f"/tmp/abs-{tag}.png", f"a/../../../up-{tag}.png", f"..\\win-{tag}.png"]
    keys = [f"shard/{i:05d}.png" for i in range(n - len(hostile))] + hostile
    positions = rng.permutation(n - len(hostile))[:20]
    corrupt, expected_reason = list(good), {}
    payloads = [(kind, payload, reason) for kind, (ps, reason) in kinds.items() for payload in ps]
    for pos, (kind, payload, reason) in zip(positions, payloads, strict=True):
        corrupt[pos] = payload
        expected_reason[keys[pos]] = (kind, reason)
    write_shards(s3.uri("rel", "scale", "clean"), keys, good, shards=4)
    write_shards(s3.uri("rel", "scale", "bad"), keys, corrupt, shards=4)
    base = tmp_path_factory.mktemp("sandbox")
    out = base / "out"
    before = set(Path("/tmp").glob(f"*{tag}*"))

    def restore(run_id: str) -> subprocess.CompletedProcess:  # both runs alike, so that their rates compare
        proc = subprocess.run(
            [sys.executable, "-m", "restoration.cli", "restore", s3.uri("rel", "scale", run_id), str(out)]
            + ["--model", restorer_file, "--run-id", run_id],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "RAY_ADDRESS": state_address()},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    restore("clean")
    bad = restore("bad")
    manifests = {r: json.loads((out / f"run_id={r}" / "_manifest.json").read_text()) for r in ("clean", "bad")}
    return SimpleNamespace(
        keys=keys, hostile=hostile, tag=tag, expected_reason=expected_reason, base=base, out=out, before=before,
        bad=bad, manifest=manifests["bad"], clean=manifests["clean"],
    )  # fmt: skip


@pytest.mark.slow
def test_one_percent_corrupt_inputs_at_scale_all_keys_out(scale_runs):
    runs = scale_runs
    table = check_exactly_once(str(runs.out), "bad", runs.keys)
    errors = {k: e for k, e in zip(*(table.column(c).to_pylist() for c in ("key", "error")), strict=True) if e}
    assert set(errors) == set(runs.expected_reason) and runs.manifest["errors_by_stage"] == {"decode": 20}
    for key, (kind, reason) in runs.expected_reason.items():
        assert errors[key].startswith("decode: ") and reason in errors[key], (kind, errors[key])
    assert runs.clean["errors"] == 0 and runs.clean["rows_out"] == len(runs.keys)

    def steady_rate(run_id: str) -> float:  # rows per second between the first and the last row out (no start-up)
        done = read_output(str(runs.out / f"run_id={run_id}"), ["restored_at"]).column("restored_at").to_numpy()
        return (len(done) - 1) / max(done.max() - done.min(), 1e-9)

    clean_rate, bad_rate = runs.clean["images_per_s"], runs.manifest["images_per_s"]
    print(
        f"clean: {clean_rate:.0f} images/s end to end, {steady_rate('clean'):.0f} steady; 1% corrupt: {bad_rate:.0f} "
        f"images/s end to end, {steady_rate('bad'):.0f} steady (ratios {bad_rate / clean_rate:.2f}, "
        f"{steady_rate('bad') / steady_rate('clean'):.2f})"
    )


# ----------------------------------------------------------------------------------------------------- 6. arguments
def test_bad_arguments_are_one_line_errors_with_no_partial_output(s3, restorer_file, gan_file, tmp_path, capsys):
    shards = s3.uri("rel", "args", "in")
    write_shards(shards, ["a.png", "b.png"], noise_images(2, 16), shards=1)
    out = s3.uri("rel", "args", "out")
    local_in = tmp_path / "in"
    local_in.mkdir()
    (local_in / "a.png").write_bytes(noise_images(1, 16)[0])
    wrong = {"AWS_ACCESS_KEY_ID": "rstWRONGKEY0001", "AWS_SECRET_ACCESS_KEY": "wrong-secret-value-0123456789"}
    restore = ["restore", "--model", restorer_file]
    cases = [  # (what, args, environment overrides, expected in the message)
        ("missing input", [*restore, s3.uri("rel", "args", "none"), out], {}, "input not found"),
        ("missing bucket", [*restore, "s3://no-such-bucket-rel/in", out], {}, "input not found: s3://no-such-bucket"),
        ("wrong credentials, input", [*restore, shards, out], wrong, "ACCESS_DENIED"),
        ("wrong credentials, output", [*restore, str(local_in), out], wrong, "check AWS_ACCESS_KEY_ID"),
        ("model on S3 missing", ["restore", shards, out, "--model", s3.uri("rel", "none.pt")], {}, "not found: s3://"),
        ("GAN given to restore", ["restore", shards, out, "--model", gan_file], {}, "holds a dcgan model"),
        ("negative workers", [*restore, shards, out, "--workers", "-2"], {}, "--workers: expected an integer > 0"),
        ("zero batch size", [*restore, shards, out, "--batch-size", "0"], {}, "expected an integer > 0, got '0'"),
        ("negative overlap", [*restore, shards, out, "--overlap", "-1"], {}, "--overlap must be >= 0, got -1"),
        ("zero count", ["synthesize", "--model", gan_file, "--count", "0", "--out", out], {}, "got '0'"),
        ("unknown degradation", [*restore, shards, out, "--degrade", "sparkle:3"], {}, "unknown degradation 'sparkle'"),
        ("run id escaping", [*restore, shards, out, "--run-id", "../../etc"], {}, "--run-id must be a plain name"),
    ]
    for what, args, env, expected in cases:
        saved = {k: os.environ[k] for k in env}
        os.environ.update(env)
        try:
            code = cli(args)
        finally:
            os.environ.update(saved)
        err = capsys.readouterr().err
        with capsys.disabled():
            print(f"{what}: exit {code}: {err.strip()}")
        assert code == 2 and err.count("\n") == 1 and expected in err and "Traceback" not in err, (what, err)
        assert wrong["AWS_SECRET_ACCESS_KEY"] not in err and wrong["AWS_ACCESS_KEY_ID"] not in err
        assert not list(storage.list_files(out)), f"{what}: partial output"

    # The same as a real process: exit code 2, one line on stderr, nothing on stdout.
    proc = subprocess.run(
        [sys.executable, "-m", "restoration.cli", *restore, shards, out],
        capture_output=True,
        text=True,
        env={**os.environ, **wrong},
        cwd=REPO,
    )
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("restoration: error: cannot access s3://") and "wrong-secret" not in proc.stderr


# ----------------------------------------------------------------------------------------------------- 7. security
class RunsCode:
    """Unpickling this calls `Path.touch(marker)`: the proof that a loader ran code from the file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_model_file_that_would_run_code_is_refused_by_the_cli(s3, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    payload = {"format": "restoration-model", "format_version": 1, "kind": "restorer", "meta": RunsCode(str(marker))}
    torch.save(payload, evil)
    pickle.loads(pickle.dumps(RunsCode(str(tmp_path / "control"))))  # control: a plain unpickler runs it
    assert (tmp_path / "control").exists()
    out = tmp_path / "out"
    assert cli(["restore", str(tmp_path), str(out), "--model", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused by the weights-only unpickler" in err
    assert not marker.exists() and not out.exists()


@pytest.mark.slow
def test_hostile_keys_stay_inside_a_local_output_and_credentials_appear_nowhere(s3, scale_runs):
    runs = scale_runs
    # Keys with '..', a leading '/' or a backslash are data, never paths: every file written is inside the output.
    written = [p for p in runs.base.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(runs.out) for p in written)
    assert set(Path("/tmp").glob(f"*{runs.tag}*")) == runs.before and not list(runs.base.rglob(f"*{runs.tag}*"))
    table = read_output(str(runs.out / "run_id=bad"), ["key", "image", "error"])
    rows = {r["key"]: r for r in table.to_pylist() if r["key"] in runs.hostile or r["error"]}
    assert all(rows[k]["image"] and rows[k]["error"] is None for k in runs.hostile)

    # Credentials appear nowhere: not in what the run printed (Ray's forwarded logs included), the manifests, the
    # Parquet bytes, or the error rows.
    secrets = [s3.secret_key, s3.access_key]
    texts = {"stdout": runs.bad.stdout, "stderr": runs.bad.stderr}
    texts |= {"error rows": "\n".join(r["error"] for r in rows.values() if r["error"])}
    texts |= {str(p.relative_to(runs.out)): p.read_bytes().decode("latin-1") for p in written}
    leaks = [(name, secret[:3]) for name, text in texts.items() for secret in secrets if secret in text]
    print(f"checked {len(texts)} outputs for the credentials ({len(runs.bad.stderr)} chars of stderr): leaks {leaks}")
    assert not leaks


@pytest.mark.slow
def test_credentials_never_reach_ray_logs(s3, ray_cluster):
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = []
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            if s3.secret_key.encode() in text or s3.access_key.encode() in text:
                leaked.append(posixpath.relpath(path, logs))
    print(f"Ray log files holding the credentials: {leaked}")
    assert not leaked
