"""Ray Train runs of the restorer: DDP on CPU (gloo) with data and checkpoints on the embedded S3, recovery from an
injected worker failure, and resuming a finished run by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from restoration import data, storage
from restoration.checkpoint import load_model
from restoration.cli import main
from restoration.train.launcher import LaunchConfig
from restoration.train.run import resolve_config, run_training

pytestmark = pytest.mark.slow

TINY = {"depth": 4, "width": 16, "patch_size": 32, "batch_size": 8, "steps_per_epoch": 8, "val_max_side": 96}


@pytest.fixture(scope="module")
def train_shards(s3, train400):
    uri = s3.uri("train", "train400")
    data.ingest(str(train400), uri, shard_mb=2)  # several shards, so two workers each get some
    return uri


def test_two_worker_ddp_on_s3_survives_a_failure_and_resumes_by_name(s3, ray_cluster, train_shards):
    runs = s3.uri("train", "runs")
    config = resolve_config("restorer", None, {**TINY, "epochs": 3, "fail_at_epoch": 1})
    launch = LaunchConfig(storage=runs, name="ddp", workers=2, max_failures=1, num_to_keep=None)
    report = run_training("restorer", train_shards, launch, config)

    # Epoch 1 raised once; FailureConfig restarted the worker group from the epoch-0 checkpoint, not from scratch.
    assert report.epochs == [0, 1, 2]
    assert [m["started_from_epoch"] for m in report.history] == [0, 1, 1]
    # The exported model file is on S3 and loads as a restorer that the pipelines can use.
    loaded = load_model(storage.read_bytes(report.model_path), expected_kind="restorer")
    assert loaded.sha256 == report.model_sha256 and loaded.meta["metrics"]["epoch"] in (0, 1, 2)
    assert np.isfinite(loaded.meta["metrics"]["val_psnr"])
    saved = json.loads(storage.read_bytes(storage.join(runs, "ddp", "config.json")))
    assert saved["kind"] == "restorer" and saved["epochs"] == 3

    # Starting the finished run again with more epochs continues from its last checkpoint.
    more = resolve_config("restorer", None, {**TINY, "epochs": 4})
    again = run_training("restorer", train_shards, launch, more)
    assert again.epochs == [0, 1, 2, 3]
    assert again.history[-1]["started_from_epoch"] == 3


def test_train_cli_dry_run_and_bad_arguments(capsys):
    args = ["train", "restorer", "--data", "x", "--storage", "/tmp/runs", "--preset", "restorer-dncnn-cpu"]
    assert main([*args, "--dry-run", "--set", "sigma=15", "--epochs", "2"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (
        resolved["config"]["sigma"] == 15
        and resolved["config"]["epochs"] == 2
        and resolved["name"] == "restorer-dncnn-cpu"
    )
    assert main([*args, "--dry-run", "--set", "nope=1"]) == 2
    assert "unknown field" in capsys.readouterr().err
    assert main(["train", "restorer", "--data", "x", "--storage", "y", "--preset", "bogus", "--dry-run"]) == 2
    assert "unknown preset 'bogus'" in capsys.readouterr().err
    assert main(["train", "restorer", "--data", "x", "--storage", "y", "--set", "depth=1", "--dry-run"]) == 2
    assert "depth" in capsys.readouterr().err
