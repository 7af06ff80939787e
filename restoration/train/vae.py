"""Training the convolutional VAE with Ray Train: `train_loop_per_worker` and its presets.

The loss is the negative ELBO with an optional linear KL warm-up (Kingma & Welling 2014; warm-up as in Bowman et al.
2016). Each checkpoint holds the resumable state, the exported model file, `reconstructions.png` (held-out images over
their reconstructions) and `samples.png` (prior samples). The checkpoint score is the held-out negative ELBO in nats.

A conditional VAE (`labels` set, e.g. the preset `vae-fmnist-cond-cpu`) trains on labelled shards (the `label` column
ingest writes for Fashion-MNIST) with each image's class as the condition; its mixture prior is fitted per class,
`label_accuracy` is the share of prior samples made for the held-out images' classes that the bundled Fashion-MNIST
classifier puts in the class asked for (ten-class 28x28 gray models), and `samples.png` has one class per row.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from restoration.checkpoint import save_model
from restoration.errors import UserError
from restoration.models.vae import VAE, VAEConfig
from restoration.train import vae_core, worker
from restoration.train.worker import FASHION_MNIST_LABELS, label_classifier, labelled_images


@dataclass(frozen=True)
class VAETrainConfig:
    # Model (VAEConfig).
    image_size: int = 28
    channels: int = 1
    latent_dim: int = 16
    width: int = 32
    likelihood: str = "bernoulli"
    beta: float = 1.0
    prior_components: int = 0  # >0: fit a mixture sampling prior to q(z) at every checkpoint (models/vae.py)
    prior_fit_images: int = 20000  # training images (of rank 0's shard) the prior is fitted to
    labels: tuple[str, ...] = ()  # class names (index = the shards' label); empty: unconditional
    # Optimisation.
    batch_size: int = 128  # per worker
    steps_per_epoch: int | None = None  # None: one pass over the worker's shard
    epochs: int = 20
    lr: float = 1e-3
    kl_warmup_steps: int = 0
    seed: int = 0
    eval_images: int = 1000
    fail_at_epoch: int = -1
    score: str = "val_nelbo"
    score_order: str = "min"

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))  # --set labels=[...] and JSON give a list
        self.model_config()  # validates the model part
        worker.check_counts(self, "batch_size", "epochs", "steps_per_epoch")
        if self.prior_components and self.prior_fit_images < self.prior_components:
            raise UserError(
                f"prior_fit_images={self.prior_fit_images!r}: expected >= prior_components ({self.prior_components})"
            )

    def model_config(self) -> VAEConfig:
        return VAEConfig(
            self.image_size,
            self.channels,
            self.latent_dim,
            self.width,
            self.likelihood,
            self.beta,
            self.prior_components,
            self.labels,
        )


PRESETS: dict[str, dict] = {
    # Minutes on 2 CPU cores.
    "vae-fmnist-cpu": dict(
        latent_dim=16,
        width=32,
        batch_size=128,
        steps_per_epoch=100,
        epochs=5,
        kl_warmup_steps=200,
        prior_components=10,
        prior_fit_images=5000,
    ),
    # Full passes on GPUs.
    "vae-fmnist-28": dict(
        latent_dim=32, width=64, batch_size=128, epochs=50, kl_warmup_steps=5000, prior_components=50
    ),
    # A weakly regularised VAE (beta = 0.02: the regularised-autoencoder regime of Ghosh et al. 2020) whose sampling
    # prior is fitted after training (scripts/bundle_generator.py --prior-components 50): sharp samples in a few CPU
    # epochs (about 1.5 min each on 2 cores). Chosen from 2-epoch runs, FID on 2,000 samples with a 50-component
    # prior: beta 1 59.2, 0.1 37.3, 0.02 35.6.
    "vae-fmnist-sharp-cpu": dict(latent_dim=32, width=64, batch_size=128, epochs=12, kl_warmup_steps=1000, beta=0.02),
    # The same, class-conditional on labelled Fashion-MNIST shards (bundled with a mixture prior per class).
    "vae-fmnist-cond-cpu": dict(
        latent_dim=32,
        width=64,
        batch_size=128,
        epochs=12,
        kl_warmup_steps=1000,
        beta=0.02,
        labels=FASHION_MNIST_LABELS,
    ),
}


def train_loop_per_worker(config: dict) -> None:
    """The VAE's Ray Train loop (one call per worker)."""
    from ray.train.torch import prepare_model

    cfg, rank, world_size = worker.setup_worker(config, VAETrainConfig)

    # Load data: this worker's shard (uint8, kept in memory), and on rank 0 held-out images; with their class ids for
    # a conditional VAE.
    conditional = bool(cfg.labels)
    if conditional:
        train, train_y = labelled_images(worker.shard_batches("train", 1024), cfg.channels, len(cfg.labels))
        val, val_y = labelled_images(worker.validation_batches(1024), cfg.channels, len(cfg.labels), allow_empty=True)
        val, val_y = val[: cfg.eval_images], val_y[: cfg.eval_images]
        classifier = label_classifier(cfg)
    else:
        train, val = worker.image_tensors(cfg.channels, val_limit=cfg.eval_images)
        train_y = val_y = classifier = None

    # Build the model and optimizer; resume from this attempt's checkpoint, if any.
    model = VAE(cfg.model_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start_epoch = worker.resume({"model": model, "optimizer": optimizer})
    model = prepare_model(model)
    net = model.module if hasattr(model, "module") else model
    device = next(net.parameters()).device
    steps = cfg.steps_per_epoch or max(1, len(train) // cfg.batch_size)

    for epoch in range(start_epoch, cfg.epochs):
        worker.maybe_fail(cfg, epoch, start_epoch)
        rows = torch.arange(len(train))
        eps_rng, batches = worker.epoch_batches(rows, cfg.batch_size, steps, (cfg.seed, rank, epoch), device)
        logs, t0 = [], time.perf_counter()
        for step, batch_rows in enumerate(batches):
            x = train[batch_rows].float().div_(255).to(device, non_blocking=True)  # (B, C, S, S) in [0, 1]
            y = train_y[batch_rows].to(device) if conditional else None  # (B,)
            # Update weights on the negative ELBO, KL weighted by the warm-up.
            beta = vae_core.kl_weight(epoch * steps + step, cfg.kl_warmup_steps, cfg.beta)
            logs.append(vae_core.vae_step(model, optimizer, x, beta=beta, generator=eps_rng, labels=y))
        seconds = time.perf_counter() - t0

        samples = steps * cfg.batch_size * world_size
        metrics = worker.epoch_metrics(logs, epoch, start_epoch, samples, seconds, "train_", kl_weight=beta)
        state = None
        if rank == 0:
            val_metrics = vae_core.evaluate_elbo(net, val.float().div(255).to(device), labels=val_y)
            metrics.update(val_nelbo=val_metrics["neg_elbo"], val_recon=val_metrics["recon"], val_kl=val_metrics["kl"])
            if classifier is not None:  # prior samples made for the held-out images' classes, classified
                with torch.no_grad():
                    fake = net.sample(len(val_y), torch.Generator().manual_seed(cfg.seed + 1), labels=val_y)
                    predicted = classifier(fake.cpu().float()).argmax(1)
                metrics["label_accuracy"] = float((predicted == val_y).float().mean())
            worker.log_epoch("vae", epoch, cfg.epochs, metrics)
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
        metrics.setdefault("val_nelbo", float("nan"))
        if classifier is not None:
            metrics.setdefault("label_accuracy", float("nan"))
        meta = {"train_config": dataclasses.asdict(cfg), "epoch": epoch, "metrics": metrics}

        def write_files(folder: Path, meta=meta, epoch=epoch) -> None:
            if cfg.prior_components:  # the sampling prior, fitted to this checkpoint's posterior
                subset = torch.from_numpy(np.random.default_rng([cfg.seed, epoch]).permutation(len(train)))
                subset = subset[: cfg.prior_fit_images]
                subset_y = train_y[subset] if conditional else None
                meta["prior"] = vae_core.fit_latent_prior(net, train[subset], seed=cfg.seed, labels=subset_y)
            save_model(folder / "model.pt", "vae", net.config, net, meta=meta)
            reconstructions = vae_core.reconstruction_grid(
                net, val[:8].float().div(255).to(device), labels=None if val_y is None else val_y[:8]
            )
            worker.save_png(folder / "reconstructions.png", reconstructions)
            worker.save_png(folder / "samples.png", vae_core.prior_grid(net, n=64, seed=cfg.seed))

        worker.report_epoch(metrics, state, write_files if rank == 0 else None)
