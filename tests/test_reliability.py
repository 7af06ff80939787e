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

import dataclasses
import io
import json
import math
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
from restoration.inference import GeneratorActor
from restoration.models.restorer import Restorer, RestorerConfig
from restoration.pipelines.restore import RestoreConfig, run_restore
from restoration.pipelines.synthesize import SynthesizeConfig, encode_images, run_synthesize
from restoration.runs import read_output

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


@pytest.fixture(scope="module")
def heavy_restorer_file(tmp_path_factory) -> str:
    """An untrained restorer heavy enough that the model, not decoding and encoding, is what a fault run spends its
    time on, so that sizing the run from the model's measured speed (`sized`) sizes the run."""
    torch.manual_seed(0)
    model = Restorer(RestorerConfig(depth=10, width=48))
    path = tmp_path_factory.mktemp("models") / "heavy.pt"
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


# Work per fault run, in seconds of one actor's model time on this machine: long enough for the state API (which
# reports task events about once a second) to see an actor inside a batch and for a kill or an outage to land mid-run,
# whatever the machine's speed. The runs are sized from the speed measured in the test itself, not fixed; in the run
# the actors share the cores with the decode, encode and write tasks, so it lasts longer than this.
FAULT_WORK_S = 6.0


def seconds_per_call(fn) -> float:
    """Fastest of three timed calls of `fn` after one warm-up call (sizing only; nothing asserts on it)."""
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def sized(minimum: int, seconds_per_item: float, multiple: int = 1) -> int:
    """Items for `FAULT_WORK_S` seconds of work for each of two actors, at least `minimum`, a multiple of `multiple`."""
    n = max(minimum, math.ceil(2 * FAULT_WORK_S / max(seconds_per_item, 1e-9)))
    return -(-n // multiple) * multiple


def submit_tasks(actor_ids: set[str], *filters: tuple[str, str, str]) -> list:
    """The data batches (`submit` actor tasks, every attempt) of the given actors that match `filters`, per the state
    API (which lists at most `limit` tasks: filter there, not here)."""
    from ray.util.state import list_tasks

    tasks = []
    for actor_id in actor_ids:
        tasks += list_tasks(
            address=state_address(),
            filters=[("actor_id", "=", actor_id), ("type", "=", "ACTOR_TASK"), *filters],
            limit=10_000,
            raise_on_missing_output=False,
        )
    return [t for t in tasks if t.name.endswith("submit")]


RUNNING = ("state", "=", "RUNNING")
FINISHED = ("state", "=", "FINISHED")
RETRIED = ("attempt_number", "!=", "0")


def kill_until_a_batch_is_retried(match: str, running: Background, ignore: set[str], timeout: float = 600.0) -> list:
    """SIGKILL a new actor matching `match` (not in `ignore`) while a data batch of it is RUNNING, until the state API
    shows a batch of a killed actor run again (an attempt number of 1 or more: Ray restarted the actor and resubmitted
    the batch the kill interrupted). A kill that lands between two batches interrupts none; the actor is then killed
    again once it is back. Fails when the run ends before a batch was seen interrupted.

    Returns:
        The killed actors' IDs (the actor keeps its ID across restarts).
    """
    from ray.util.state import get_actor

    deadline, killed = time.monotonic() + timeout, set()
    while time.monotonic() < deadline and running.is_alive():
        for actor in [live_actor(match, ignore), *(get_actor(a, address=state_address()) for a in killed)]:
            if actor is None or actor.state != "ALIVE" or not actor.pid:
                continue
            if submit_tasks({actor.actor_id}, RUNNING) and running.is_alive():
                kill9(actor.pid)
                killed.add(actor.actor_id)
                print(f"killed {match} pid {actor.pid} inside a batch")
                wait_until = time.monotonic() + 15
                while time.monotonic() < wait_until:  # the restarted actor's retry, or its first batch anew
                    if submit_tasks(killed, RETRIED):
                        return sorted(killed)
                    time.sleep(0.2)
                break
        time.sleep(0.1)
    raise _not_seen(match, running) if not killed else AssertionError(f"no batch of the killed {match} was retried")


def retried_batches(actor_ids: list[str], timeout: float = 30.0) -> list:
    """The killed actors' batches that ran again and finished (waiting for the state API to report them)."""
    deadline = time.monotonic() + timeout
    while True:
        retried = submit_tasks(set(actor_ids), RETRIED, FINISHED)
        if retried or time.monotonic() > deadline:
            return retried
        time.sleep(0.5)


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
def test_restore_actor_killed_mid_run_every_key_exactly_once(s3, ray_cluster, heavy_restorer_file):
    from restoration.inference import RestoreActor

    # 128x128 images, sized so that the run holds FAULT_WORK_S seconds of model work per actor on this machine.
    actor = RestoreActor(heavy_restorer_file, threads=1)
    batch = np.random.default_rng(0).random((8, 128, 128, 1), dtype=np.float32)
    n = sized(200, seconds_per_call(lambda: actor.restore_array(batch)) / 8, multiple=4)
    keys = [f"photos/{i:05d}.png" for i in range(n)]
    images = noise_images(n - 2, 128) + [b"", b"<html>not an image</html>"]  # two error rows ride along
    shards = s3.uri("rel", "kill", "in")
    write_shards(shards, keys, images, shards=4)
    out = s3.uri("rel", "kill", "out")

    before = alive_actor_ids()
    run = Background(
        lambda: run_restore(RestoreConfig(shards, out, model=heavy_restorer_file, run_id="k", batch_size=8))
    )
    killed = kill_until_a_batch_is_retried("RestoreActor", run, ignore=before)
    report = run.finish()
    retried = retried_batches(killed)
    print(f"  {n} rows; batches run again after the kill: {len(retried)}")
    assert retried, "no interrupted batch was run again"
    assert report.rows_in == report.rows_out == n and report.errors == 2 and report.duplicates == 0
    table = check_exactly_once(out, "k", keys)
    assert sorted(k for k, e in zip(*(table.column(c).to_pylist() for c in ("key", "error")), strict=True) if e) == [
        keys[-2],
        keys[-1],
    ]


# ----------------------------------------------------------------------------------------------------- 2. S3 outage
@pytest.fixture(scope="module")
def outage_shards(s3, heavy_restorer_file) -> tuple[str, list[str]]:
    """Input shards of 64x64 images, sized so that a restore of them holds FAULT_WORK_S seconds of model work per
    actor on this machine: an outage that starts once the first batch is done lands mid-run."""
    from restoration.inference import RestoreActor

    actor = RestoreActor(heavy_restorer_file, threads=1)
    batch = np.random.default_rng(0).random((8, 64, 64, 1), dtype=np.float32)
    n = sized(200, seconds_per_call(lambda: actor.restore_array(batch)) / 8, multiple=4)
    keys = [f"img/{i:05d}.png" for i in range(n)]
    shards = s3.uri("rel", "outage", "in")
    write_shards(shards, keys, noise_images(n, 64, seed=1), shards=4)
    return shards, keys


def outage_while(s3, run: Background, before: set[str], down_s: float | None) -> tuple[float, float]:
    """Stop the store once the run's restore actor has finished a batch (mid-run: nothing committed yet); start it
    again after `down_s` seconds (None: once the run has ended). Returns the outage's (start, end) in Unix time."""
    actor = wait_until_alive("RestoreActor", run, ignore=before)
    while run.is_alive() and not submit_tasks({actor.actor_id}, FINISHED):
        time.sleep(0.1)
    assert run.is_alive(), _not_seen("RestoreActor", run)
    start = time.time()
    s3.pause()  # SIGTERM, keeps port and data folder
    try:
        if down_s is None:
            run.join(timeout=900)
        else:
            time.sleep(down_s)
    finally:
        s3.start()
    return start, time.time()


@pytest.mark.slow
def test_store_outage_of_seconds_mid_run_is_ridden_out(s3, ray_cluster, heavy_restorer_file, outage_shards):
    shards, keys = outage_shards
    out = s3.uri("rel", "outage", "out")
    # The filesystem Ray ships to every read and write task keeps the driver's retries (pyarrow's own pickling drops
    # them, and a restart then failed the run within a second).
    shipped = pickle.loads(pickle.dumps(storage.s3_filesystem()))
    assert shipped._kwargs["retry_strategy"].max_attempts == storage.S3_RETRY_ATTEMPTS > 3

    before = alive_actor_ids()
    run = Background(
        lambda: run_restore(RestoreConfig(shards, out, model=heavy_restorer_file, run_id="a", batch_size=8))
    )
    down, up = outage_while(s3, run, before, down_s=3.0)
    report = run.finish()  # no exception: the client's retries rode the outage out
    table = check_exactly_once(out, "a", keys)
    done = read_output(storage.join(out, "run_id=a"), ["restored_at"]).column("restored_at").to_numpy()
    before_it, after_start = int((done < down).sum()), int((done >= down).sum())
    print(f"  store down {up - down:.1f} s; rows restored before it {before_it}, from its start on {after_start}")
    assert report.rows_out == len(keys) and table.column("error").null_count == len(keys)
    assert before_it and after_start  # the outage fell inside the run's model work


@pytest.mark.slow
def test_store_outage_past_the_retries_stops_with_one_line_and_resume_finishes(
    s3, ray_cluster, heavy_restorer_file, outage_shards, capsys
):
    # A store that stays down longer than the retries last stops the run: one clear line and exit code 2, nothing of
    # the attempt committed; --resume after the store is back finishes it with no loss or duplicates. The failing run
    # is a `restoration restore` process of its own on this cluster (its leftover tasks end with it, as a real job's
    # do), with the client's and Ray Data's retries cut to none to stand for a long outage. Ray Data's Parquet footer
    # readers ignore the context's `retried_io_errors` and retry with its defaults (10 attempts, about 155 s of
    # back-off), so a setup hook cuts those defaults in every worker of the drill's job as well.
    shards, keys = outage_shards
    out = s3.uri("rel", "outage", "out-long")
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
    args = ["restore", shards, out, "--model", heavy_restorer_file, "--run-id", "b", "--batch-size", "8"]
    env = {**os.environ, "RAY_ADDRESS": state_address()}
    before = alive_actor_ids()
    run = Background(
        lambda: subprocess.run([sys.executable, "-c", drill, *args], capture_output=True, text=True, env=env, cwd=REPO)
    )
    down, up = outage_while(s3, run, before, down_s=None)
    proc = run.finish()
    lines = [line for line in proc.stderr.splitlines() if line.startswith("restoration: error:")]
    with capsys.disabled():
        print(f"store down {up - down:.1f} s, no retries: exit {proc.returncode}; {lines}")
    assert proc.returncode == 2 and len(lines) == 1 and "--resume" in lines[0], proc.stderr[-3000:]
    assert "restoration/cli.py" not in proc.stderr  # Ray may log the failed task; the CLI itself prints one line
    assert s3.secret_key not in proc.stderr and s3.access_key not in proc.stderr
    committed = run_folder_files(storage.join(out, "run_id=b"))
    assert not committed  # nothing of the failed attempt is visible
    assert cli([*args, "--resume"]) == 0
    with capsys.disabled():
        table = check_exactly_once(out, "b", keys)
        print(f"  rows after --resume: {table.num_rows}")


# ----------------------------------------------------------------------------------------------------- 3. training
@pytest.mark.slow
def test_training_worker_killed_mid_epoch_resumes_from_checkpoint(s3, ray_cluster, train400, tmp_path):
    from restoration.train import LaunchConfig, launch, resolve_config
    from restoration.train.restorer import RestorerTrainConfig, decode_rows, init_weights, train_epoch
    from restoration.train.restorer_core import NoiseSpec, evaluate_psnr

    files = sorted(p for p in Path(train400).iterdir() if p.suffix == ".png")[:40]
    folder = tmp_path / "train"
    folder.mkdir()
    for p in files:
        (folder / p.name).write_bytes(p.read_bytes())
    shards = s3.uri("rel", "train", "shards")
    data.ingest(str(folder), shards)  # one shard: the worker sees the images in key order, as the reference below
    # Both runs start from the same weights (init_from), so they differ only by the interruption.
    # Six short epochs: after the first checkpoint the run still has five epochs (each with a validation, a checkpoint
    # upload and a report) to go, so the kill lands inside the run on any machine; a restart from a checkpoint
    # (started_from_epoch >= 1 below) is the proof that it did.
    epochs = 6
    tiny = {"depth": 4, "width": 16, "patch_size": 32, "batch_size": 8, "steps_per_epoch": 40, "val_max_side": 96}
    tiny |= {"epochs": epochs, "batch_norm": False, "init_from": s3.uri("rel", "train", "init.pt")}
    torch.manual_seed(0)
    start = Restorer(RestorerConfig(depth=4, width=16, batch_norm=False))
    save_model(tmp_path / "init.pt", "restorer", start.config, start)
    storage.write_bytes(tiny["init_from"], (tmp_path / "init.pt").read_bytes())
    runs = s3.uri("rel", "train", "runs")
    snapshot = storage.join(runs, "killed", "checkpoint_manager_snapshot.json")

    t0 = time.monotonic()
    where = LaunchConfig(storage=runs, name="killed", max_failures=2, num_to_keep=None)
    before = alive_actor_ids()
    run = Background(lambda: launch("restorer", resolve_config("restorer", None, tiny), where, shards))
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
    last = epochs - 1
    assert report.epochs == list(range(epochs)) and resumed_from[0] == 0
    # The restarted worker resumed from a checkpoint at least as new as the last one registered before the kill (the
    # snapshot lags the worker, which may have written one or two more by the time the kill landed).
    assert resumed_from[last] >= max(registered, 1)
    killed_psnr = report.history[-1]["val_psnr"]
    checkpoints = {posixpath.dirname(i.path) for i in storage.list_files(storage.join(runs, "killed"))} - {
        storage.resolve(storage.join(runs, "killed"))[1]
    }
    # Every epoch's checkpoint is there: the killed worker's (from which the run resumed, and any it wrote after the
    # registered one) and the restarted worker's, one per epoch from `resumed_from` on.
    print(f"  checkpoint folders written: {len(checkpoints)}")
    assert len(checkpoints) >= epochs

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
    out = s3.uri("rel", "synth")
    config = SynthesizeConfig(model=gan_file, output=out, count=4000, seed=3, run_id="k", batch_size=16)
    generator = GeneratorActor(config, run_id="k", threads=1)
    per_image = seconds_per_call(lambda: generator(pa.table({"start": [0], "stop": [512]}))) / 512
    n = sized(4000, per_image, multiple=1000)  # FAULT_WORK_S seconds of generation per actor on this machine
    config = dataclasses.replace(config, count=n)
    before = alive_actor_ids()
    run = Background(lambda: run_synthesize(config))
    killed = kill_until_a_batch_is_retried("GeneratorActor", run, ignore=before)
    report = run.finish()
    retried = retried_batches(killed)
    table = read_output(storage.join(out, "run_id=k"), ["key", "index", "image", "error"])
    indices = table.column("index").to_pylist()
    print(f"  requested {n}, rows {table.num_rows}, unique {len(set(indices))}, errors {report.errors}")
    print(f"  batches run again after the kill: {len(retried)}")
    assert retried, "no interrupted batch was run again"
    assert report.complete and report.rows_out == n and report.duplicates == 0 and report.errors == 0
    assert sorted(indices) == list(range(n)) and len(set(table.column("key").to_pylist())) == n
    assert not list(storage.list_files(storage.join(out, "_staging", "run_id=k")))

    # The uninterrupted run, in this process: row i depends on (model, seed, i) alone. Every 50th index of the run,
    # so that each actor task's rows (hundreds of consecutive indices), the retried ones among them, are compared.
    sample = list(range(0, n, 50))
    rows = encode_images(generator(pa.table({"start": sample, "stop": [i + 1 for i in sample]})))
    expected = dict(zip(rows.column("index").to_pylist(), rows.column("image").to_pylist(), strict=True))
    got = dict(zip(indices, table.column("image").to_pylist(), strict=True))
    assert len(expected) == len(sample) and {i: got[i] for i in sample} == expected


# ----------------------------------------------------------------------------------------------------- 5. bad input
@pytest.fixture(scope="module")
def scale_runs(s3, ray_cluster, restorer_file, tmp_path_factory) -> SimpleNamespace:
    """2,000 tiny images, 1% of them corrupt inputs of six kinds and four of them with hostile keys, restored into a
    local folder by a `restoration restore` process, keeping its whole output (item 7 reads it)."""
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
    write_shards(s3.uri("rel", "scale", "bad"), keys, corrupt, shards=4)
    base = tmp_path_factory.mktemp("sandbox")
    out = base / "out"
    before = set(Path("/tmp").glob(f"*{tag}*"))

    bad = subprocess.run(
        [sys.executable, "-m", "restoration.cli", "restore", s3.uri("rel", "scale", "bad"), str(out)]
        + ["--model", restorer_file, "--run-id", "bad"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": state_address()},
    )
    assert bad.returncode == 0, bad.stderr[-3000:]
    manifest = json.loads((out / "run_id=bad" / "_manifest.json").read_text())
    return SimpleNamespace(
        keys=keys, hostile=hostile, tag=tag, expected_reason=expected_reason, base=base, out=out, before=before,
        bad=bad, manifest=manifest,
    )  # fmt: skip


@pytest.mark.slow
def test_one_percent_corrupt_inputs_at_scale_all_keys_out(scale_runs):
    runs = scale_runs
    table = check_exactly_once(str(runs.out), "bad", runs.keys)
    errors = {k: e for k, e in zip(*(table.column(c).to_pylist() for c in ("key", "error")), strict=True) if e}
    assert set(errors) == set(runs.expected_reason) and runs.manifest["errors_by_stage"] == {"decode": 20}
    for key, (kind, reason) in runs.expected_reason.items():
        assert errors[key].startswith("decode: ") and reason in errors[key], (kind, errors[key])
    assert runs.manifest["rows_in"] == len(runs.keys) and runs.manifest["errors"] == 20


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
def test_credentials_never_reach_ray_logs(s3, ray_cluster, restorer_file):
    import ray
    from ray.util.state import list_actors

    # A run of its own, whose read and write tasks and restore actor all use the credentials against S3; then every
    # log file of this session's cluster, the ones that run's actors wrote among them, is searched for them.
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    shards, out = s3.uri("rel", "logs", "in"), s3.uri("rel", "logs", "out")
    write_shards(shards, [f"{i}.png" for i in range(16)], noise_images(16, 32), shards=2)
    before = alive_actor_ids()
    report = run_restore(RestoreConfig(shards, out, model=restorer_file, run_id="logs", batch_size=8))
    assert report.rows_out == 16 and report.errors == 0
    actors = list_actors(address=state_address(), limit=10_000, raise_on_missing_output=False)
    pids = {str(a.pid) for a in actors if "RestoreActor" in a.class_name and a.actor_id not in before and a.pid}
    assert pids, "the run's restore actor is not in the state API"
    scanned, leaked = [], []
    for path in logs.rglob("*"):
        if path.is_file():
            scanned.append(path)
            text = path.read_bytes()
            if s3.secret_key.encode() in text or s3.access_key.encode() in text:
                leaked.append(posixpath.relpath(path, logs))
    # Ray names a worker's logs after its PID: worker-<id>-<job>-<pid>.out/.err, python-core-worker-<id>_<pid>.log.
    of_the_run = [p for p in scanned if p.stem.rsplit("-", 1)[-1].rsplit("_", 1)[-1] in pids]
    print(f"scanned {len(scanned)} Ray log files, {len(of_the_run)} of the run's actors; with credentials: {leaked}")
    assert of_the_run, f"no log file of the run's actors (PIDs {sorted(pids)}) among {len(scanned)}"
    assert not leaked
