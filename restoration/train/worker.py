"""What runs inside a Ray Train worker: the steps every family's `train_loop_per_worker` shares.

Data (`shard_batches`, `validation_batches`, `image_tensors`, `epoch_batches`), checkpoints (`resume`, `report_epoch`),
decisions all ranks must take alike (`from_rank0`), the epoch's log line and fault injection. The driver side (configs,
datasets, the `TorchTrainer`) is `restoration.train.launcher`; the train configs' shared checks are here too, since
every worker builds its config again (`setup_worker`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from restoration.cluster import threads_for
from restoration.errors import UserError


def check_counts(config: Any, *names: str) -> None:
    """Raise UserError naming the first field of `names` in `config` that is below 1 (None passes: "unset")."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value!r}")


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


# ----------------------------------------------------------------------------------------------------------- data
def shard_batches(name: str, batch_size: int):
    """This worker's share of dataset `name` (all of it for unsplit datasets), as pyarrow batches."""
    import ray.train

    return ray.train.get_dataset_shard(name).iter_batches(batch_format="pyarrow", batch_size=batch_size)


def validation_batches(batch_size: int):
    """The validation images as pyarrow batches on rank 0, which alone validates; none on the other ranks. The
    validation set is not split, so every worker that iterates it reads all of it."""
    rank, _ = world()
    return shard_batches("val", batch_size) if rank == 0 else iter(())


def image_tensors(channels: int, val_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This worker's shard of the training images and, on rank 0, the first `val_limit` (default: all) validation
    images, decoded once and kept in memory (see `load_image_tensor`).

    Returns:
        (train, val): uint8 (N, C, H, W) tensors; val is None on the other ranks.
    """
    rank, _ = world()
    train = load_image_tensor(shard_batches("train", 1024), channels)
    val = load_image_tensor(validation_batches(1024), channels)[:val_limit] if rank == 0 else None
    return train, val


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


def epoch_batches(
    images: torch.Tensor, batch_size: int, steps: int, seed: tuple[int, ...], device: torch.device
) -> tuple[torch.Generator, Iterator[torch.Tensor]]:
    """One epoch's batches of in-memory images and a generator for the steps' own noise, both seeded by `seed`
    ((seed, rank, epoch)), so that a run resumed at an epoch boundary draws what an uninterrupted one would.

    Returns:
        (generator on `device`, `steps` batches (B, C, H, W) of `images` in a shuffled order that wraps around).
    """
    rng = np.random.default_rng(list(seed))
    noise = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
    order = torch.from_numpy(rng.permutation(len(images)))
    return noise, (images[order[(step * batch_size) % len(order) :][:batch_size]] for step in range(steps))


# ---------------------------------------------------------------------------------------------------- checkpoints
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


def epoch_metrics(
    logs: list[dict[str, float]], epoch: int, start_epoch: int, samples: int, seconds: float, prefix: str = "", **extra
) -> dict[str, float]:
    """An epoch's metrics: the mean of every per-step value in `logs` (keys prefixed with `prefix`), the epoch and
    the one this attempt started from, `extra`, then the speed (`samples` images in `seconds`, all workers)."""
    means = {f"{prefix}{k}": float(np.mean([log[k] for log in logs])) for k in logs[0]}
    speed = {"samples_per_s": samples / seconds, "epoch_seconds": seconds}
    return {**means, "epoch": epoch, "started_from_epoch": start_epoch, **extra, **speed}


def plan_epochs(cfg: Any, epochs_done: int, elapsed_s: float, epoch_s: float) -> int:
    """The epochs a run with a time budget does in all, planned again after every epoch.

    As many more epochs as fit in what is left of `cfg.time_budget_s` at the pace of the last one, never more than
    `cfg.epochs`. The learning-rate schedule runs over the planned epochs (the trainers' `train_epoch` take them), so
    a run that its budget cuts short still anneals to the end of its schedule.

    Args:
        cfg: the run's config; without a time budget the plan is `cfg.epochs`.
        epochs_done: the index of the next epoch.
        elapsed_s: seconds spent so far (decoding, training, validation and checkpoints).
        epoch_s: seconds the last epoch took, validation and checkpoint included.
    Returns:
        The planned number of epochs; `epochs_done` means stop now.
    """
    if cfg.time_budget_s is None:
        return cfg.epochs
    fits = int(max(0.0, cfg.time_budget_s - elapsed_s) // max(epoch_s, 1e-6))
    return max(epochs_done, min(cfg.epochs, epochs_done + fits))


def run_epochs(
    kind: str,
    cfg: Any,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    start_epoch: int,
    started: float,
    train: Callable[[int, int], list[dict[str, float]]],
    validate: Callable[[], dict[str, float]] | None,
    after_train: Callable[[int], None] | None = None,
) -> None:
    """The epoch loop of the image-to-image trainers (restorer, upscaler, inpainter, repairer), from `start_epoch`
    until `cfg.epochs` or the time budget's plan (`plan_epochs`, every rank following rank 0's clock).

    Each epoch: the injected failure, if due (`maybe_fail`); `train(epoch, planned)`, timed, returning its per-step
    logs ({"loss": ...} and any parts); `after_train(epoch)`, untimed (a restorer's BatchNorm re-estimation); then on
    rank 0 `validate()` (metrics named `val_*`; None: no validation images) and the log line; every rank reports
    (`epoch_metrics`, plus `lr` and `planned_epochs`), rank 0 with a checkpoint: the state to resume from and
    `model.pt`, the exported model file of kind `kind`.

    Args:
        kind: the model kind, as `save_model` writes it.
        cfg: the run's config (epochs, steps_per_epoch, batch_size, time_budget_s; written into each model file).
        net: the unwrapped model; optimizer: its optimizer.
        start_epoch: the epoch this attempt starts at (`resume`); started: `time.perf_counter()` at the loop's start.
    """
    import dataclasses

    from restoration.checkpoint import save_model

    rank, world_size = world()
    planned = cfg.epochs
    for epoch in range(start_epoch, cfg.epochs):
        if epoch >= planned:
            break
        maybe_fail(cfg, epoch, start_epoch)
        t0 = time.perf_counter()
        logs = train(epoch, planned)
        seconds = time.perf_counter() - t0
        if after_train is not None:
            after_train(epoch)
        samples = cfg.steps_per_epoch * cfg.batch_size * world_size
        metrics = epoch_metrics(
            logs, epoch, start_epoch, samples, seconds, lr=optimizer.param_groups[0]["lr"], planned_epochs=planned
        )
        state = None
        if rank == 0:
            if validate is not None:
                metrics.update(validate())
            log_epoch(kind, epoch, planned, metrics)
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
        metrics.setdefault("val_psnr", float("nan"))
        meta = {"train_config": dataclasses.asdict(cfg), "epoch": epoch, "metrics": metrics}

        def write_files(folder: Path, meta=meta) -> None:
            save_model(folder / "model.pt", kind, net.config, net, meta=meta)

        report_epoch(metrics, state, write_files if rank == 0 else None)
        if cfg.time_budget_s is not None:
            now = time.perf_counter()
            planned = from_rank0(plan_epochs(cfg, epoch + 1, now - started, now - t0))


def log_epoch(kind: str, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
    """Print the epoch's line, `[kind] epoch 3/10 loss=0.01 ...` (rank 0's; Ray forwards it to the driver)."""
    print(f"[{kind}] epoch {epoch + 1}/{epochs} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


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


def save_png(path: Path, grid: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(grid).save(path)


# ------------------------------------------------------------------------------------------- all ranks, and drills
def from_rank0(value: Any) -> Any:
    """`value` as rank 0 holds it, on every rank: a broadcast when the run has several workers (a decision that
    every rank must take alike, such as when to stop), `value` itself otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def maybe_fail(config: Any, epoch: int, start_epoch: int) -> None:
    """Fault injection for tests and drills: rank 0 raises once, at `fail_at_epoch`, in an attempt that started from
    scratch. Every rank calls it.

    Before the failure every rank waits until Ray Train's controller has taken its last report: the controller polls
    the workers on its own clock, and a failure it saw before the previous epoch's checkpoint would restart the run
    from scratch instead of from that checkpoint, on a busy machine more often than on an idle one.
    """
    if getattr(config, "fail_at_epoch", -1) != epoch or start_epoch != 0:
        return
    import torch.distributed as dist
    from ray.train.v2._internal.execution.context import get_train_context

    get_train_context().get_result_queue().join()  # each report leaves the queue when the controller polls it
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # and so has every other rank's
    if world()[0] == 0:
        raise RuntimeError(f"injected failure at epoch {epoch} (fail_at_epoch)")


# --- Labelled data (class-conditional models) ---------------------------------------------------------------------
# Fashion-MNIST's classes in the order of its label ids, spelled for the command line (`--labels sneaker:100`).
FASHION_MNIST_LABELS = (
    *("t-shirt", "trouser", "pullover", "dress", "coat"),
    *("sandal", "shirt", "sneaker", "bag", "ankle-boot"),
)


def labelled_images(
    batches, channels: int, classes: int, allow_empty: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and class ids of pyarrow batches with `image` and `label` columns, decoded once (as
    `load_image_tensor`). Rows without a label, that do not decode, or that differ in size from the first
    are left out (ingest reported the bad ones).

    Args:
        batches: pyarrow record batches (`shard_batches`).
        channels: channels to decode to.
        classes: number of classes; a label outside [0, classes) is refused.
        allow_empty: return empty tensors for no rows (a rank without validation data) instead of failing.
    Returns:
        (images (N, C, H, W) uint8, labels (N,) int64).
    """
    images, labels = [], []
    for batch in batches:
        if "label" not in batch.schema.names:
            raise UserError("a class-conditional model trains on labelled shards: the data has no 'label' column")
        for i, label in enumerate(batch.column("label").to_pylist()):
            if label is None:
                continue
            if not 0 <= label < classes:
                raise UserError(f"label {label} is outside the model's {classes} classes")
            try:
                image = load_image_tensor([batch.slice(i, 1)], channels)[0]  # (C, H, W)
            except ValueError:  # did not decode
                continue
            if not images or image.shape == images[0].shape:
                images.append(image)
                labels.append(label)
    if not images:
        if allow_empty:
            return torch.zeros(0, channels, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        raise ValueError("no labelled, decodable images in this worker's data shard")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def label_classifier(cfg: Any) -> torch.nn.Module | None:
    """The bundled Fashion-MNIST classifier (logits of (N, 1, 28, 28) images in [0, 1]) when a conditional model
    (a train config with `labels`, `channels`, `image_size`) makes ten classes of 28x28 gray images, for the
    `label_accuracy` metric; None otherwise."""
    from restoration.checkpoint import load_named

    if (len(cfg.labels), cfg.channels, cfg.image_size) != (10, 1, 28):
        return None
    return load_named("fmnist-classifier", expected_kind="classifier").module.eval()
