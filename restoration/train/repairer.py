"""Training the blind damage repairer with Ray Train: `train_loop_per_worker` and its presets.

Each worker decodes its shard of the training images once. Every step draws random patches (`PatchSampler`: one of
the 8 dihedral transforms each) and damages each on the fly with the degradations the benchmark uses
(`degrade.apply_masked` with `scratch:S,spots:N`, S and N uniform up to `max_scratches`, `max_spots`), leaving a
share `clean_share` of the patches undamaged so that the detector learns to leave clean images alone. The loss is
binary cross-entropy of the detector's logits against the mask the degradation recorded, plus `fill_weight` times
the inpainter's weighted L1 (`inpainter.inpaint_loss`) of the fill on the recorded mask; Adam with a cosine schedule.
Validation: held-out images with fixed seeded damage (`val_damage`), PSNR of the repaired image and of the damaged
input, the found mask's IoU with the damage, and the PSNR of the repaired clean image against itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from restoration import degrade, metrics
from restoration.checkpoint import load_named
from restoration.errors import UserError
from restoration.models.repairer import Repairer, RepairerConfig
from restoration.train import worker
from restoration.train.inpainter import inpaint_loss
from restoration.train.patches import PatchSampler
from restoration.train.restorer import PRECISIONS, decode_rows
from restoration.train.restorer_core import lr_factor
from restoration.train.upscaler import autocast


@dataclass(frozen=True)
class RepairerTrainConfig:
    """Everything a repairer training run depends on (flat: a preset is one dict, a flag overrides a field)."""

    # Model (RepairerConfig).
    channels: int = 1
    detector_width: int = 16
    detector_depth: int = 5
    fill_width: int = 12
    fill_levels: int = 2
    fill_bottleneck: int = 1
    grow: int = 1
    # Data: patches damaged on the fly.
    patch_size: int = 64
    batch_size: int = 16  # per worker
    steps_per_epoch: int = 200
    epochs: int = 10
    max_scratches: int = 4  # per patch, uniform in 0..max (a 64 px patch of a 256 px image holds about 2.5 of 10)
    max_spots: int = 6
    clean_share: float = 0.25  # patches left undamaged
    tone_share: float = 0.3  # patches through a random steep tone curve first (see `tone_batch`)
    # Optimisation.
    pos_weight: float = 2.0  # BCE weight of the damaged pixels: a missed one costs more PSNR than a clean one filled
    fill_weight: float = 1.0
    outside_weight: float = 0.1  # the fill's L1 weight outside the holes (see inpainter.inpaint_loss)
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    seed: int = 0
    precision: str = "fp32"  # "bf16": bfloat16 autocast + channels-last (CUDA, or CPUs with AMX/AVX512-BF16)
    init_from: str | None = None  # repairer model name or file (same architecture) to start from
    # Validation: this damage on central crops of at most `val_max_side` of the held-out images.
    val_damage: str = "scratch:5,spots:10"
    val_max_side: int = 180
    time_budget_s: float | None = None  # wall seconds of one attempt (see worker.plan_epochs)
    fail_at_epoch: int = -1  # fault injection (tests, drills): raise once at this epoch
    score: str = "val_psnr"
    score_order: str = "max"

    def __post_init__(self) -> None:
        try:
            self.model_config()
            degrade.parse_spec(self.val_damage)
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.precision not in PRECISIONS:
            raise UserError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        for name in ("clean_share", "tone_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("max_scratches", "max_spots"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise UserError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.max_scratches + self.max_spots == 0:
            raise UserError("max_scratches and max_spots are both 0: the detector would have nothing to learn")
        for name in ("pos_weight", "fill_weight", "outside_weight"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise UserError(f"time_budget_s must be > 0 seconds or None, got {self.time_budget_s!r}")
        lr_factor(self.lr_schedule, 0.0)  # validates the schedule's name
        worker.check_counts(self, "patch_size", "batch_size", "steps_per_epoch", "epochs", "val_max_side")

    def model_config(self) -> RepairerConfig:
        return RepairerConfig(
            channels=self.channels,
            detector_width=self.detector_width,
            detector_depth=self.detector_depth,
            fill_width=self.fill_width,
            fill_levels=self.fill_levels,
            fill_bottleneck=self.fill_bottleneck,
            grow=self.grow,
        )


PRESETS: dict[str, dict] = {
    # The bundled models on shared CPU cores with bf16 units: 58 k parameters, 64 px patches, about 0.4 s a step.
    "repair-gray-cpu": dict(steps_per_epoch=200, epochs=12, lr=2e-3, precision="bf16"),
    "repair-color-cpu": dict(channels=3, steps_per_epoch=200, epochs=12, lr=2e-3, precision="bf16"),
    # The same nets for GPUs: larger patches and batches, more steps.
    "repair-gray-gpu": dict(patch_size=128, max_scratches=8, max_spots=16, batch_size=64, steps_per_epoch=1000,
                            epochs=50),
    "repair-color-gpu": dict(channels=3, patch_size=128, max_scratches=8, max_spots=16, batch_size=64,
                             steps_per_epoch=1000, epochs=50),
    # Tests: seconds.
    "repair-tiny": dict(detector_width=8, detector_depth=3, fill_width=8, fill_levels=1, fill_bottleneck=0,
                        patch_size=32, batch_size=8, steps_per_epoch=10, epochs=2, max_scratches=2, max_spots=3,
                        val_max_side=48),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ data
def tone_batch(clean: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """A `share` of the patches (B, C, p, p) through a random steep tone curve, 0.5 + g (x - m) clipped to [0, 1]
    with gain g ~ U(1, 4) and level m ~ U(0.1, 0.9), in place: regions at or near 0 and 1, as dark coats, shadows and
    highlights are in photos, so the detector learns that only thin lines and small blobs of such values are damage
    (the training images hold few, and a detector without them marks every dark region)."""
    for i in range(len(clean)):
        if rng.random() < share:
            clean[i] = np.clip(0.5 + rng.uniform(1, 4) * (clean[i] - rng.uniform(0.1, 0.9)), 0, 1)
    return clean


def damage_batch(
    clean: np.ndarray, cfg: RepairerTrainConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Damage a batch of clean patches as `degrade` does: `scratch:S,spots:N` (S, N uniform in 0..max) on all but a
    `clean_share` of them.

    Args:
        clean: float32 (B, C, p, p) in [0, 1].
    Returns:
        (damaged float32 (B, C, p, p), float32 (B, 1, p, p) recorded mask, 1 = damaged).
    """
    damaged, mask = clean.copy(), np.zeros((clean.shape[0], 1, *clean.shape[2:]), np.float32)
    for i in range(len(clean)):
        if rng.random() < cfg.clean_share:
            continue
        spec = f"scratch:{rng.integers(0, cfg.max_scratches + 1)},spots:{rng.integers(0, cfg.max_spots + 1)}"
        out, found = degrade.apply_masked(clean[i].transpose(1, 2, 0), spec, rng)  # (p, p, C), (p, p)
        damaged[i] = out.transpose(2, 0, 1)
        mask[i, 0] = found
    return damaged, mask


def training_batches(
    cfg: RepairerTrainConfig, images: list[np.ndarray], seed: tuple[int, ...], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless (damaged (B, C, p, p), recorded mask (B, 1, p, p), clean (B, C, p, p)) batches seeded by `seed`."""
    memory_format = torch.channels_last if cfg.precision == "bf16" else torch.contiguous_format
    rng = np.random.default_rng(list(seed))
    sampler = PatchSampler(images, cfg.patch_size, rng)
    while True:
        clean = tone_batch(sampler.sample(cfg.batch_size), cfg.tone_share, rng)
        damaged, mask = damage_batch(clean, cfg, rng)
        yield tuple(torch.from_numpy(a).to(device, memory_format=memory_format) for a in (damaged, mask, clean))


# ---------------------------------------------------------------------------------------------- steps, evaluation
def repair_loss(model, damaged: torch.Tensor, mask: torch.Tensor, clean: torch.Tensor, cfg) -> tuple:
    """(total, detector BCE, fill L1) of one batch: BCE of the logits against `mask` (damaged pixels weighted by
    `pos_weight`) + `fill_weight` x the inpainter's weighted L1 of the fill on `mask` grown by the model's `grow`."""
    logits, fill = model(damaged, mask)  # through DDP's wrapper when there is one, so gradients are synced
    pos_weight = torch.tensor(cfg.pos_weight, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits.float(), mask.float(), pos_weight=pos_weight)
    holes = F.max_pool2d(mask.float(), 2 * cfg.grow + 1, stride=1, padding=cfg.grow) if cfg.grow else mask.float()
    l1 = inpaint_loss(fill.float(), clean.float(), holes, cfg.outside_weight)
    return bce + cfg.fill_weight * l1, bce, l1


def repairer_step(model, optimizer, damaged, mask, clean, cfg) -> dict[str, float]:
    """One Adam step on `repair_loss`."""
    loss, bce, l1 = repair_loss(model, damaged, mask, clean, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach()), "bce": float(bce.detach()), "fill_l1": float(l1.detach())}


def validation_pairs(images: list[np.ndarray], cfg: RepairerTrainConfig) -> list[tuple[np.ndarray, ...]]:
    """(clean crop (H, W, C), damaged (H, W, C), bool mask (H, W)): `val_damage` seeded by (seed, index) on central
    crops of at most `val_max_side` a side."""
    out = []
    for i, im in enumerate(images):
        h, w = min(im.shape[0], cfg.val_max_side), min(im.shape[1], cfg.val_max_side)
        top, left = (im.shape[0] - h) // 2, (im.shape[1] - w) // 2
        clean = np.ascontiguousarray(im[top : top + h, left : left + w])
        damaged, mask = degrade.apply_masked(clean, cfg.val_damage, degrade.rng_for(cfg.seed, f"val/{i}"))
        out.append((clean, damaged, mask))
    return out


@torch.no_grad()
def repair(model: Repairer, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model on one (H, W, C) float image: (repaired (H, W, C) in [0, 1], bool found mask (H, W))."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device)  # (1, C, H, W)
    y = model(x).float()[0].cpu().numpy()  # (C + 1, H, W)
    return y[:-1].clip(0, 1).transpose(1, 2, 0), y[-1] > 0.5


def evaluate(model: Repairer, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean over `pairs` of: "psnr" (repaired vs clean), "psnr_input" (damaged vs clean), "iou" (found vs damaged
    mask), "clean_psnr" (the clean crop repaired vs itself, capped at 100 dB where it comes back unchanged)."""
    model.eval()
    out: dict[str, list[float]] = {"psnr": [], "psnr_input": [], "iou": [], "clean_psnr": []}
    for clean, damaged, mask in pairs:
        repaired, found = repair(model, damaged)
        out["psnr"].append(metrics.psnr(repaired, clean))
        out["psnr_input"].append(metrics.psnr(damaged, clean))
        out["iou"].append(float((found & mask).sum() / max(1, (found | mask).sum())))
        out["clean_psnr"].append(min(100.0, metrics.psnr(repair(model, clean)[0], clean)))
    model.train()
    return {k: float(np.mean(v)) for k, v in out.items()}


def init_weights(name_or_path: str, config: RepairerConfig) -> dict:
    """The weights of a repairer model file, checked to match `config`."""
    loaded = load_named(name_or_path, expected_kind="repairer")
    if loaded.config != config:
        raise UserError(f"init_from={name_or_path!r} is a {loaded.config}, but this run trains a {config}")
    return loaded.module.state_dict()


# -------------------------------------------------------------------------------------------------------- the loop
def train_epoch(model, optimizer, cfg: RepairerTrainConfig, batches, epoch: int, epochs: int) -> list[dict]:
    """`cfg.steps_per_epoch` steps from `batches`, the learning rate set per step from the schedule over `epochs`."""
    total_steps = epochs * cfg.steps_per_epoch
    logs = []
    for step in range(cfg.steps_per_epoch):
        damaged, mask, clean = next(batches)
        lr = cfg.lr * lr_factor(cfg.lr_schedule, (epoch * cfg.steps_per_epoch + step) / total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(cfg, damaged.device):
            logs.append(repairer_step(model, optimizer, damaged, mask, clean, cfg))
    return logs


def train_loop_per_worker(config: dict) -> None:
    """The repairer's Ray Train loop (one call per worker)."""
    from ray.train.torch import prepare_model

    started = time.perf_counter()  # the time budget counts from here
    cfg, rank, world_size = worker.setup_worker(config, RepairerTrainConfig)

    # Load data: this worker's shard of the training images; on rank 0 the validation images with fixed damage.
    train_images = decode_rows(worker.shard_batches("train", 256), cfg.channels)
    val_pairs = validation_pairs(decode_rows(worker.validation_batches(64), cfg.channels), cfg)

    # Build the model and optimizer; resume from the checkpoint this attempt starts from, if any.
    torch.manual_seed(cfg.seed)
    model = Repairer(cfg.model_config())
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
        return train_epoch(model, optimizer, cfg, batches, epoch, planned)

    def validate() -> dict[str, float]:
        return {f"val_{k}": v for k, v in evaluate(net, val_pairs).items()}

    worker.run_epochs("repairer", cfg, net, optimizer, start_epoch, started, train, validate if val_pairs else None)
