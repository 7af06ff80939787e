"""The shared Ray Train launcher: one `TorchTrainer` for every model family.

A run lives at `STORAGE/NAME/` (local folder or S3 prefix): Ray Train's checkpoints (each holds `state.pt` with the
model, optimizers, EMA and epoch, and `model.pt`, the exported model file), `config.json` (the resolved config),
and, when the run ends, `model.pt`: the best checkpoint's model file, which the pipelines load by path. Starting the
same NAME again resumes from its latest checkpoint; a finished run just exports again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from restoration import storage


@dataclass(frozen=True)
class LaunchConfig:
    """How a training run is placed on the cluster (the model's own options live in its train config)."""

    storage: str  # local folder or s3://bucket/prefix holding the run
    name: str  # run name: the same name resumes
    workers: int = 1
    gpu: bool | None = None  # None: GPUs when the cluster has them
    cpus_per_worker: float | None = None  # default: leaves a core for Ray Data on small machines
    max_failures: int = 2
    num_to_keep: int | None = 3

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if not self.name or "/" in self.name:
            raise ValueError(f"--name must be a plain name without '/', got {self.name!r}")
        if self.max_failures < 0:
            raise ValueError(f"--max-failures must be >= 0, got {self.max_failures}")


@dataclass
class TrainReport:
    kind: str
    name: str
    model_path: str
    model_sha256: str
    metrics: dict
    history: list[dict]  # the metrics of every kept checkpoint, by epoch (all of them when num_to_keep is None)
    seconds: float

    @property
    def epochs(self) -> list[int]:
        return [int(m["epoch"]) for m in self.history]

    def summary(self) -> str:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items() if isinstance(v, float))
        best = self.metrics.get("epoch")
        return (
            f"trained {self.kind} run {self.name!r} in {self.seconds:.0f} s; best checkpoint: epoch {best} ({shown}); "
            f"model: {self.model_path}"
        )


# ----------------------------------------------------------------------------------------------- worker helpers
def world() -> tuple[int, int]:
    """(rank, world size) of this training worker."""
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def setup_worker(config: dict, config_cls: type) -> tuple[Any, int, int]:
    """Build a worker's train config from `train_loop_config` and size its torch threads.

    Returns:
        (train config, rank, world size).
    """
    config = dict(config)
    torch.set_num_threads(threads_for(config.pop("cpus_per_worker", 1)))
    return config_cls(**config), *world()


def shard_batches(name: str, batch_size: int):
    """This worker's share of dataset `name` (all of it for unsplit datasets), as pyarrow batches."""
    import ray.train

    return ray.train.get_dataset_shard(name).iter_batches(batch_format="pyarrow", batch_size=batch_size)


def validation_batches(batch_size: int):
    """The validation images as pyarrow batches on rank 0, which alone validates; none on the other ranks. The
    validation set is not split, so every worker that iterates it reads all of it."""
    rank, _ = world()
    return shard_batches("val", batch_size) if rank == 0 else iter(())


def from_rank0(value: Any) -> Any:
    """`value` as rank 0 holds it, on every rank: a broadcast when the run has several workers (a decision that
    every rank must take alike, such as when to stop), `value` itself otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resume(stateful: dict[str, Any]) -> int:
    """Load the checkpoint this attempt starts from (if any) into models/optimizers by their state.pt keys.

    Args:
        stateful: state.pt key -> object with `load_state_dict` (model, optimizers, EMA copy).

    Returns:
        The epoch to start from: 0 for a fresh run, else the checkpoint's epoch + 1.
    """
    state = restore_state()
    if state is None:
        return 0
    for key, obj in stateful.items():
        obj.load_state_dict(state[key])
    return int(state["epoch"]) + 1


def restore_state() -> dict | None:
    """The `state.pt` of the checkpoint this attempt starts from (a resumed run or a restarted worker group)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)


def report_epoch(metrics: dict, state: dict | None, write_files: Callable[[Path], None] | None = None) -> None:
    """Report one epoch; rank 0 also hands Ray Train a checkpoint (state.pt plus what `write_files` adds).

    Args:
        metrics: the epoch's metrics (the same keys on every rank).
        state: rank 0's resumable state (tensors and primitives only: it is loaded with weights_only=True); None on
            the other ranks.
        write_files: writes the exported model file (model.pt) and any previews into the checkpoint folder.
    """
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / "state.pt")
        if write_files is not None:
            write_files(Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def load_image_tensor(batches, channels: int) -> torch.Tensor:
    """Decode the `image` column of pyarrow batches into one uint8 tensor (N, C, H, W) of same-size images
    (Fashion-MNIST style data); rows that do not decode or have another size are left out (ingest reported them)."""
    from restoration import codec

    arrays, shape = [], None
    for batch in batches:
        for data in batch.column("image").to_pylist():
            try:
                pixels = codec.to_uint(codec.decode(data).pixels, 8)  # (H, W, C) uint8
            except codec.DecodeError:
                continue
            if pixels.shape[2] != channels:
                pixels = (
                    np.repeat(pixels, 3, axis=2)
                    if channels == 3
                    else pixels.mean(axis=2, keepdims=True).astype(np.uint8)
                )
            shape = shape or pixels.shape
            if pixels.shape == shape:
                arrays.append(pixels)
    if not arrays:
        raise ValueError("no decodable images in this worker's data shard")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def save_png(path: Path, grid: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(grid).save(path)


def maybe_fail(config: Any, epoch: int, start_epoch: int) -> None:
    """Fault injection for tests and drills: raise once, at `fail_at_epoch`, in an attempt that started from scratch."""
    if getattr(config, "fail_at_epoch", -1) == epoch and start_epoch == 0 and world()[0] == 0:
        raise RuntimeError(f"injected failure at epoch {epoch} (fail_at_epoch)")


def threads_for(cpus: float) -> int:
    """Torch threads for a worker holding `cpus` CPUs (a fraction rounds up: 1.5 CPUs -> 2 threads)."""
    return max(1, math.ceil(cpus))


# ----------------------------------------------------------------------------------------------- driver side
def launch(
    kind: str,
    loop: Callable[[dict], None],
    train_config: Any,
    launch_config: LaunchConfig,
    datasets: dict,
    split: list[str],
    free_cpus: float = 0.5,
) -> TrainReport:
    """Run `loop` under a TorchTrainer and export the best checkpoint's model file.

    Args:
        kind: model family ("restorer", "dcgan", "vae").
        loop: the `train_loop_per_worker`; receives `dataclasses.asdict(train_config)` plus `cpus_per_worker`.
        train_config: the family's frozen train config (written to STORAGE/NAME/config.json).
        launch_config: placement and storage.
        datasets: Ray Datasets by name; those in `split` are sharded across workers, the others seen whole.
        split: names of the datasets to shard.
        free_cpus: CPUs the datasets' reads need beside the workers (on CPU-only runs the workers may take the rest).

    Returns:
        A TrainReport; the model file is at STORAGE/NAME/model.pt.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 if launch_config.gpu is None else launch_config.gpu
    if use_gpu and gpus == 0:
        raise ValueError("--gpu was given but the Ray cluster has no GPUs")
    cpus = float(resources.get("CPU", 1))
    cpus_per_worker = launch_config.cpus_per_worker
    if cpus_per_worker is None:
        # Leave one core to Ray Data's read tasks so the workers' data never starves (2 workers on 2 cores: 0.5 each).
        cpus_per_worker = max(0.5, min(4.0, (cpus - 1) / launch_config.workers)) if not use_gpu else 2.0
    if not use_gpu and cpus_per_worker * launch_config.workers > cpus - free_cpus:
        # Ray Data's read tasks need their slots too; without them the run waits forever.
        raise ValueError(
            f"--cpus-per-worker {cpus_per_worker:g} x {launch_config.workers} worker(s) leaves too little CPU for"
            f" reading the data ({free_cpus:g} needed, the cluster has {cpus:g});"
            f" expected at most {(cpus - free_cpus) / launch_config.workers:g}"
        )
    run_uri = storage.join(launch_config.storage, launch_config.name)
    storage.ensure_bucket(launch_config.storage)
    config_json = json.dumps({"kind": kind, **dataclasses.asdict(train_config)}, indent=2, sort_keys=True)
    storage.write_bytes(storage.join(run_uri, "config.json"), config_json.encode())

    fs, root = storage.resolve(launch_config.storage)
    trainer = TorchTrainer(
        loop,
        train_loop_config={**dataclasses.asdict(train_config), "cpus_per_worker": cpus_per_worker},
        scaling_config=ray.train.ScalingConfig(
            num_workers=launch_config.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=launch_config.name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=launch_config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=launch_config.num_to_keep,
                checkpoint_score_attribute=train_config.score,
                checkpoint_score_order=train_config.score_order,
            ),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=split),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {launch_config.name!r} failed: {result.error}")
    best = result.get_best_checkpoint(train_config.score, train_config.score_order) or result.checkpoint
    if best is None:
        raise RuntimeError(f"training run {launch_config.name!r} left no checkpoint")
    with best.as_directory() as folder:
        model_bytes = (Path(folder) / "model.pt").read_bytes()
    model_uri = storage.join(run_uri, "model.pt")
    storage.write_bytes(model_uri, model_bytes)

    from restoration.checkpoint import load_model

    loaded = load_model(model_bytes, expected_kind=kind)
    history = sorted((dict(m) for _, m in (result.best_checkpoints or [])), key=lambda m: m["epoch"])
    return TrainReport(
        kind=kind,
        name=launch_config.name,
        model_path=model_uri,
        model_sha256=loaded.sha256,
        metrics={k: v for k, v in loaded.meta.get("metrics", {}).items()},
        history=history,
        seconds=time.perf_counter() - t0,
    )
