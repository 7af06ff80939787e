"""The restorer's training core in plain PyTorch: noise, one optimisation step, PSNR evaluation, a training loop.

Gaussian denoising as in DnCNN: K. Zhang, W. Zuo, Y. Chen, D. Meng, L. Zhang, "Beyond a Gaussian Denoiser:
Residual Learning of Deep CNN for Image Denoising", IEEE TIP 2017 (arXiv:1608.03981). Clean patches x in [0, 1],
noisy y = x + n with n ~ N(0, (σ/255)^2) not clipped, loss (1/2N) Σ ||f(y_i) - x_i||^2 (f returns the restored
image), blind training with σ ~ U[0, 55] per patch (DnCNN-B).

No Ray here: the Ray Train loop calls these functions; every source of randomness is an explicit generator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoration import degrade
from restoration.train.patches import PatchSampler

LOSSES = ("l2", "l1")
LR_SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class NoiseSpec:
    """Additive white Gaussian noise on the 0-255 scale.

    Set `sigma` for a fixed level, or `sigma_range=(lo, hi)` for blind training with σ ~ U[lo, hi] drawn per
    patch (DnCNN-B uses (0, 55)). When `sigma_range` is set it takes precedence and `sigma` is ignored.
    """

    sigma: float | None = 25.0
    sigma_range: tuple[float, float] | None = None

    def __post_init__(self):
        if self.sigma_range is not None:
            lo, hi = self.sigma_range
            if not (0 <= lo <= hi and math.isfinite(hi)):
                raise ValueError(f"sigma_range must be (lo, hi) with 0 <= lo <= hi < inf, got {self.sigma_range!r}")
        elif self.sigma is None:
            raise ValueError("NoiseSpec needs sigma or sigma_range; both are None")
        elif not (0 <= self.sigma < math.inf):
            raise ValueError(f"sigma must be a finite value >= 0 (0-255 scale), got {self.sigma!r}")


def add_noise(clean: Tensor, spec: NoiseSpec, generator: torch.Generator) -> Tensor:
    """Add Gaussian noise N(0, (σ/255)^2) to each patch; the result is not clipped.

    Args:
        clean: (B, C, H, W) images in [0, 1].
        spec: the noise level (fixed, or a range drawn from per patch).
        generator: source of randomness, on the same device as `clean`.

    Returns:
        (B, C, H, W) noisy images, same dtype and device as `clean`.
    """
    if clean.ndim != 4:
        raise ValueError(f"clean must have shape (B, C, H, W), got {tuple(clean.shape)}")
    kwargs = dict(generator=generator, device=clean.device, dtype=clean.dtype)
    if spec.sigma_range is not None:
        lo, hi = spec.sigma_range
        sigma = lo + (hi - lo) * torch.rand((clean.shape[0], 1, 1, 1), **kwargs)  # (B, 1, 1, 1), one σ per patch
    else:
        sigma = spec.sigma
    return clean + torch.randn(clean.shape, **kwargs) * (sigma / 255.0)


@dataclass(frozen=True)
class DegradeMix:
    """Per-patch random degradations for one model that restores several kinds of damage at once.

    Each patch independently goes through: Gaussian blur with probability `blur_p` (σ_blur ~ U[0.3, blur_max]
    pixels), then Gaussian noise with probability `noise_p` (σ ~ U[sigma_range], 0-255 scale, not clipped), then
    JPEG with probability `jpeg_p` (quality ~ U{quality_range}, 4:2:0 chroma subsampling for colour as real JPEG
    files have; JPEG quantises to 8 bits, so a noisy patch is clipped there). The degradation model follows the
    blur -> noise -> JPEG order of Real-ESRGAN (Wang et al., ICCVW 2021), in its mild first-order form. Patches that
    draw nothing stay clean, which teaches the model to leave clean images alone.
    """

    noise_p: float = 0.7
    sigma_range: tuple[float, float] = (0.0, 55.0)
    jpeg_p: float = 0.4
    quality_range: tuple[int, int] = (10, 90)
    blur_p: float = 0.2
    blur_max: float = 1.5

    def __post_init__(self):
        for name in ("noise_p", "jpeg_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)!r}")
        NoiseSpec(sigma=None, sigma_range=tuple(self.sigma_range))
        lo, hi = self.quality_range
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"quality_range must be (lo, hi) with 1 <= lo <= hi <= 100, got {self.quality_range!r}")
        if not self.blur_max >= 0.3:
            raise ValueError(f"blur_max must be >= 0.3 pixels, got {self.blur_max!r}")


def degrade_patches(clean: np.ndarray, mix: DegradeMix, rng: np.random.Generator) -> np.ndarray:
    """Degrade each patch of a batch with its own random draw from `mix`.

    Args:
        clean: (B, C, H, W) float32 patches in [0, 1], C in {1, 3}.
        mix: the degradation probabilities and ranges.
        rng: source of randomness.
    Returns:
        (B, C, H, W) float32 degraded patches.
    """
    out = np.empty_like(clean)
    for i, patch in enumerate(clean):
        x = patch.transpose(1, 2, 0)  # (H, W, C), what `degrade` works on
        if rng.random() < mix.blur_p:
            x = degrade.gaussian_blur(x, float(rng.uniform(0.3, mix.blur_max)))
        if rng.random() < mix.noise_p:
            x = degrade.gaussian_noise(x, float(rng.uniform(*mix.sigma_range)), rng)
        if rng.random() < mix.jpeg_p:
            x = degrade.jpeg(np.clip(x, 0.0, 1.0), int(rng.integers(mix.quality_range[0], mix.quality_range[1] + 1)))
        out[i] = x.transpose(2, 0, 1)
    return out


def restorer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, noisy: Tensor, clean: Tensor, loss: str = "l2"
) -> dict[str, float]:
    """One optimisation step of a restorer whose output is the restored image.

    DnCNN's loss (1/2N) Σ ||f(y) - x||^2 is the mean squared error up to a constant factor, so "l2" is
    `F.mse_loss`; "l1" is `F.l1_loss`.

    Args:
        model: maps (B, C, H, W) degraded images to (B, C, H, W) restored ones.
        optimizer: optimiser over the model's parameters (Adam in `fit_restorer`).
        noisy: (B, C, H, W) model input, on the model's device.
        clean: (B, C, H, W) target, on the model's device.
        loss: "l2" or "l1".

    Returns:
        {"loss": value of the loss before the update}.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    model.train()
    restored = model(noisy)
    value = F.mse_loss(restored, clean) if loss == "l2" else F.l1_loss(restored, clean)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    return {"loss": value.item()}


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Re-estimate every BatchNorm's running mean and variance as the plain average over `batches`.

    The running statistics that training leaves behind are an exponential average over the last few dozen batches,
    each from a different mix of noise levels, taken while the weights were still moving; measured on a colour
    denoiser mid-training they cost 1.8-2.9 dB at σ = 25 against statistics re-estimated on 50 fresh batches with
    the final weights. Recalibration leaves the weights untouched and restores the model's train/eval mode.

    Args:
        model: the restorer (unwrapped, not DDP: statistics are per process anyway).
        batches: degraded (B, C, H, W) model inputs drawn like the training batches, on the model's device.
    Returns:
        The number of batches seen.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    was_training = model.training
    model.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return seen


def _psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB with data range 1 over the whole tensor."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _center_crop(image: np.ndarray, max_side: int | None) -> np.ndarray:
    if max_side is None:
        return image
    h, w = image.shape[:2]
    top, left = max(0, (h - max_side) // 2), max(0, (w - max_side) // 2)
    return image[top : top + max_side, left : left + max_side]


@torch.inference_mode()
def evaluate_psnr(
    model: nn.Module, clean_images: list[np.ndarray], spec: NoiseSpec, seed: int = 0, max_side: int | None = None
) -> dict[str, float]:
    """Mean PSNR of the model on noisy versions of clean images (the DnCNN evaluation protocol).

    Each image gets seeded noise (drawn on the CPU, so the numbers do not depend on the device) that is not
    clipped before the model; the model output is clipped to [0, 1] and compared with the clean image over the
    whole image, data range 1. The noisy input's PSNR is measured on the unclipped noisy image. With a
    `sigma_range` spec each image draws its own σ from the range.

    Args:
        model: the restorer; it is run in eval mode and put back in the mode it was in.
        clean_images: float arrays (H, W, C) in [0, 1].
        spec: the noise to add.
        seed: seed of the noise; the same seed and images give the same noisy inputs.
        max_side: when set, evaluate on the central crop of at most max_side x max_side pixels to bound the cost.

    Returns:
        {"psnr": mean PSNR of the restored images, "psnr_input": mean PSNR of the noisy inputs}.
    """
    if not clean_images:
        raise ValueError("clean_images is empty; expected at least one (H, W, C) array")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive integer or None, got {max_side!r}")
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    psnr, psnr_input = [], []
    try:
        for i, image in enumerate(clean_images):
            if image.ndim != 3:
                raise ValueError(f"clean_images[{i}] has shape {image.shape}; expected (H, W, C)")
            crop = np.ascontiguousarray(_center_crop(image, max_side), dtype=np.float32)
            clean = torch.from_numpy(crop).permute(2, 0, 1)[None]  # (1, C, H, W)
            noisy = add_noise(clean, spec, generator)
            restored = model(noisy.to(device=parameter.device, dtype=parameter.dtype)).float().cpu().clamp(0, 1)
            psnr.append(_psnr(restored, clean))
            psnr_input.append(_psnr(noisy, clean))
    finally:
        model.train(was_training)
    return {"psnr": float(np.mean(psnr)), "psnr_input": float(np.mean(psnr_input))}


@dataclass(frozen=True)
class FitConfig:
    """Options of `fit_restorer`.

    Training stops after `steps` steps or once `time_budget_s` seconds of wall time are spent, whichever comes
    first; the learning-rate schedule follows the progress max(step / steps, elapsed / time_budget_s), so a
    time-limited run still anneals to the end of its schedule.
    """

    patch_size: int = 40  # DnCNN-S trains on 40x40 patches at σ=25
    batch_size: int = 64
    lr: float = 1e-3
    steps: int = 1000
    time_budget_s: float | None = None
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    loss: str = "l2"
    seed: int = 0
    lr_schedule: str = "cosine"  # "cosine" to 0; "step": x0.1 at 50% and x0.01 at 75% of progress; "constant"
    val_every: int | None = None  # steps between validation passes; None validates only once, at the end
    val_max_side: int | None = None  # central crop for validation, see `evaluate_psnr`

    def __post_init__(self):
        for name in ("patch_size", "batch_size", "steps"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 seconds or None, got {self.time_budget_s!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.val_every is not None and (int(self.val_every) != self.val_every or self.val_every < 1):
            raise ValueError(f"val_every must be a positive integer or None, got {self.val_every!r}")


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the base learning rate at a training progress in [0, 1].

    Args:
        schedule: "cosine" (0.5 (1 + cos(π progress)), SGDR without restarts), "step" (1, then 0.1 from 50%,
            then 0.01 from 75%) or "constant".
        progress: fraction of training done.

    Returns:
        The factor in [0, 1].
    """
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    if schedule == "constant":
        return 1.0
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def fit_restorer(
    model: nn.Module,
    train_images: list[np.ndarray],
    config: FitConfig,
    val_images: list[np.ndarray] | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Train a restorer on random noisy patches with Adam, in plain PyTorch.

    The model stays on the device it is on; patches are sampled on the CPU and moved there.

    Args:
        model: maps (B, C, H, W) noisy images to restored ones; trained in place.
        train_images: float32 arrays (H, W, C) in [0, 1], as returned by `load_images`.
        config: the training options.
        val_images: clean images for `evaluate_psnr` every `config.val_every` steps and at the end.
        log: called with {"step", "loss", "lr", "seconds"} after every step and with {"step", "val_psnr",
            "val_psnr_input", "seconds"} after every validation pass.

    Returns:
        History {"steps": steps done, "loss": per-step losses, "val": [{"step", "psnr", "psnr_input"}, ...],
        "seconds": wall time of the loop without the final validation, "stopped": "steps" or "time_budget"}.
    """
    parameter = next(model.parameters())
    device = parameter.device
    sampler = PatchSampler(train_images, config.patch_size, np.random.default_rng(config.seed))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history = {"steps": 0, "loss": [], "val": [], "seconds": 0.0, "stopped": "steps"}

    def validate(step: int, seconds: float) -> None:
        metrics = evaluate_psnr(model, val_images, config.noise, seed=config.seed, max_side=config.val_max_side)
        history["val"].append({"step": step, **metrics})
        if log is not None:
            log(
                {"step": step, "val_psnr": metrics["psnr"], "val_psnr_input": metrics["psnr_input"], "seconds": seconds}
            )

    start = time.perf_counter()
    step = 0
    while step < config.steps:
        elapsed = time.perf_counter() - start
        if config.time_budget_s is not None and elapsed >= config.time_budget_s:
            history["stopped"] = "time_budget"
            break
        progress = step / config.steps
        if config.time_budget_s is not None:
            progress = max(progress, elapsed / config.time_budget_s)
        lr = config.lr * lr_factor(config.lr_schedule, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Sample a batch.
        clean = torch.from_numpy(sampler.sample(config.batch_size))  # (B, C, p, p)
        clean = clean.to(device=device, dtype=parameter.dtype, non_blocking=True)

        # Degrade.
        noisy = add_noise(clean, config.noise, generator)

        # Update weights.
        metrics = restorer_step(model, optimizer, noisy, clean, loss=config.loss)
        step += 1
        history["loss"].append(metrics["loss"])
        if log is not None:
            log({"step": step, "loss": metrics["loss"], "lr": lr, "seconds": time.perf_counter() - start})

        # Validate.
        if val_images and config.val_every is not None and step % config.val_every == 0:
            validate(step, time.perf_counter() - start)

    history["steps"] = step
    history["seconds"] = time.perf_counter() - start
    if val_images and (not history["val"] or history["val"][-1]["step"] != step):
        validate(step, history["seconds"])
    return history
