"""Training the restorer with Ray Train: `train_loop_per_worker` and its presets.

Each worker decodes its shard of the training images once, then every epoch samples random patches (flips and 90°
rotations) and degrades each patch — Gaussian noise (fixed σ, or blind σ ∈ [lo, hi]), or, with `jpeg_p`/`blur_p`
set, a per-patch mix of blur, noise and JPEG (`DegradeMix`) — residual learning with Adam and a cosine or step
schedule, validation PSNR on held-out images every epoch. `precision="bf16"` trains under bfloat16 autocast with
channels-last tensors (on CPUs with AMX or AVX512-BF16 several times faster than fp32); `init_from` starts from the
weights of an existing model file (fine-tuning); `time_budget_s` bounds the run's wall time (see `worker.plan_epochs`).
Randomness is seeded by (seed, rank, epoch), so a run resumed at an epoch boundary draws exactly the patches an
uninterrupted one would.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from restoration import codec, sources
from restoration.checkpoint import load_named
from restoration.errors import UserError
from restoration.models.restorer import Restorer, RestorerConfig
from restoration.train import worker
from restoration.train.patches import PatchSampler
from restoration.train.restorer_core import (
    DegradeMix,
    NoiseSpec,
    add_noise,
    degrade_patches,
    evaluate_psnr,
    lr_factor,
    recalibrate_batch_norm,
    restorer_step,
)

PRECISIONS = ("fp32", "bf16")


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
    # More kinds of damage (see DegradeMix): when jpeg_p or blur_p > 0, each patch draws blur, noise (σ from the
    # blind range, or the fixed σ) and JPEG independently with these probabilities.
    noise_p: float = 1.0
    jpeg_p: float = 0.0
    quality_min: int = 10
    quality_max: int = 90
    blur_p: float = 0.0
    blur_max: float = 1.5
    # Optimisation.
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    loss: str = "l2"
    seed: int = 0
    precision: str = "fp32"  # "bf16": bfloat16 autocast + channels-last (CUDA, or CPUs with AMX/AVX512-BF16)
    # After each epoch, BatchNorm statistics are re-estimated on this many fresh batches (0: keep the running ones).
    bn_recalibration_batches: int = 50
    init_from: str | None = None  # model name or file to start from (same architecture); ignored when resuming
    # Validation: PSNR at `val_sigma` on the held-out images, central crops of at most `val_max_side`.
    val_sigma: float = 25.0
    val_max_side: int | None = 256
    # Wall seconds for the epochs of one attempt, counted from the start of the worker's loop (data decoding
    # included); the run stops after the last epoch that fits, its schedule re-planned to end there
    # (`worker.plan_epochs`).
    time_budget_s: float | None = None
    fail_at_epoch: int = -1  # fault injection (tests, drills): raise once at this epoch
    score: str = "val_psnr"
    score_order: str = "max"

    def __post_init__(self) -> None:
        RestorerConfig(self.arch, self.channels, self.depth, self.width, self.batch_norm)  # validates the model part
        NoiseSpec(**self.noise_kwargs())
        self.degrade_mix()
        if self.precision not in PRECISIONS:
            raise UserError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.bn_recalibration_batches < 0:
            raise UserError(f"bn_recalibration_batches must be >= 0, got {self.bn_recalibration_batches}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise UserError(f"time_budget_s must be > 0 seconds or None, got {self.time_budget_s!r}")
        worker.check_counts(self, "patch_size", "batch_size", "steps_per_epoch", "epochs")

    def model_config(self) -> RestorerConfig:
        return RestorerConfig(self.arch, self.channels, self.depth, self.width, self.batch_norm)

    def degrade_mix(self) -> DegradeMix | None:
        """The per-patch degradation mix, or None for plain Gaussian noise."""
        if self.jpeg_p == 0 and self.blur_p == 0:
            return None
        noise = self.noise_kwargs()
        sigma_range = noise["sigma_range"] or (self.sigma, self.sigma)
        return DegradeMix(
            self.noise_p, sigma_range, self.jpeg_p, (self.quality_min, self.quality_max), self.blur_p, self.blur_max
        )

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
    # The same on CPUs with bfloat16 matrix units (AMX, AVX512-BF16): about 3.5x the steps per second.
    "denoise-gray-bf16": dict(
        arch="fast", depth=12, width=64, patch_size=64, batch_size=32, steps_per_epoch=500, epochs=60,
        sigma_min=0.0, sigma_max=55.0, lr=1e-3, precision="bf16",
    ),
    # One gray model for noise, JPEG (q 10-90) and mild blur, fine-tuned further from the bundled restore-gray (the
    # bundled denoise-gray is now a U-Net, another architecture).
    "restore-gray-bf16": dict(
        arch="fast", depth=12, width=64, patch_size=64, batch_size=32, steps_per_epoch=500, epochs=20,
        sigma_min=0.0, sigma_max=55.0, noise_p=0.7, jpeg_p=0.4, blur_p=0.2, lr=5e-4, precision="bf16",
        init_from="restore-gray",
    ),
    # Blind RGB denoiser (FFDNet's colour body: 12 layers, 96 channels) for colour photos, e.g. LIVE1.
    "denoise-color-bf16": dict(
        arch="fast", channels=3, depth=12, width=96, patch_size=64, batch_size=32, steps_per_epoch=500, epochs=40,
        sigma_min=0.0, sigma_max=55.0, lr=1e-3, precision="bf16",
    ),
    # One RGB model for noise, JPEG (q 10-90, 4:2:0 chroma subsampling) and mild blur, from the colour denoiser.
    "restore-color-bf16": dict(
        arch="fast", channels=3, depth=12, width=96, patch_size=64, batch_size=32, steps_per_epoch=500, epochs=20,
        sigma_min=0.0, sigma_max=55.0, noise_p=0.7, jpeg_p=0.4, blur_p=0.2, lr=5e-4, precision="bf16",
        init_from="denoise-color",
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
                pixels = np.repeat(pixels, 3, axis=2) if channels == 3 else sources.luma(pixels)
            images.append(np.ascontiguousarray(pixels, dtype=np.float32))
    return images


def init_weights(name_or_path: str, config: RestorerConfig) -> dict:
    """The state dict of a restorer model file, checked to match `config` (BN folded or not is not a match)."""
    loaded = load_named(name_or_path, expected_kind="restorer")
    if loaded.config != config:
        raise UserError(f"init_from={name_or_path!r} is a {loaded.config}, but this run trains a {config}")
    return loaded.module.state_dict()


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: RestorerTrainConfig,
    images: list[np.ndarray],
    rank: int,
    epoch: int,
    device: torch.device,
    epochs: int | None = None,
) -> list[float]:
    """One epoch of `cfg.steps_per_epoch` steps: sample patches, degrade them, update (the loop's hot path, shared with
    the plain-PyTorch baseline of `restoration bench throughput`).

    Randomness is seeded by (seed, rank, epoch), so an epoch draws the same patches and noise wherever it runs.

    Args:
        model: the restorer (DDP-wrapped or not), in channels-last when `cfg.precision` is "bf16".
        optimizer: Adam over its parameters; the learning rate is set per step from the schedule.
        cfg: the run's config; images: float32 (H, W, C) training images; rank: the worker's rank.
        epoch: the epoch index; device: where the model is.
        epochs: the epochs the learning-rate schedule spans (default `cfg.epochs`; see `worker.plan_epochs`).
    Returns:
        The loss of every step.
    """
    total_steps = (epochs or cfg.epochs) * cfg.steps_per_epoch
    model.train()
    losses = []
    batches = itertools.islice(training_batches(cfg, images, (cfg.seed, rank, epoch), device), cfg.steps_per_epoch)
    for step, (noisy, clean) in enumerate(batches):
        lr = cfg.lr * lr_factor(cfg.lr_schedule, (epoch * cfg.steps_per_epoch + step) / total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(cfg, device):
            losses.append(restorer_step(model, optimizer, noisy, clean, loss=cfg.loss)["loss"])
    return losses


def autocast(cfg: RestorerTrainConfig, device: torch.device):
    """bf16 autocast on GPUs always, on CPUs when `cfg.precision` asks for it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or cfg.precision == "bf16")


def training_batches(
    cfg: RestorerTrainConfig, images: list[np.ndarray], seed: tuple[int, ...], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (degraded, clean) batches of random patches, degraded as `cfg` says, seeded by `seed`.

    Returns:
        An iterator of ((B, C, p, p), (B, C, p, p)) tensors on `device`, channels-last under bf16.
    """
    memory_format = torch.channels_last if cfg.precision == "bf16" else torch.contiguous_format
    noise = NoiseSpec(**cfg.noise_kwargs())
    mix = cfg.degrade_mix()
    sampler = PatchSampler(images, cfg.patch_size, np.random.default_rng(list(seed)))
    generator = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    mix_rng = np.random.default_rng([*seed, 1])
    while True:
        patches = sampler.sample(cfg.batch_size)  # (B, C, p, p)
        clean = torch.from_numpy(patches).to(device, memory_format=memory_format, non_blocking=True)
        if mix is None:
            noisy = add_noise(clean, noise, generator)
        else:  # blur/JPEG run on the CPU, patch by patch
            noisy = torch.from_numpy(degrade_patches(patches, mix, mix_rng))
            noisy = noisy.to(device, memory_format=memory_format, non_blocking=True)
        yield noisy, clean


def recalibrate(model: torch.nn.Module, cfg: RestorerTrainConfig, images: list[np.ndarray], seed, device) -> int:
    """Re-estimate the model's BatchNorm statistics on `cfg.bn_recalibration_batches` fresh training batches."""
    if cfg.bn_recalibration_batches == 0:
        return 0
    batches = training_batches(cfg, images, (*seed, 2), device)  # a stream of its own: training batches unchanged
    with autocast(cfg, device):
        inputs = (noisy for noisy, _ in itertools.islice(batches, cfg.bn_recalibration_batches))
        return recalibrate_batch_norm(model, inputs)


def train_loop_per_worker(config: dict) -> None:
    """The restorer's Ray Train loop (one call per worker)."""
    from ray.train.torch import prepare_model

    started = time.perf_counter()  # the time budget counts from here
    cfg, rank, world_size = worker.setup_worker(config, RestorerTrainConfig)

    # Load data: this worker's shard of the training images, and on rank 0 all the validation images.
    train_images = decode_rows(worker.shard_batches("train", 256), cfg.channels)
    val_images = decode_rows(worker.validation_batches(64), cfg.channels)

    # Build the model and optimizer; resume from the checkpoint this attempt starts from, if any.
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights, hence the same run
    model = Restorer(cfg.model_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start_epoch = worker.resume({"model": model, "optimizer": optimizer})
    if start_epoch == 0 and cfg.init_from:
        model.load_state_dict(init_weights(cfg.init_from, cfg.model_config()))
    if cfg.precision == "bf16":
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model)  # device placement + DDP when world_size > 1
    net = model.module if hasattr(model, "module") else model
    device = next(net.parameters()).device

    def train(epoch: int, planned: int) -> list[dict[str, float]]:
        losses = train_epoch(model, optimizer, cfg, train_images, rank, epoch, device, epochs=planned)
        return [{"loss": loss} for loss in losses]

    def validate() -> dict[str, float]:
        val = evaluate_psnr(net, val_images, NoiseSpec(sigma=cfg.val_sigma), max_side=cfg.val_max_side)
        return {"val_psnr": val["psnr"], "val_psnr_input": val["psnr_input"]}

    def after_train(epoch: int) -> None:  # BatchNorm statistics before validating and saving
        recalibrate(net, cfg, train_images, (cfg.seed, rank, epoch), device)

    worker.run_epochs(
        "restorer", cfg, net, optimizer, start_epoch, started, train, validate if val_images else None, after_train
    )
