"""Training the upscaler with Ray Train: `train_loop_per_worker` and its presets.

Each worker decodes its shard of the training images once and makes every image's low-resolution twin once, with the
very bicubic of `degrade` `lr:F` (`degrade.bicubic_down`: modcrop, then Pillow's antialiased bicubic in float), so
the model trains on exactly the inputs it is evaluated on. Every step cuts aligned random crop pairs (an LR patch of
`patch_size` pixels and the HR patch `scale` times larger under it) with one of the 8 dihedral transforms, which
commute with the downscaling. L1 loss (EDSR, Lim et al. CVPRW 2017), Adam with a cosine schedule, validation PSNR on
the Y channel with `scale` border pixels cropped, against bicubic upsampling of the same inputs. `precision="bf16"`
trains under bfloat16 autocast with channels-last tensors (CPUs with AMX or AVX512-BF16); `init_from` starts from an
upscaler model file, of another scale too (everything but the scale-specific tail is copied: a x3 or x4 model from
the x2 body); `time_budget_s` bounds the wall time (see `worker.plan_epochs`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from restoration import codec, degrade, metrics
from restoration.checkpoint import load_named
from restoration.errors import UserError
from restoration.models.upscaler import Upscaler, UpscalerConfig
from restoration.train import worker
from restoration.train.restorer import PRECISIONS, decode_rows
from restoration.train.restorer_core import lr_factor


@dataclass(frozen=True)
class UpscalerTrainConfig:
    """Everything an upscaler training run depends on (flat: a preset is one dict, a flag overrides a field)."""

    # Model (UpscalerConfig).
    scale: int = 2
    channels: int = 1
    width: int = 48
    depth: int = 8
    # Data: aligned crops, `patch_size` low-resolution pixels a side (the HR crop is scale times that).
    patch_size: int = 32
    batch_size: int = 32  # per worker
    steps_per_epoch: int = 200
    epochs: int = 10
    # Optimisation.
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    seed: int = 0
    precision: str = "fp32"  # "bf16": bfloat16 autocast + channels-last (CUDA, or CPUs with AMX/AVX512-BF16)
    init_from: str | None = None  # upscaler model name or file (any scale) to start from; ignored when resuming
    time_budget_s: float | None = None  # wall seconds of one attempt (see worker.plan_epochs)
    fail_at_epoch: int = -1  # fault injection (tests, drills): raise once at this epoch
    score: str = "val_psnr"
    score_order: str = "max"

    def __post_init__(self) -> None:
        try:
            self.model_config()
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.precision not in PRECISIONS:
            raise UserError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise UserError(f"time_budget_s must be > 0 seconds or None, got {self.time_budget_s!r}")
        if not self.lr >= 0:
            raise UserError(f"lr must be >= 0, got {self.lr!r}")
        lr_factor(self.lr_schedule, 0.0)  # validates the schedule's name
        worker.check_counts(self, "patch_size", "batch_size", "steps_per_epoch", "epochs")

    def model_config(self) -> UpscalerConfig:
        return UpscalerConfig(self.scale, self.channels, self.width, self.depth)


PRESETS: dict[str, dict] = {
    # The bundled gray models on 2 CPU cores with bf16 units: x2 from scratch (~22 min), then x3 and x4 from its
    # body (~12 min each). 48 channels x 8 layers (127k parameters) at low resolution.
    "upscale-x2-cpu": dict(scale=2, steps_per_epoch=250, epochs=60, lr=1e-3, precision="bf16", time_budget_s=1320),
    "upscale-x3-cpu": dict(
        scale=3, steps_per_epoch=250, epochs=30, lr=5e-4, precision="bf16", time_budget_s=720,
        init_from="upscale-gray-x2",
    ),
    "upscale-x4-cpu": dict(
        scale=4, steps_per_epoch=250, epochs=30, lr=5e-4, precision="bf16", time_budget_s=720,
        init_from="upscale-gray-x2",
    ),
    # Tests: a minute or less.
    "upscale-tiny": dict(scale=2, width=16, depth=4, patch_size=16, batch_size=16, steps_per_epoch=20, epochs=2),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ data
def make_pairs(images: list[np.ndarray], scale: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(low-resolution, high-resolution) pairs: each image modcropped, and its `degrade` `lr:scale` twin.

    Args:
        images: float32 (H, W, C) images in [0, 1]; those smaller than `scale` pixels a side are left out.
        scale: the integer factor.
    Returns:
        [(float32 (H/s, W/s, C), float32 (H, W, C))], H and W multiples of `scale`.
    """
    pairs = []
    for image in images:
        if min(image.shape[:2]) >= scale:
            pairs.append((degrade.bicubic_down(image, scale), np.ascontiguousarray(degrade.modcrop(image, scale))))
    return pairs


def dihedral(patch: np.ndarray, t: int) -> np.ndarray:
    """(C, H, W) patch under dihedral transform t in 0..7: rotate by (t % 4) * 90°, then flip left-right if t >= 4."""
    patch = np.rot90(patch, k=t % 4, axes=(1, 2))
    return patch[:, :, ::-1] if t >= 4 else patch


def sample_pairs(
    pairs: list[tuple[np.ndarray, np.ndarray]], patch_size: int, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`n` aligned random crops, images picked in proportion to their area, one dihedral transform per pair.

    Returns:
        (float32 (n, C, p, p), float32 (n, C, s*p, s*p)).
    """
    usable = [(lo, hi) for lo, hi in pairs if min(lo.shape[:2]) >= patch_size]
    if not usable:
        raise ValueError(f"no training image is at least {patch_size} pixels a side at low resolution")
    s = usable[0][1].shape[0] // usable[0][0].shape[0]
    areas = np.array([lo.shape[0] * lo.shape[1] for lo, _ in usable], dtype=np.float64)
    which = rng.choice(len(usable), size=n, p=areas / areas.sum())
    transforms = rng.integers(0, 8, size=n)
    c = usable[0][0].shape[2]
    lows = np.empty((n, c, patch_size, patch_size), np.float32)
    highs = np.empty((n, c, s * patch_size, s * patch_size), np.float32)
    for i, (index, t) in enumerate(zip(which, transforms, strict=True)):
        lo, hi = usable[index]
        top = int(rng.integers(0, lo.shape[0] - patch_size + 1))
        left = int(rng.integers(0, lo.shape[1] - patch_size + 1))
        lo_patch = lo[top : top + patch_size, left : left + patch_size].transpose(2, 0, 1)
        hi_patch = hi[s * top : s * (top + patch_size), s * left : s * (left + patch_size)].transpose(2, 0, 1)
        lows[i], highs[i] = dihedral(lo_patch, int(t)), dihedral(hi_patch, int(t))
    return lows, highs


def training_batches(
    cfg: UpscalerTrainConfig, pairs: list, seed: tuple[int, ...], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (low-resolution, high-resolution) batches seeded by `seed`, channels-last under bf16."""
    memory_format = torch.channels_last if cfg.precision == "bf16" else torch.contiguous_format
    rng = np.random.default_rng(list(seed))
    while True:
        lows, highs = sample_pairs(pairs, cfg.patch_size, cfg.batch_size, rng)
        yield (
            torch.from_numpy(lows).to(device, memory_format=memory_format),
            torch.from_numpy(highs).to(device, memory_format=memory_format),
        )


# ---------------------------------------------------------------------------------------------- steps, evaluation
def autocast(cfg: UpscalerTrainConfig, device: torch.device):
    """bf16 autocast on GPUs always, on CPUs when `cfg.precision` asks for it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or cfg.precision == "bf16")


def upscaler_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, low: torch.Tensor, high: torch.Tensor):
    """One Adam step on the L1 loss between the upscaled `low` (B, C, p, p) and `high` (B, C, sp, sp)."""
    loss = F.l1_loss(model(low).float(), high)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach())}


@torch.no_grad()
def evaluate(model: Upscaler, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean Y PSNR (border = scale) of the model's output, clipped to [0, 1], and of bicubic upsampling (Pillow).

    Returns:
        {"psnr": dB, "psnr_bicubic": dB} over `pairs`.
    """
    model.eval()
    s = model.scale
    ours, bicubic = [], []
    for lo, hi in pairs:
        x = torch.from_numpy(np.ascontiguousarray(lo.transpose(2, 0, 1)))[None]
        y = model(x.to(next(model.parameters()).device)).float().clamp(0, 1)[0].cpu().numpy().transpose(1, 2, 0)
        ours.append(metrics.psnr_y(y, hi, border=s))
        bicubic.append(metrics.psnr_y(np.clip(bicubic_up(lo, s), 0, 1), hi, border=s))
    model.train()
    return {"psnr": float(np.mean(ours)), "psnr_bicubic": float(np.mean(bicubic))}


def bicubic_up(image: np.ndarray, scale: int) -> np.ndarray:
    """Pillow bicubic upsampling by `scale` of a float (H, W, C) image, per channel in mode "F" (`codec.resize`)."""
    h, w = image.shape[:2]
    return codec.resize(image, w * scale, h * scale)


def init_weights(name_or_path: str, config: UpscalerConfig) -> dict:
    """The weights of an upscaler model file for a model of `config`: all of them when the scale matches, else all but
    the scale-specific tail (which keeps its fresh initialisation)."""
    loaded = load_named(name_or_path, expected_kind="upscaler")
    other = loaded.config
    if (other.channels, other.width, other.depth) != (config.channels, config.width, config.depth):
        raise UserError(f"init_from={name_or_path!r} is a {other}, but this run trains a {config}")
    state = loaded.module.state_dict()
    return state if other.scale == config.scale else {k: v for k, v in state.items() if not k.startswith("tail.")}


# -------------------------------------------------------------------------------------------------------- the loop
def train_epoch(model, optimizer, cfg: UpscalerTrainConfig, batches, epoch: int, epochs: int) -> list[float]:
    """`cfg.steps_per_epoch` steps from `batches`, the learning rate set per step from the schedule over `epochs`."""
    total_steps = epochs * cfg.steps_per_epoch
    losses = []
    for step in range(cfg.steps_per_epoch):
        low, high = next(batches)
        lr = cfg.lr * lr_factor(cfg.lr_schedule, (epoch * cfg.steps_per_epoch + step) / total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(cfg, low.device):
            losses.append(upscaler_step(model, optimizer, low, high)["loss"])
    return losses


def train_loop_per_worker(config: dict) -> None:
    """The upscaler's Ray Train loop (one call per worker)."""
    from ray.train.torch import prepare_model

    started = time.perf_counter()  # the time budget counts from here
    cfg, rank, world_size = worker.setup_worker(config, UpscalerTrainConfig)

    # Load data: this worker's shard of the training images as (LR, HR) pairs; on rank 0 the validation pairs too.
    train_pairs = make_pairs(decode_rows(worker.shard_batches("train", 256), cfg.channels), cfg.scale)
    val_pairs = make_pairs(decode_rows(worker.validation_batches(64), cfg.channels), cfg.scale)

    # Build the model and optimizer; resume from the checkpoint this attempt starts from, if any.
    torch.manual_seed(cfg.seed)
    model = Upscaler(cfg.model_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start_epoch = worker.resume({"model": model, "optimizer": optimizer})
    if start_epoch == 0 and cfg.init_from:
        model.load_state_dict(init_weights(cfg.init_from, cfg.model_config()), strict=False)
    if cfg.precision == "bf16":
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model)  # device placement + DDP when world_size > 1
    net = model.module if hasattr(model, "module") else model
    device = next(net.parameters()).device

    def train(epoch: int, planned: int) -> list[dict[str, float]]:
        batches = training_batches(cfg, train_pairs, (cfg.seed, rank, epoch), device)
        model.train()
        return [{"loss": loss} for loss in train_epoch(model, optimizer, cfg, batches, epoch, planned)]

    def validate() -> dict[str, float]:
        val = evaluate(net, val_pairs)
        return {"val_psnr": val["psnr"], "val_psnr_bicubic": val["psnr_bicubic"]}

    worker.run_epochs("upscaler", cfg, net, optimizer, start_epoch, started, train, validate if val_pairs else None)
