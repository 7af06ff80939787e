"""The training section: a 1-worker Ray Train restorer run against the same loop in plain PyTorch (the same
`train_epoch`), both timed per epoch by the step loop alone, so start-up, data loading, validation and checkpoints are
left out of both.

The benchmarks import no training code (the package's layout rule: the train package may build on them, not the
other way round), so the training code this section measures is handed in as a `Trainer` by the command line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from restoration import storage
from restoration.bench.throughput.config import ThroughputConfig
from restoration.bench.throughput.sampler import Resources, ResourceSampler, own_cpu
from restoration.bench.throughput.session import Progress, Session
from restoration.bench.throughput.timing import sync
from restoration.bench.throughput.work import stage_inputs


@dataclass(frozen=True)
class Trainer:
    """The training code the section measures (the train package's), handed in by the command line."""

    resolve_config: Callable[..., Any]  # train.resolve_config(kind, preset, overrides) -> the family's train config
    launch_config: Callable[..., Any]  # train.LaunchConfig(storage=, name=, workers=, num_to_keep=)
    launch: Callable[..., Any]  # train.launch(kind, config, launch_config, data) -> TrainReport with `history`
    train_epoch: Callable[..., Any]  # train.restorer.train_epoch(model, optimizer, cfg, images, rank, epoch, device)
    decode_rows: Callable[..., list]  # train.restorer.decode_rows(batches, channels): the images the loop trains on


@dataclass
class EpochTiming:
    epoch: int
    samples_per_s: float
    epoch_seconds: float  # the step loop only


@dataclass
class TrainingLoop:
    epochs: list[EpochTiming]
    samples: int
    seconds: float  # the epochs' step loops together
    threads: int
    cpu_s: float | None = None  # this process's (the plain loop)
    run_seconds: float | None = None  # the whole run, start-up and checkpoints included (Ray Train)
    resources: Resources | None = None  # what the sampler saw of the Ray Train run

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else float("nan")


@dataclass
class TrainingResult:
    preset: str
    config: Any  # the resolved `RestorerTrainConfig`
    ray_train: TrainingLoop
    plain: TrainingLoop

    @property
    def ratio_ray_over_plain(self) -> float:
        return self.ray_train.samples_per_s / self.plain.samples_per_s


def plain_training(train_epoch: Callable, train_config, images: list[np.ndarray], threads: int) -> TrainingLoop:
    """The restorer's Ray Train loop without Ray: the same per-epoch sampling, noise, optimiser and precision
    (`train_epoch`), timed per epoch the same way (the step loop only)."""
    import torch

    from restoration.device import default_device
    from restoration.models.restorer import Restorer

    torch.set_num_threads(threads)
    cfg = train_config
    device = default_device()
    memory_format = torch.channels_last if cfg.precision == "bf16" else torch.contiguous_format
    model = Restorer(cfg.model_config()).to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    epochs, cpu0 = [], own_cpu()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        train_epoch(model, optimizer, cfg, images, 0, epoch, device)
        sync(device)
        seconds = time.perf_counter() - t0
        epochs.append(EpochTiming(epoch, cfg.steps_per_epoch * cfg.batch_size / seconds, seconds))
    samples = cfg.epochs * cfg.steps_per_epoch * cfg.batch_size
    seconds = sum(e.epoch_seconds for e in epochs)
    return TrainingLoop(epochs, samples, seconds, threads, cpu_s=own_cpu() - cpu0)


def bench_training(config: ThroughputConfig, session: Session, progress: Progress, trainer: Trainer) -> TrainingResult:
    """1-worker Ray Train restorer vs the same loop in plain PyTorch, samples/s from the loops' own timings."""
    import ray
    import torch

    from restoration.cluster import default_cpus_per_worker, threads_for

    clean = session.work.clean
    overrides = {"epochs": config.train_epochs, "steps_per_epoch": config.train_steps_per_epoch}
    train_config = trainer.resolve_config("restorer", config.train_preset, overrides)
    root = storage.join(session.root, "training")
    progress("training: staging the clean images as shards")
    staged = stage_inputs(clean, storage.join(root, "data"), config.shard_mb)

    # The worker's CPUs and threads as `launch` sizes them by default for one worker.
    resources = ray.cluster_resources()
    use_gpu = int(resources.get("GPU", 0)) > 0
    cpus_per_worker = default_cpus_per_worker(float(resources.get("CPU", 1)), 1, use_gpu)
    threads = threads_for(cpus_per_worker)

    progress(f"training: Ray Train, {config.train_epochs} x {config.train_steps_per_epoch} steps")
    runs = storage.join(root, "runs")
    launch = trainer.launch_config(storage=runs, name=f"bench-{session.tag}", workers=1, num_to_keep=None)
    with ResourceSampler(extra=session.extra_pids) as sampler:
        report = trainer.launch("restorer", train_config, launch, staged.shards)
    epochs = [EpochTiming(int(m["epoch"]), m["samples_per_s"], m["epoch_seconds"]) for m in report.history]
    ray_train = TrainingLoop(
        epochs=epochs,
        samples=len(epochs) * train_config.steps_per_epoch * train_config.batch_size,
        seconds=sum(e.epoch_seconds for e in epochs),
        threads=threads,
        run_seconds=report.seconds,
        resources=sampler.result,
    )

    progress("training: plain PyTorch loop")
    images = trainer.decode_rows([pa.table({"image": [w.png for w in clean]})], train_config.channels)
    plain = plain_training(trainer.train_epoch, train_config, images, threads)
    torch.set_num_threads(session.default_threads)
    return TrainingResult(config.train_preset, train_config, ray_train, plain)
