"""Ray Train runs of the restorer: DDP on CPU (gloo) with data and checkpoints on the embedded S3, recovery from an
injected worker failure, and resuming a finished run by name."""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pytest
import torch

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


@pytest.fixture(scope="module")
def fmnist_shards(s3):
    from restoration.sources import FASHION_MNIST_DIR

    uri = s3.uri("train", "fmnist-test")
    data.ingest(FASHION_MNIST_DIR, uri, split="test")
    return uri


@pytest.mark.parametrize(
    ("kind", "overrides", "previews"),
    [
        (
            "dcgan",
            {"g_width": 16, "d_width": 16, "latent_dim": 32, "batch_size": 32, "eval_samples": 128},
            ["samples.png"],
        ),
        (
            "vae",
            {"width": 16, "latent_dim": 8, "batch_size": 64, "eval_images": 256, "prior_components": 4},
            ["samples.png", "reconstructions.png"],
        ),
    ],
)
def test_generator_loops_checkpoint_previews_and_export(s3, ray_cluster, fmnist_shards, kind, overrides, previews):
    runs = s3.uri("train", "gen-runs")
    config = resolve_config(kind, None, {**overrides, "epochs": 2, "steps_per_epoch": 10})
    report = run_training(kind, fmnist_shards, LaunchConfig(storage=runs, name=kind), config)
    assert report.epochs == [0, 1]
    loaded = load_model(storage.read_bytes(report.model_path), expected_kind=kind)
    images = loaded.module.sample(4, generator=torch.Generator().manual_seed(0))
    assert tuple(images.shape) == (4, 1, 28, 28) and float(images.min()) >= 0 and float(images.max()) <= 1
    if kind == "vae":  # the sampling prior was fitted to the checkpoint's posterior before the model file was written
        assert loaded.config.prior_components == 4 and loaded.meta["prior"]["components"] == 4
        assert not torch.equal(loaded.module.prior_means, torch.zeros(4, 8))
    # Every checkpoint carries its preview grids next to the state and the model file.
    folders = {posixpath.dirname(i.path) for i in storage.list_files(storage.join(runs, kind))}
    checkpoints = {f for f in folders if posixpath.basename(f).startswith("checkpoint_")}
    assert checkpoints
    for name in checkpoints:
        files = {posixpath.basename(i.path) for i in storage.list_files("s3://" + name)}
        assert {"state.pt", "model.pt", *previews} <= files


def test_bf16_mixed_degradations_fine_tune_from_a_model_file(s3, ray_cluster, train_shards, tmp_path):
    runs = s3.uri("train", "runs")
    launch = LaunchConfig(storage=runs, name="base", workers=1, num_to_keep=None)
    tiny = {**TINY, "batch_norm": False}  # BN statistics would move even at a vanishing learning rate
    base = run_training("restorer", train_shards, launch, resolve_config("restorer", None, {**tiny, "epochs": 2}))
    start = tmp_path / "base.pt"
    start.write_bytes(storage.read_bytes(base.model_path))
    base_psnr = load_model(start).meta["metrics"]["val_psnr"]  # the exported (best) epoch's

    # Fine-tune under bf16 autocast with blur/noise/JPEG patches, starting from the base model's weights: with a
    # vanishing learning rate the weights stay where init_from put them, so validation starts where the base ended.
    overrides = {**tiny, "epochs": 1, "precision": "bf16", "jpeg_p": 0.5, "blur_p": 0.3, "noise_p": 0.7}
    config = resolve_config("restorer", None, {**overrides, "init_from": str(start), "lr": 1e-9})
    tuned = run_training("restorer", train_shards, LaunchConfig(storage=runs, name="tuned", workers=1), config)
    assert np.isfinite(tuned.history[0]["loss"])
    assert abs(tuned.history[0]["val_psnr"] - base_psnr) < 0.05
    # The exported weights are the base model's (a fresh start would have He-initialised ones).
    tuned_state = load_model(storage.read_bytes(tuned.model_path)).module.state_dict()
    base_state = load_model(start).module.state_dict()
    assert max((tuned_state[k] - v).abs().max().item() for k, v in base_state.items()) < 1e-6


def test_workers_that_leave_no_cpu_for_the_parquet_listing_are_refused(s3, ray_cluster, fmnist_shards):
    """Reading Parquet begins with Ray Data's file listing, a task that takes a whole CPU: 1.5 of the test cluster's
    2 CPUs for the worker would leave it waiting forever, so the launch refuses before anything runs."""
    runs = s3.uri("train", "refused-runs")
    config = resolve_config("dcgan", None, {"g_width": 8, "d_width": 8, "epochs": 1, "steps_per_epoch": 1})
    launch = LaunchConfig(storage=runs, name="too-wide", cpus_per_worker=1.5)
    with pytest.raises(
        ValueError, match=r"--cpus-per-worker 1.5 .* \(1 needed, the cluster has 2\); expected at most 1"
    ):
        run_training("dcgan", fmnist_shards, launch, config)
    assert not storage.exists(storage.join(runs, "too-wide", "config.json"))  # refused before the run was set up
