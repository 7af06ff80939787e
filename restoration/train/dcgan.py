"""Training the DCGAN with Ray Train: `train_loop_per_worker` and its presets.

Non-saturating GAN loss, Adam(2e-4, β1 = 0.5) (Radford et al. 2015), D and G wrapped for DDP separately, an EMA copy
of G for sampling. Each checkpoint holds the resumable state, the exported model file (whose generator is the EMA
generator) and `samples.png`, a grid drawn from a fixed noise batch so checkpoints can be compared by eye. The
checkpoint score is a feature-statistics distance between EMA samples and held-out images (lower is better).

A class-conditional GAN (`labels` set, e.g. the preset `dcgan-fmnist-cond-cpu`) trains on labelled shards (the
`label` column ingest writes for Fashion-MNIST): each fake is made for a real image's class, the score compares
samples made for the held-out images' classes with those images, `label_accuracy` is the share of them the bundled
Fashion-MNIST classifier puts in the class asked for (ten-class 28x28 gray models), and `samples.png` has one class
per row.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from restoration.checkpoint import save_model
from restoration.metrics import image_grid
from restoration.models.dcgan import DCGAN, DCGANConfig
from restoration.train import worker
from restoration.train.gan_core import ema_update, feature_distance, gan_step, make_optimizers
from restoration.train.worker import FASHION_MNIST_LABELS, label_classifier, labelled_images


@dataclass(frozen=True)
class DCGANTrainConfig:
    # Model (DCGANConfig).
    image_size: int = 28
    channels: int = 1
    latent_dim: int = 100
    g_width: int = 64
    d_width: int = 64
    labels: tuple[str, ...] = ()  # class names (index = the shards' label); empty: unconditional
    # Optimisation.
    batch_size: int = 128  # per worker
    steps_per_epoch: int | None = None  # None: one pass over the worker's shard
    epochs: int = 20
    lr: float = 2e-4
    beta1: float = 0.5
    ema_decay: float = 0.999
    seed: int = 0
    eval_samples: int = 512  # images per side for the feature distance
    fail_at_epoch: int = -1
    score: str = "feature_distance"
    score_order: str = "min"

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))  # --set labels=[...] and JSON give a list
        self.model_config()  # validates the model part
        worker.check_counts(self, "batch_size", "epochs", "steps_per_epoch")

    def model_config(self) -> DCGANConfig:
        return DCGANConfig(self.image_size, self.channels, self.latent_dim, self.g_width, self.d_width, self.labels)


PRESETS: dict[str, dict] = {
    # Minutes on 2 CPU cores: a narrow DCGAN, a few hundred steps.
    "dcgan-fmnist-cpu": dict(g_width=32, d_width=32, latent_dim=64, batch_size=64, steps_per_epoch=100, epochs=5),
    # The paper's widths on Fashion-MNIST, full passes, on GPUs.
    "dcgan-fmnist-28": dict(g_width=64, d_width=64, latent_dim=100, batch_size=128, epochs=40),
    # Class-conditional, on labelled Fashion-MNIST shards: the bundled dcgan-fmnist-cond's run (hours on 2 CPU cores;
    # the same --name resumes it).
    "dcgan-fmnist-cond-cpu": dict(
        g_width=32,
        d_width=32,
        latent_dim=64,
        batch_size=64,
        steps_per_epoch=200,
        epochs=200,
        labels=FASHION_MNIST_LABELS,
    ),
}


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the generator's tanh range)."""
    return images.float().div_(127.5).sub_(1.0)


def train_loop_per_worker(config: dict) -> None:
    """The DCGAN's Ray Train loop (one call per worker)."""
    from ray.train.torch import prepare_model

    cfg, rank, world_size = worker.setup_worker(config, DCGANTrainConfig)

    # Load data: this worker's shard (uint8, kept in memory), and on rank 0 held-out images for the score; with their
    # class ids for a conditional GAN.
    conditional = bool(cfg.labels)
    if conditional:
        train, train_y = labelled_images(worker.shard_batches("train", 1024), cfg.channels, len(cfg.labels))
        val, val_y = labelled_images(worker.validation_batches(1024), cfg.channels, len(cfg.labels), allow_empty=True)
        classifier = label_classifier(cfg)
    else:
        train, val = worker.image_tensors(cfg.channels)
        train_y = val_y = classifier = None

    # Build G, D, EMA G and the optimizers; resume from this attempt's checkpoint, if any.
    model = DCGAN(cfg.model_config())
    opt_g, opt_d = make_optimizers(model, lr=cfg.lr, betas=(cfg.beta1, 0.999))
    ema = copy.deepcopy(model.generator).eval().requires_grad_(False)
    start_epoch = worker.resume({"model": model, "ema": ema, "opt_g": opt_g, "opt_d": opt_d})
    generator, discriminator = prepare_model(model.generator), prepare_model(model.discriminator)
    device = next(model.generator.parameters()).device
    ema.to(device)

    steps = cfg.steps_per_epoch or max(1, len(train) // cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        worker.maybe_fail(cfg, epoch, start_epoch)
        rows = torch.arange(len(train))
        z_rng, batches = worker.epoch_batches(rows, cfg.batch_size, steps, (cfg.seed, rank, epoch), device)
        logs, t0 = [], time.perf_counter()
        for step, batch_rows in enumerate(batches):
            # Real images in the generator's range, and their classes.
            real = to_model_range(train[batch_rows]).to(device, non_blocking=True)  # (B, C, S, S) in [-1, 1]
            labels = train_y[batch_rows].to(device) if conditional else None  # (B,)
            # Update D, then G (both inside gan_step), then the EMA copy of G.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logs.append(gan_step(generator, discriminator, opt_g, opt_d, real, cfg.latent_dim, z_rng, labels))
            # EMA decay warms up (min(decay, (1 + t) / (10 + t))) so early samples are not just the initial weights.
            t = epoch * steps + step
            ema_update(ema, model.generator, min(cfg.ema_decay, (1 + t) / (10 + t)))
        seconds = time.perf_counter() - t0

        metrics = worker.epoch_metrics(logs, epoch, start_epoch, steps * cfg.batch_size * world_size, seconds)
        state = None
        if rank == 0:
            with torch.no_grad():
                n = min(cfg.eval_samples, len(val))
                asked = val_y[:n] if conditional else None  # samples of the held-out images' classes
                fake = _sample(ema, cfg, n, torch.Generator().manual_seed(cfg.seed + 1), asked)
                real = val[: len(fake)].float().div(255)
                metrics["feature_distance"] = feature_distance(fake.cpu(), real)
                if classifier is not None:
                    predicted = classifier(fake.cpu().float()).argmax(1)
                    metrics["label_accuracy"] = float((predicted == asked).float().mean())
            worker.log_epoch("dcgan", epoch, cfg.epochs, metrics)
            state = {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "epoch": epoch,
            }
        metrics.setdefault("feature_distance", float("nan"))
        if classifier is not None:
            metrics.setdefault("label_accuracy", float("nan"))
        meta = {"train_config": dataclasses.asdict(cfg), "epoch": epoch, "metrics": metrics, "generator": "ema"}

        def write_files(folder: Path, meta=meta) -> None:
            # The exported model samples with the EMA generator; D is kept so the file can continue training.
            exported = DCGAN(cfg.model_config())
            exported.load_state_dict(
                {**model.state_dict(), **{f"generator.{k}": v for k, v in ema.state_dict().items()}}
            )
            save_model(folder / "model.pt", "dcgan", exported.config, exported, meta=meta)
            # The same z at every checkpoint; a conditional GAN's grid has one class per row, 10 images each.
            k = len(cfg.labels)
            classes = torch.arange(k).repeat_interleave(10) if k else None
            grid = _sample(ema, cfg, 10 * k if k else 64, torch.Generator().manual_seed(cfg.seed), classes)
            worker.save_png(folder / "samples.png", image_grid(grid.cpu(), nrow=10 if k else 8))

        worker.report_epoch(metrics, state, write_files if rank == 0 else None)


def _sample(
    generator: torch.nn.Module,
    cfg: DCGANTrainConfig,
    n: int,
    rng: torch.Generator,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """n images in [0, 1] from a generator in eval mode, z drawn on the CPU from `rng`, of classes `labels` (n,)."""
    device = next(generator.parameters()).device
    z = torch.randn(n, cfg.latent_dim, generator=rng).to(device)
    return generator(z, None if labels is None else labels.to(device)).float().add(1).div(2).clamp(0, 1)
