"""Running on a real multi-node Ray cluster.

`cluster.yaml` is checked with Ray's own cluster-launcher validation and `jobs/runtime_env.yaml` with Ray's runtime-env
parsing (fast). The slow tests start a real two-node Ray cluster on this machine (scripts/local_cluster.py: two
`ray start` nodes on loopback, custom resources `node_a` / `node_b`) and submit the entry points in `jobs/` with the
real `ray job submit` CLI, S3 settings passed as the job's runtime env, against the embedded S3 server. Work on both
nodes is read back from Ray's state API (`ray list tasks` / `ray list actors`).

Two Ray Data settings travel in the jobs' runtime env, for tiny inputs on a small machine only:
`RAY_DATA_USE_DATASOURCE_V2=0` reads each Parquet shard as its own block (the V2 reader packs a few small files into
one block, so a single restorer actor would get every image; it also starts dozens of footer-reader actors, which
cost minutes on 2 cores) and `RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S` holds the first batch until both restorer
actors are up, so the first one to start does not take every block.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import secrets
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
JOB_TIMEOUT_S = 900  # one job on a loaded 2-core machine; about a minute when it is idle


def _local_cluster_module():
    spec = importlib.util.spec_from_file_location("local_cluster", REPO / "scripts" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- configs (fast)
def test_cluster_yaml_passes_ray_schema_validation():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    # What `ray up` does before it talks to AWS: merge the provider defaults, then validate against ray-schema.json.
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)

    nodes = config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    assert nodes[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpus = sorted(node["resources"].get("GPU", 0) for name, node in nodes.items() if name != config["head_node_type"])
    assert gpus[0] == 1 and gpus[-1] > 1, f"want a single-GPU and a multi-GPU worker type, got GPUs {gpus}"
    for name, node in nodes.items():
        assert node["min_workers"] <= node["max_workers"], name
    assert sum(node["max_workers"] for node in nodes.values()) >= config["max_workers"] > 0
    assert config["idle_timeout_minutes"] > 0
    assert any("pip install" in c and "restoration" in c for c in raw["setup_commands"])
    assert "AWS_REGION" in " ".join(raw["docker"]["run_options"])
    text = (REPO / "cluster.yaml").read_text()
    assert "EDIT" in text
    # No credentials: neither an access key id nor anything that looks like a secret's value.
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)secret[a-z_]*\s*[=:]\s*['\"]?[A-Za-z0-9/+]{20,}", text)

    # The validator is the real one: a misspelt field is refused.
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_1x"]["min_worker"] = 1
    with pytest.raises(ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


def test_runtime_env_yaml_pins_the_project_and_ships_only_the_jobs(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    # What `ray job submit --runtime-env jobs/runtime_env.yaml` reads, checked the way Ray checks it.
    env = RuntimeEnv(**parse_runtime_env_args(runtime_env=str(REPO / "jobs" / "runtime_env.yaml")))
    (package,) = env["pip"]["packages"]
    assert package.startswith("restoration @ ") and "0.1.0" in package
    assert set(env["env_vars"]) <= {"AWS_REGION", "AWS_ENDPOINT_URL", "ARROW_DEFAULT_MEMORY_POOL"}, "no credentials"

    # The package Ray would upload: the entry points, not the checkout's `restoration` (that comes from the wheel).
    zipped = tmp_path / "working_dir.zip"
    create_package(str(REPO), zipped, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(zipped).namelist()
    assert {"jobs/restore.py", "jobs/train.py", "jobs/_entry.py"} <= set(names)
    assert not [n for n in names if n.startswith(("restoration/", "tests/"))]


# ----------------------------------------------------------------------------------------------- two-node cluster
@pytest.fixture(scope="module")
def cluster():
    """A real two-node Ray cluster on loopback; 3 logical CPUs per node, so that 2 training workers of 2 CPUs each
    cannot share a node and each node keeps a CPU for Ray Data's read tasks."""
    local_cluster = _local_cluster_module()
    with local_cluster.LocalCluster(cpus=3) as running:
        yield running


def _env(cluster) -> dict[str, str]:
    return {**os.environ, **cluster.client_env}


def _runtime_env(s3) -> str:
    env_vars = {**s3.env, "RAY_DATA_USE_DATASOURCE_V2": "0", "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}
    return json.dumps({"env_vars": env_vars})


def _submit(cluster, s3, submission_id: str, *job: str) -> subprocess.CompletedProcess:
    """`ray job submit` exactly as a user types it: waits, tails the logs, exits non-zero when the job fails."""
    args = [RAY, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id]
    args += ["--working-dir", str(REPO), "--runtime-env-json", _runtime_env(s3), "--", "python", *job]
    return subprocess.run(
        args, cwd=REPO, env=_env(cluster), capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False
    )


def _ray(cluster, *args: str) -> str:
    done = subprocess.run(
        [RAY, *args], cwd=REPO, env=_env(cluster), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"ray {' '.join(args)} failed: {done.stderr[-2000:]}"
    return done.stdout


def _jobs(cluster) -> list[dict]:
    return cluster.api("/api/jobs/")


def _job(cluster, submission_id: str) -> dict:
    """The job server's record of a job: status, message, job_id (the Ray job id its tasks carry), ..."""
    return cluster.api(f"/api/jobs/{submission_id}")


def _tasks(cluster, job_id: str) -> list[dict]:
    """Every task and actor task of a Ray job, from the state API (what `ray list tasks --filter job_id=...` shows)."""
    params = dict(limit=10000, detail="true", filter_keys="job_id", filter_predicates="=", filter_values=job_id)
    return cluster.api("/api/v0/tasks", timeout=120, **params)["data"]["result"]["result"]


def _per_node(cluster, tasks: list[dict], pattern: str) -> dict[str, int]:
    """Finished tasks whose whole name matches `pattern`, counted by node (named by the node's custom resource)."""
    resource_of = {node_id: resource for resource, node_id in cluster.node_ids().items()}
    finished = [t for t in tasks if t["state"] == "FINISHED" and re.fullmatch(pattern, t["name"])]
    counts = Counter(resource_of[t["node_id"]] for t in finished)
    return dict(sorted(counts.items()))


def _failure(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-6000:]}\n--- stderr\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def set12_shards(s3, set12) -> str:
    """Set12 as small input shards (one or two images each) on the embedded S3 (written here, in-process, so that the restore and training
    tests do not depend on the ingest job, which has its own test)."""
    from restoration.data import ingest

    uri = s3.uri("cluster", "set12")
    report = ingest(str(set12), uri, shard_mb=0.1, executor="local")
    assert report.rows == 12 and len(report.shards) > 2 and not report.errors
    return uri


@pytest.fixture(scope="module")
def restore_job(cluster, s3, set12_shards, tmp_path_factory) -> dict:
    """One restore job (an untrained small model, so that inference is cheap), shared by the tests that inspect it."""
    import torch

    from restoration.checkpoint import save_model
    from restoration.models.restorer import Restorer, RestorerConfig
    from restoration.storage import write_bytes

    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    # Wide enough that an actor is still busy when the next block arrives: Ray Data's actor pool prefers the actor on
    # the block's node, so with a model faster than the blocks come, one node's actor restored every batch.
    torch.manual_seed(0)
    model = Restorer(RestorerConfig(depth=6, width=32))
    save_model(path, "restorer", model.config, model)
    model_uri = s3.uri("cluster", "models", "tiny.pt")
    write_bytes(model_uri, path.read_bytes())

    submission_id = f"restore-{secrets.token_hex(4)}"
    out = s3.uri("cluster", "restored")
    args = ["jobs/restore.py", set12_shards, out, "--model", model_uri, "--degrade", "noise:25"]
    args += ["--run-id", submission_id, "--workers", "2", "--batch-size", "1"]
    done = _submit(cluster, s3, submission_id, *args)
    return {"id": submission_id, "done": done, "out": f"{out}/run_id={submission_id}"}


@pytest.mark.slow
def test_two_nodes_on_loopback_with_their_own_resources(cluster):
    nodes = [n for n in cluster.nodes() if n["state"] == "ALIVE"]
    assert len(nodes) == 2
    assert {n["node_ip"] for n in nodes} == {"127.0.0.2"}
    assert sorted(cluster.node_ids()) == ["node_a", "node_b"]
    assert cluster.dashboard_url.startswith("http://127.0.0.1:")


@pytest.mark.slow
def test_restore_job_succeeds_with_every_row_and_runs_on_both_nodes(cluster, restore_job):
    from restoration import storage
    from restoration.runs import read_output

    done = restore_job["done"]
    assert done.returncode == 0, _failure(done)
    job = _job(cluster, restore_job["id"])
    assert job["status"] == "SUCCEEDED"
    # The job prints its summary and where the output is.
    assert "restored 12 ok, 0 errors of 12 rows" in done.stdout and f"-> {restore_job['out']}" in done.stdout

    table = read_output(restore_job["out"], ["key", "image", "error"])
    assert table.num_rows == 12 and len(set(table.column("key").to_pylist())) == 12
    assert table.column("error").null_count == 12 and table.column("image").null_count == 0
    manifest = json.loads(storage.read_bytes(storage.join(restore_job["out"], "_manifest.json")))
    assert manifest["rows_in"] == manifest["rows_out"] == 12 and manifest["config"]["workers"] == 2

    # Both restorer actors restored images: batches ran on each node.
    # Ray Data names the actor pool's batches "MapWorker(MapBatches(decode_batch)->MapBatches(RestoreActor)).submit".
    per_node = _per_node(cluster, _tasks(cluster, job["job_id"]), r"MapWorker\(.*RestoreActor\)\)\.submit")
    print(f"restore job {restore_job['id']} ({job['job_id']}): restorer batches per node {per_node}")
    assert set(per_node) == {"node_a", "node_b"}, per_node
    assert sum(per_node.values()) >= 2


@pytest.mark.slow
def test_the_same_submission_id_is_refused_and_runs_nothing(cluster, s3, restore_job):
    from restoration import storage

    assert restore_job["done"].returncode == 0, _failure(restore_job["done"])
    manifest = storage.read_bytes(storage.join(restore_job["out"], "_manifest.json"))
    again = _submit(cluster, s3, restore_job["id"], "jobs/restore.py", "s3://x/in", "s3://x/out")
    assert again.returncode != 0
    assert f"Job with submission_id {restore_job['id']} already exists" in again.stdout + again.stderr
    assert [j["submission_id"] for j in _jobs(cluster)].count(restore_job["id"]) == 1
    assert _job(cluster, restore_job["id"])["status"] == "SUCCEEDED"
    assert storage.read_bytes(storage.join(restore_job["out"], "_manifest.json")) == manifest


@pytest.mark.slow
def test_training_job_puts_one_worker_on_each_node(cluster, s3, set12_shards):
    from restoration import storage
    from restoration.checkpoint import load_model

    submission_id = f"train-{secrets.token_hex(4)}"
    storage_uri = s3.uri("cluster", "runs")
    tiny = ["depth=3", "width=8", "steps_per_epoch=3", "batch_size=4", "patch_size=32", "val_max_side=64"]
    args = ["jobs/train.py", "restorer", "--data", set12_shards, "--val", set12_shards, "--storage", storage_uri]
    args += ["--name", submission_id, "--workers", "2", "--cpus-per-worker", "2", "--epochs", "1"]
    args += [arg for field in tiny for arg in ("--set", field)]
    done = _submit(cluster, s3, submission_id, *args)
    assert done.returncode == 0, _failure(done)
    job = _job(cluster, submission_id)
    assert job["status"] == "SUCCEEDED"
    model_uri = storage.join(storage_uri, submission_id, "model.pt")
    assert f"trained restorer run '{submission_id}'" in done.stdout and f"model: {model_uri}" in done.stdout

    loaded = load_model(storage.read_bytes(model_uri), expected_kind="restorer")
    assert (loaded.config.depth, loaded.config.width) == (3, 8)

    # Two DDP workers, 2 CPUs each on 3-CPU nodes: one on each node, and both ran the training loop.
    per_node = _per_node(cluster, _tasks(cluster, job["job_id"]), r"RayTrainWorker\.run_train_fn")
    print(f"train job {submission_id} ({job['job_id']}): training loops per node {per_node}")
    assert per_node == {"node_a": 1, "node_b": 1}


@pytest.mark.slow
def test_a_bad_input_uri_fails_the_job_with_one_clear_line(cluster, s3):
    submission_id = f"bad-{secrets.token_hex(4)}"
    missing = s3.uri("cluster", "no-such-prefix")
    done = _submit(cluster, s3, submission_id, "jobs/restore.py", missing, s3.uri("cluster", "bad-out"))
    assert done.returncode != 0
    job = _job(cluster, submission_id)
    assert job["status"] == "FAILED" and "exit code 2" in job["message"]
    logs = _ray(cluster, "job", "logs", "--address", cluster.dashboard_url, submission_id)
    errors = [line for line in logs.splitlines() if line.startswith("restoration: error:")]
    assert errors == [f"restoration: error: input not found: {missing}"], logs
    assert "Traceback" not in logs


@pytest.mark.slow
def test_ingest_job_writes_shards(cluster, s3, set12):
    import pyarrow.parquet as pq

    from restoration import storage

    submission_id = f"ingest-{secrets.token_hex(4)}"
    dest = s3.uri("cluster", "ingested")
    # The nodes run on this machine, so a local folder is a valid source for them too.
    done = _submit(cluster, s3, submission_id, "jobs/ingest.py", str(set12), dest, "--shard-mb", "0.5")
    assert done.returncode == 0, _failure(done)
    assert _job(cluster, submission_id)["status"] == "SUCCEEDED"
    assert "ingested 12 images" in done.stdout and f"at {dest}" in done.stdout
    fs, _ = storage.resolve(dest)
    files = [i.path for i in storage.list_files(dest) if i.path.endswith(".parquet") and "/_" not in i.path]
    assert files and sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files) == 12
    assert storage.exists(storage.join(dest, "_manifest.json"))


def _run_files(run: str) -> dict[str, tuple]:
    """Every object of a run folder: path -> (size, modification time, bytes)."""
    from restoration import storage

    return {i.path: (i.size, i.mtime, storage.read_bytes("s3://" + i.path)) for i in storage.list_files(run)}


def _samples(run: str) -> dict[int, bytes]:
    from restoration.runs import read_output

    return {r["index"]: r["image"] for r in read_output(run, ["index", "image"]).to_pylist()}


@pytest.mark.slow
def test_synthesis_jobs_and_a_scheduled_rerun_that_changes_nothing(cluster, s3):
    import json

    from restoration import storage

    out = s3.uri("cluster", "generated")
    submission_id = f"synth-{secrets.token_hex(4)}"
    common = ["--model", "dcgan-fmnist", "--count", "16", "--seed", "7", "--out", out]
    done = _submit(cluster, s3, submission_id, "jobs/synthesize.py", *common, "--run-id", "bulk", "--workers", "2")
    assert done.returncode == 0, _failure(done)
    assert _job(cluster, submission_id)["status"] == "SUCCEEDED"
    bulk = _samples(storage.join(out, "run_id=bulk"))
    assert sorted(bulk) == list(range(16)) and len(set(bulk.values())) == 16

    # The scheduled job, twice under the same run id (a daily schedule firing again): the first writes the run, the
    # second finds it complete and leaves every object as it was.
    daily = storage.join(out, "run_id=daily")
    runs = []
    for attempt in range(2):
        submission_id = f"daily-{attempt}-{secrets.token_hex(4)}"
        args = ["jobs/scheduled_generation.py", *common, "--run-id", "daily", "--workers", "1"]
        done = _submit(cluster, s3, submission_id, *args)
        assert done.returncode == 0, _failure(done)
        assert _job(cluster, submission_id)["status"] == "SUCCEEDED"
        runs.append(_run_files(daily))
    assert runs[0] == runs[1]
    manifest = json.loads(storage.read_bytes(storage.join(daily, "_manifest.json")))
    assert manifest["complete"] and manifest["rows_out"] == 16 and manifest["config"]["resume"]
    # One actor on one node gave the same PNGs, byte for byte, as two actors on two nodes.
    assert _samples(daily) == bulk
