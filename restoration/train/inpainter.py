"""Training the inpainter with Ray Train: `train_loop_per_worker` and its presets.

Each worker decodes its shard of the training images once. Every step cuts random patches (one of the 8 dihedral
transforms each) and draws a fresh free-form mask for each (`masks.free_form`, the strokes of `degrade` `holes:F`)
with a coverage uniform in [coverage_min, coverage_max], so the model never sees the same hole twice. The loss is L1
on the prediction inside the holes plus `outside_weight` times L1 outside them (the composite keeps those pixels, but
predicting them too gives the net a denser signal at the holes' borders), Adam with a cosine schedule, the
gradients' global norm cut to `grad_clip`. Validation: PSNR over the whole image and inside the holes of fixed seeded
masks (`val_coverage`) on the held-out images, with the push-pull fill alone as the baseline the net must beat.
`precision="bf16"` trains under bfloat16 autocast with channels-last tensors. Randomness is seeded by (seed, rank,
epoch), so a run resumed at an epoch boundary draws what an uninterrupted one would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from restoration import degrade, masks, metrics
from restoration.checkpoint import load_named
from restoration.errors import UserError
from restoration.models.inpainter import Inpainter, InpainterConfig, push_pull
from restoration.train import worker
from restoration.train.restorer import PRECISIONS, decode_rows
from restoration.train.restorer_core import lr_factor
from restoration.train.upscaler import autocast, dihedral


@dataclass(frozen=True)
class InpainterTrainConfig:
    """Everything an inpainter training run depends on (flat: a preset is one dict, a flag overrides a field)."""

    # Model (InpainterConfig).
    channels: int = 1
    width: int = 32
    levels: int = 3
    bottleneck: int = 4
    # Data: patches with fresh masks.
    patch_size: int = 96
    batch_size: int = 16  # per worker
    steps_per_epoch: int = 200
    epochs: int = 10
    coverage_min: float = 0.05
    coverage_max: float = 0.5
    # Optimisation.
    outside_weight: float = 0.1  # L1 weight of the known pixels next to the holes' weight 1
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    # The gradients' global L2 norm is cut to this before each step (0: never; typical norms are 0.15-1 after the
    # first steps). The net has no normalisation layers, and one outlier batch can throw Adam's moments off for good.
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "fp32"  # "bf16": bfloat16 autocast + channels-last (CUDA, or CPUs with AMX/AVX512-BF16)
    init_from: str | None = None  # inpainter model name or file (same architecture) to start from
    # Validation: fixed masks of this coverage on the held-out images, central crops of at most `val_max_side`.
    val_coverage: float = 0.25
    val_max_side: int = 256
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
        if not 0 <= self.coverage_min <= self.coverage_max < 1:
            raise UserError(
                f"coverage_min={self.coverage_min!r}, coverage_max={self.coverage_max!r}: expected "
                "0 <= coverage_min <= coverage_max < 1"
            )
        if not 0 < self.val_coverage < 1:
            raise UserError(f"val_coverage must be in (0, 1), got {self.val_coverage!r}")
        if not self.outside_weight >= 0:
            raise UserError(f"outside_weight must be >= 0, got {self.outside_weight!r}")
        if not self.grad_clip >= 0:
            raise UserError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise UserError(f"time_budget_s must be > 0 seconds or None, got {self.time_budget_s!r}")
        lr_factor(self.lr_schedule, 0.0)  # validates the schedule's name
        worker.check_counts(self, "patch_size", "batch_size", "steps_per_epoch", "epochs", "val_max_side")

    def model_config(self) -> InpainterConfig:
        return InpainterConfig(self.channels, self.width, self.levels, self.bottleneck)


PRESETS: dict[str, dict] = {
    # The bundled gray inpainter on 2 CPU cores (--cpus-per-worker 1.5): width 16, 0.39M parameters, 6,000 steps; fp32
    # on AVX2 only (`--set precision=fp32`) about 0.5 s a step. `--set width=32` (1.5M parameters, about 3x the time
    # a step and an image) is `inpaint-gray-large`.
    "inpaint-gray-cpu": dict(width=16, steps_per_epoch=250, epochs=24, lr=5e-4, precision="bf16"),
    # The same net for GPUs: larger patches and batches.
    "inpaint-gray-gpu": dict(patch_size=128, batch_size=64, steps_per_epoch=1000, epochs=100, lr=1e-3),
    "inpaint-color-gpu": dict(channels=3, patch_size=128, batch_size=64, steps_per_epoch=1000, epochs=100, lr=1e-3),
    # Tests: seconds.
    "inpaint-tiny": dict(width=8, levels=2, bottleneck=1, patch_size=32, batch_size=8, steps_per_epoch=10, epochs=2),
}


# ------------------------------------------------------------------------------------------------------ data
def sample_batch(
    images: list[np.ndarray], cfg: InpainterTrainConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`cfg.batch_size` random patches (images picked in proportion to their area, one dihedral transform each) and
    a fresh free-form mask for each, its coverage uniform in [coverage_min, coverage_max].

    Returns:
        (float32 (B, C, p, p) clean patches, float32 (B, 1, p, p) masks, 1 = missing).
    """
    p = cfg.patch_size
    usable = [im for im in images if min(im.shape[:2]) >= p]
    if not usable:
        raise ValueError(f"no training image is at least {p} pixels a side")
    areas = np.array([im.shape[0] * im.shape[1] for im in usable], dtype=np.float64)
    which = rng.choice(len(usable), size=cfg.batch_size, p=areas / areas.sum())
    patches = np.empty((cfg.batch_size, usable[0].shape[2], p, p), np.float32)
    holes = np.empty((cfg.batch_size, 1, p, p), np.float32)
    for i, index in enumerate(which):
        im = usable[index]
        top, left = int(rng.integers(0, im.shape[0] - p + 1)), int(rng.integers(0, im.shape[1] - p + 1))
        patches[i] = dihedral(im[top : top + p, left : left + p].transpose(2, 0, 1), int(rng.integers(0, 8)))
        holes[i, 0] = masks.free_form(p, p, rng.uniform(cfg.coverage_min, cfg.coverage_max), rng)
    return patches, holes


def training_batches(
    cfg: InpainterTrainConfig, images: list[np.ndarray], seed: tuple[int, ...], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (net input (B, C + 1, p, p): holes zeroed + mask, clean target (B, C, p, p)) batches seeded by `seed`."""
    memory_format = torch.channels_last if cfg.precision == "bf16" else torch.contiguous_format
    rng = np.random.default_rng(list(seed))
    while True:
        clean, holes = sample_batch(images, cfg, rng)
        x = np.concatenate([clean * (1 - holes), holes], axis=1)
        yield (
            torch.from_numpy(x).to(device, memory_format=memory_format),
            torch.from_numpy(clean).to(device, memory_format=memory_format),
        )


# ---------------------------------------------------------------------------------------------- steps, evaluation
def inpaint_loss(pred: torch.Tensor, target: torch.Tensor, missing: torch.Tensor, outside_weight: float):
    """Weighted L1: weight 1 inside the holes (`missing` = 1), `outside_weight` outside, normalised by the weights."""
    weights = missing + outside_weight * (1 - missing)  # (B, 1, H, W)
    return ((pred - target).abs() * weights).sum() / (weights.sum() * pred.shape[1]).clamp_min(1e-8)


def inpainter_step(
    model, optimizer, x: torch.Tensor, target: torch.Tensor, outside_weight: float, grad_clip: float
) -> dict:
    """One optimizer step on `inpaint_loss` of the raw prediction for `x` (B, C + 1, p, p), the gradients' global norm
    cut to `grad_clip` first when it is > 0.

    Returns:
        {"loss", "grad_norm"}: the loss, and the gradients' norm before any cut.
    """
    c = x.shape[1] - 1
    pred = model(x, composite=False).float()  # through DDP's wrapper when there is one, so gradients are synced
    loss = inpaint_loss(pred, target, x[:, c:].float(), outside_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    return {"loss": float(loss.detach()), "grad_norm": float(norm)}


def validation_set(images: list[np.ndarray], cfg: InpainterTrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Central crops (at most `val_max_side`) of the held-out images with fixed masks seeded by (seed, index)."""
    pairs = []
    for i, im in enumerate(images):
        h, w = min(im.shape[0], cfg.val_max_side), min(im.shape[1], cfg.val_max_side)
        top, left = (im.shape[0] - h) // 2, (im.shape[1] - w) // 2
        crop = np.ascontiguousarray(im[top : top + h, left : left + w])
        pairs.append((crop, masks.free_form(h, w, cfg.val_coverage, degrade.rng_for(cfg.seed, f"val/{i}"))))
    return pairs


@torch.no_grad()
def evaluate(model: Inpainter, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean PSNR over the whole image and inside the holes, of the model's composite and of the push-pull fill.

    Returns:
        {"psnr", "psnr_hole", "psnr_fill", "psnr_fill_hole"} in dB over `pairs` ((clean (H, W, C), mask (H, W))).
    """
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[float]] = {"psnr": [], "psnr_hole": [], "psnr_fill": [], "psnr_fill_hole": []}
    for clean, hole in pairs:
        m = torch.from_numpy(hole.astype(np.float32))[None, None].to(device)  # (1, 1, H, W)
        x = torch.from_numpy(np.ascontiguousarray(clean.transpose(2, 0, 1)))[None].to(device) * (1 - m)
        ours = model(torch.cat([x, m], 1)).float().clamp(0, 1)
        fill = push_pull(x, 1 - m).clamp(0, 1)
        for name, y in (("psnr", ours), ("psnr_fill", fill)):
            y = y[0].cpu().numpy().transpose(1, 2, 0)
            out[name].append(metrics.psnr(y, clean))
            out[f"{name}_hole"].append(metrics.psnr(y[hole], clean[hole]))
    model.train()
    return {k: float(np.mean(v)) for k, v in out.items()}


def init_weights(name_or_path: str, config: InpainterConfig) -> dict:
    """The weights of an inpainter model file, checked to match `config`; a gray model starts an RGB one (`inflate`)."""
    loaded = load_named(name_or_path, expected_kind="inpainter")
    if loaded.config == config:
        return loaded.module.state_dict()
    if config.channels == 3 and loaded.config == replace(config, channels=1):
        return inflate(loaded.module.state_dict())
    raise UserError(f"init_from={name_or_path!r} is a {loaded.config}, but this run trains a {config}")


def inflate(gray: dict) -> dict:
    """An RGB inpainter's weights from a gray one's of the same size: on an image whose three channels are equal it
    predicts what the gray net predicts, in each channel; on any other image, the gray net's prediction for the
    channels' mean added to each channel's own push-pull fill. Colour training then starts from everything the gray
    net learned and only has to learn what colour adds.

    The first convolution's image weights are split evenly over R, G and B (it sees the mean of the three where the
    gray net saw the gray image; the mask's weights are kept), and the last convolution's single output is copied to
    three.
    """
    rgb = dict(gray)
    head = gray["head.0.0.weight"]  # (w, 2, 3, 3): the image, then the mask
    rgb["head.0.0.weight"] = torch.cat([head[:, :1].expand(-1, 3, -1, -1) / 3, head[:, 1:]], 1)
    rgb["tail.weight"] = gray["tail.weight"].expand(3, -1, -1, -1).clone()  # (3, w, 3, 3)
    rgb["tail.bias"] = gray["tail.bias"].expand(3).clone()
    return rgb


# -------------------------------------------------------------------------------------------------------- the loop
def train_epoch(model, optimizer, cfg: InpainterTrainConfig, batches, epoch: int, epochs: int) -> list[float]:
    """`cfg.steps_per_epoch` steps from `batches`, the learning rate set per step from the schedule over `epochs`."""
    total_steps = epochs * cfg.steps_per_epoch
    losses = []
    for step in range(cfg.steps_per_epoch):
        x, target = next(batches)
        lr = cfg.lr * lr_factor(cfg.lr_schedule, (epoch * cfg.steps_per_epoch + step) / total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(cfg, x.device):
            losses.append(inpainter_step(model, optimizer, x, target, cfg.outside_weight, cfg.grad_clip)["loss"])
    return losses


def train_loop_per_worker(config: dict) -> None:
    """The inpainter's Ray Train loop (one call per worker)."""
    from ray.train.torch import prepare_model

    started = time.perf_counter()  # the time budget counts from here
    cfg, rank, world_size = worker.setup_worker(config, InpainterTrainConfig)

    # Load data: this worker's shard of the training images; on rank 0 the validation images with fixed masks.
    train_images = decode_rows(worker.shard_batches("train", 256), cfg.channels)
    val_pairs = validation_set(decode_rows(worker.validation_batches(64), cfg.channels), cfg)

    # Build the model and optimizer; resume from the checkpoint this attempt starts from, if any.
    torch.manual_seed(cfg.seed)
    model = Inpainter(cfg.model_config())
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
        batches = training_batches(cfg, train_images, (cfg.seed, rank, epoch), device)
        model.train()
        return [{"loss": loss} for loss in train_epoch(model, optimizer, cfg, batches, epoch, planned)]

    def validate() -> dict[str, float]:
        return {f"val_{k}": v for k, v in evaluate(net, val_pairs).items()}

    worker.run_epochs("inpainter", cfg, net, optimizer, start_epoch, started, train, validate if val_pairs else None)
