"""The GPU kit (scripts/device/): its parts, the full-size stages' configs, and a CPU dry run of run.sh that checks
what it leaves for the device tool to bring back (at most 8 files of at most 16 MiB, kit.json, loadable models)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from restoration.bench.throughput import ThroughputConfig
from restoration.checkpoint import load_model
from restoration.sources import datasets_dir
from restoration.train import resolve_config
from restoration.train.restorer import RestorerTrainConfig, init_weights
from restoration.train.worker import plan_epochs

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "scripts" / "device" / "run.sh"
SHARED_LIVE1 = datasets_dir() / "LIVE1"


def _load_kit():
    spec = importlib.util.spec_from_file_location("device_kit", REPO / "scripts" / "device" / "kit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


kit = _load_kit()


# --------------------------------------------------------------------------------------------- parts, no Ray
def test_time_budget_plans_the_epochs_that_fit_at_the_last_pace():
    cfg = RestorerTrainConfig(depth=3, width=8, epochs=20, time_budget_s=100.0)
    assert plan_epochs(cfg, 1, elapsed_s=10.0, epoch_s=10.0) == 10  # 90 s left: 9 more
    assert plan_epochs(cfg, 5, elapsed_s=30.0, epoch_s=2.0) == 20  # 35 would fit; the config's 20 is the cap
    assert plan_epochs(cfg, 3, elapsed_s=99.0, epoch_s=5.0) == 3  # spent: stop after the epochs done
    assert plan_epochs(cfg, 3, elapsed_s=130.0, epoch_s=5.0) == 3
    assert plan_epochs(RestorerTrainConfig(depth=3, width=8, epochs=7), 1, 1e6, 1e6) == 7  # no budget: the epochs
    with pytest.raises(ValueError, match="time_budget_s must be > 0 seconds or None, got 0"):
        RestorerTrainConfig(time_budget_s=0)


def _plan_on_rank(rank: int, init_file: str, results: str) -> None:
    import torch.distributed as dist

    from restoration.train.worker import from_rank0

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        Path(results, f"rank{rank}").write_text(json.dumps(from_rank0({"planned": 10 + rank})))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_follows_rank_0s_plan(tmp_path):
    """Two DDP ranks whose clocks disagree must still stop after the same epoch: both take rank 0's plan."""
    import torch.multiprocessing as mp

    from restoration.train.worker import from_rank0

    assert from_rank0(7) == 7  # no process group (one worker, or no Ray): the value itself
    mp.spawn(_plan_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)] == [{"planned": 10}] * 2


def test_throughput_runs_on_a_local_folder_instead_of_s3():
    assert ThroughputConfig(local="/tmp/bench", naive_count=3).local == "/tmp/bench"
    with pytest.raises(ValueError, match="--local takes a local folder and excludes --store"):
        ThroughputConfig(local="/tmp/bench", store="s3://bucket/x")
    with pytest.raises(ValueError, match="--local takes a local folder"):
        ThroughputConfig(local="s3://bucket/x")
    with pytest.raises(ValueError, match="--naive-count must be >= 1, got 0"):
        ThroughputConfig(naive_count=0)


def test_without_ray_the_throughput_stage_times_the_raw_loop_alone(tmp_path):
    Image.fromarray(skimage.data.camera()).save(tmp_path / "camera.png")
    config = dict(only=["restore"], images=str(tmp_path), count=4, size=32, batch_size=2, min_model_seconds=0.0)
    result = kit.bench_restore({"config": config, "ray": False})
    raw = result["summary"]["raw"]
    assert raw["images"] == 4 and raw["mp_per_s"] > 0 and result["summary"]["model"] == "denoise-gray"
    assert "Ray did not start" in result["note"]


def test_every_full_size_stage_resolves_and_its_start_weights_fit():
    for stage in kit.TRAIN_STAGES:
        cfg = resolve_config("restorer", stage.preset, {**stage.overrides, "time_budget_s": 60.0})
        assert cfg.epochs * cfg.steps_per_epoch == resolve_config("restorer", stage.preset, {}).epochs * (
            resolve_config("restorer", stage.preset, {}).steps_per_epoch
        ), f"{stage.name}: the preset's step count is the cap"
        if cfg.init_from:
            init_weights(cfg.init_from, cfg.model_config())  # raises when the architecture does not match
    names = {stage.name for stage in kit.TRAIN_STAGES}
    assert {"denoise-gray-gpu", "denoise-color", "restore-gray", "restore-color"} <= names
    assert len(names) + 3 <= kit.MAX_FILES  # the models, kit.json, kit.log and throughput.md come back together


def test_datasets_pack_within_a_budget_and_unpack_pixel_for_pixel(tmp_path):
    source = tmp_path / "source"
    for name in ("Train400", "Set12", "LIVE1"):
        (source / name).mkdir(parents=True)
    gray = skimage.data.camera()[:64, :64]
    Image.fromarray(gray).save(source / "Train400" / "a.png")
    Image.fromarray(gray).save(source / "Set12" / "b.png")
    colour = [skimage.data.astronaut()[:96, :80], skimage.data.chelsea()[:96, :80]]
    for i, pixels in enumerate(colour):
        Image.fromarray(pixels).save(source / "LIVE1" / f"{i}.bmp")
    everything = kit.pack_datasets(source, tmp_path / "everything", budget_bytes=2**30)
    assert everything["folders"]["LIVE1"]["files"] == 2 and not everything["left_out"]
    first_webp = (tmp_path / "everything" / "LIVE1" / "0.bmp.webp").stat().st_size
    room = sum(p.stat().st_size for p in source.rglob("*.png")) + first_webp  # the PNGs and one WebP
    report = kit.pack_datasets(source, tmp_path / "packed", budget_bytes=room)
    assert report["folders"]["LIVE1"]["files"] == 1 and report["left_out"] == ["1.bmp"] and report["bytes"] == room

    restored = tmp_path / "restored"
    assert kit.prepare_datasets(tmp_path / "packed", restored) == {
        "folders": {"LIVE1": 1, "Set12": 1, "Train400": 1},
        "problems": [],
    }
    bmp = restored / "LIVE1" / "0.bmp"
    assert Image.open(bmp).format == "BMP"
    np.testing.assert_array_equal(np.asarray(Image.open(bmp)), colour[0])
    np.testing.assert_array_equal(np.asarray(Image.open(restored / "Train400" / "a.png")), gray)
    with pytest.raises(ValueError, match="Train400 does not fit"):
        kit.pack_datasets(source, tmp_path / "small", budget_bytes=100)


# ------------------------------------------------------------------------------------------------ the dry run
@pytest.fixture(scope="module")
def kit_datasets(tmp_path_factory, train400, set12) -> Path:
    """Train400 and Set12 (or their stand-ins), and three LIVE1 photos (or scikit-image's) packed as the kit packs
    them: lossless WebP under the BMP's name."""
    root = tmp_path_factory.mktemp("kit-datasets")
    (root / "Train400").symlink_to(train400)
    (root / "Set12").symlink_to(set12)
    live1 = root / "LIVE1"
    live1.mkdir()
    if SHARED_LIVE1.is_dir():
        photos = {p.name: Image.open(p) for p in sorted(SHARED_LIVE1.glob("*.bmp"))[:3]}
    else:
        photos = {f"{n}.bmp": Image.fromarray(getattr(skimage.data, n)()) for n in ("astronaut", "chelsea", "coffee")}
    for name, image in photos.items():
        image.save(live1 / f"{name}.webp", lossless=True, quality=100, method=0)
    return root


@pytest.mark.slow
def test_dry_run_of_run_sh_leaves_what_the_device_tool_brings_back(kit_datasets, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # Two seconds of training per model: a few epochs of the dry run's tiny batches (each well under a second), enough
    # for the budget to plan, cut and anneal them. One model through Ray Train, the others through the loop without
    # Ray: both runners.
    budget = 2.0
    args = ["--datasets", str(kit_datasets), "--work", str(work), "--budget-s", str(budget)]
    args += ["--without-ray", "denoise-color,restore-gray,restore-color"]
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(RUN_SH), "--dry-run", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # What comes back: at most 8 files of at most 16 MiB each, flat.
    files = sorted(out.iterdir())
    names = [p.name for p in files]
    assert len(files) <= 8 and all(p.is_file() and p.stat().st_size <= 16 * 2**20 for p in files), names
    models = [f"{s.name}.pt" for s in kit.TRAIN_STAGES]
    assert set(names) == {"kit.json", "kit.log", "throughput.md", *models}, names

    summary = json.loads((out / "kit.json").read_text())
    assert summary["kit"]["dry_run"] is True and summary["kit"]["environment"]["gpu"] is None
    assert summary["files"] == names
    stages = {s["name"]: s for s in summary["stages"]}
    assert {name: s["status"] for name, s in stages.items()} == dict.fromkeys(
        ["datasets", "ray", "throughput", *(s.name for s in kit.TRAIN_STAGES)], "ok"
    ), {name: s.get("error") for name, s in stages.items()}
    assert stages["datasets"]["folders"]["LIVE1"] == 3
    assert stages["ray"]["resources"]["CPU"] >= 1

    # The throughput stage ran the pipeline on local folders, every image once, beside the raw loop.
    bench = stages["throughput"]["summary"]
    assert bench["every_key_once"] and bench["errors"] == 0 and bench["images"] == kit.DRY_BENCH["count"]
    assert bench["raw_mp_per_s"] > 0 and bench["pipeline_end_to_end_mp_per_s"] > 0 and bench["naive_mp_per_s"] > 0
    assert stages["throughput"]["config"]["local"].startswith(str(work))

    # Each model: its runner, its budget, its curve, and a model file that loads as the preset's model.
    for stage in kit.TRAIN_STAGES:
        record = stages[stage.name]
        assert record["runner"] == ("ray-train" if stage.name == "denoise-gray-gpu" else "plain-pytorch")
        assert record["overrides"]["time_budget_s"] == budget
        history = record["history"]
        assert history and all("planned_epochs" in h for h in history)
        # Each epoch after the first starts only when, at the pace of the one before, it fits in what is left of the
        # budget; the plan decides on times it measured, so this holds at any speed (the last epoch may overrun).
        seconds = [h["epoch_seconds"] for h in history]
        assert len(seconds) == 1 or sum(seconds[:-1]) + seconds[-2] <= budget, (seconds, budget)
        loaded = load_model(out / record["model_file"], expected_kind="restorer")
        assert loaded.config == resolve_config("restorer", stage.preset, {}).model_config()
        assert loaded.meta["train_config"]["time_budget_s"] == budget
    assert stages["restore-color"]["overrides"]["init_from"] == stages["denoise-color"]["model_path"]
    assert "===== " in (out / "kit.log").read_text()
