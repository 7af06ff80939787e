"""Training the restorer with Ray Train: `train_loop_per_worker` and its presets.

Each worker decodes its shard of the training images once, then every epoch samples random patches (flips and 90°
rotations) and degrades each patch (fixed σ, or blind σ ∈ [lo, hi]) — residual learning with Adam and a cosine or
step schedule, validation PSNR on held-out images every epoch. Randomness is seeded by (seed, rank, epoch), so a run
resumed at an epoch boundary draws exactly the patches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from restoration import codec
from restoration.checkpoint import save_model
from restoration.models.restorer import Restorer, RestorerConfig
from restoration.train import launcher
from restoration.train.patches import PatchSampler
from restoration.train.restorer_core import NoiseSpec, add_noise, evaluate_psnr, lr_factor, restorer_step


@dataclass(frozen=True)
class RestorerTrainConfig:
    """Everything a restorer training run depends on (flat, so a preset is one dict and a flag overrides a field)."""

    # Model (RestorerConfig).
    arch: str = "dncnn"
    channels: int = 1
    depth: int = 17
    width: int = 64
    batch_norm: bool = True
    # Data and degradation.
    patch_size: int = 40
    batch_size: int = 64  # per worker
    steps_per_epoch: int = 100
    epochs: int = 10
    sigma: float = 25.0  # fixed σ (0-255 scale) ...
    sigma_min: float | None = None  # ... or blind σ ~ U[sigma_min, sigma_max] per patch when both are set
    sigma_max: float | None = None
    # Optimisation.
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    loss: str = "l2"
    seed: int = 0
    # Validation: PSNR at `val_sigma` on the held-out images, central crops of at most `val_max_side`.
    val_sigma: float = 25.0
    val_max_side: int | None = 256
    fail_at_epoch: int = -1  # fault injection (tests, drills): raise once at this epoch
    score: str = "val_psnr"
    score_order: str = "max"

    def __post_init__(self) -> None:
        RestorerConfig(self.arch, self.channels, self.depth, self.width, self.batch_norm)  # validates the model part
        NoiseSpec(**self.noise_kwargs())
        for name in ("patch_size", "batch_size", "steps_per_epoch", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def model_config(self) -> RestorerConfig:
        return RestorerConfig(self.arch, self.channels, self.depth, self.width, self.batch_norm)

    def noise_kwargs(self) -> dict:
        if self.sigma_min is not None and self.sigma_max is not None:
            return {"sigma": None, "sigma_range": (self.sigma_min, self.sigma_max)}
        return {"sigma": self.sigma, "sigma_range": None}


PRESETS: dict[str, dict] = {
    # Minutes on 2 CPU cores: a small DnCNN at σ = 25 (the test-sized model, trained longer).
    "restorer-dncnn-cpu": dict(depth=8, width=32, patch_size=40, batch_size=32, steps_per_epoch=50, epochs=6, lr=2e-3),
    # The bundled blind gray denoiser on a CPU budget: the half-resolution variant, σ ∈ [0, 55].
    "denoise-gray-cpu": dict(
        arch="fast", depth=12, width=64, patch_size=64, batch_size=32, steps_per_epoch=100, epochs=30,
        sigma_min=0.0, sigma_max=55.0, lr=1e-3,
    ),
    # DnCNN-B at full size (Zhang et al. 2017: 20 layers, blind σ ∈ [0, 55], 50×50 patches, batch 128) on GPUs.
    "denoise-gray-gpu": dict(
        arch="dncnn", depth=20, width=64, patch_size=50, batch_size=128, steps_per_epoch=1000, epochs=50,
        sigma_min=0.0, sigma_max=55.0, lr=1e-3,
    ),
}  # fmt: skip


def decode_rows(batches, channels: int) -> list[np.ndarray]:
    """Decode the `image` column of pyarrow batches into float32 (H, W, channels) arrays; undecodable rows are skipped
    (ingest has already reported them)."""
    images = []
    for batch in batches:
        for data in batch.column("image").to_pylist():
            try:
                pixels = codec.decode(data).pixels
            except codec.DecodeError:
                continue
            if pixels.shape[2] != channels:  # gray <-> colour as the model needs (ITU-R 601 luma for gray)
                pixels = (
                    np.repeat(pixels, 3, axis=2)
                    if channels == 3
                    else (pixels @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
                )
            images.append(np.ascontiguousarray(pixels, dtype=np.float32))
    return images


def train_loop_per_worker(config: dict) -> None:
    """The restorer's Ray Train loop (one call per worker)."""
    from ray.train.torch import prepare_model

    cfg, rank, world_size = launcher.setup_worker(config, RestorerTrainConfig)

    # Load data: this worker's shard of the training images, and all the validation images.
    train_images = decode_rows(launcher.shard_batches("train", 256), cfg.channels)
    val_images = decode_rows(launcher.shard_batches("val", 64), cfg.channels)

    # Build the model and optimizer; resume from the checkpoint this attempt starts from, if any.
    model = Restorer(cfg.model_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start_epoch = launcher.resume({"model": model, "optimizer": optimizer})
    model = prepare_model(model)  # device placement + DDP when world_size > 1
    net = model.module if hasattr(model, "module") else model
    device = next(net.parameters()).device
    noise = NoiseSpec(**cfg.noise_kwargs())
    total_steps = cfg.epochs * cfg.steps_per_epoch

    for epoch in range(start_epoch, cfg.epochs):
        launcher.maybe_fail(cfg, epoch, start_epoch)
        model.train()
        sampler = PatchSampler(train_images, cfg.patch_size, np.random.default_rng([cfg.seed, rank, epoch]))
        noise_seed = int(np.random.SeedSequence([cfg.seed, rank, epoch]).generate_state(1)[0])
        generator = torch.Generator(device=device).manual_seed(noise_seed)
        losses, t0 = [], time.perf_counter()
        for step in range(cfg.steps_per_epoch):
            lr = cfg.lr * lr_factor(cfg.lr_schedule, (epoch * cfg.steps_per_epoch + step) / total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Sample a batch, degrade it.
            clean = torch.from_numpy(sampler.sample(cfg.batch_size)).to(device, non_blocking=True)
            noisy = add_noise(clean, noise, generator)
            # Update weights (bf16 autocast on GPU, fp32 on CPU).
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                losses.append(restorer_step(model, optimizer, noisy, clean, loss=cfg.loss)["loss"])
        seconds = time.perf_counter() - t0

        # Validate (rank 0) and report; rank 0 hands over the checkpoint.
        metrics = {
            "epoch": epoch,
            "started_from_epoch": start_epoch,
            "loss": float(np.mean(losses)),
            "lr": lr,
            "samples_per_s": cfg.steps_per_epoch * cfg.batch_size * world_size / seconds,
            "epoch_seconds": seconds,
        }
        state = None
        if rank == 0:
            if val_images:
                val = evaluate_psnr(net, val_images, NoiseSpec(sigma=cfg.val_sigma), max_side=cfg.val_max_side)
                metrics.update(val_psnr=val["psnr"], val_psnr_input=val["psnr_input"])
            print(f"[restorer] epoch {epoch + 1}/{cfg.epochs} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
        metrics.setdefault("val_psnr", float("nan"))
        meta = {"train_config": dataclasses.asdict(cfg), "epoch": epoch, "metrics": metrics}

        def write_files(folder: Path, meta=meta) -> None:
            save_model(folder / "model.pt", "restorer", net.config, net, meta=meta)

        launcher.report_epoch(metrics, state, write_files if rank == 0 else None)
