"""The DCGAN's training maths in plain PyTorch: losses, one adversarial step, EMA, optimisers, grids, a feature distance.

GAN objective: I. Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014. D maximises
log D(x) + log(1 - D(G(z))); G uses the paper's non-saturating alternative, maximising log D(G(z)), which gives
strong gradients early on when D rejects every sample. Optimiser and hyper-parameters from A. Radford, L. Metz,
S. Chintala, "Unsupervised Representation Learning with Deep Convolutional Generative Adversarial Networks",
ICLR 2016 (arXiv:1511.06434): Adam, learning rate 2e-4, beta1 = 0.5.

No Ray here: the Ray Train loop calls these functions; every source of randomness is an explicit generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Adam

from restoration.models.dcgan import DCGAN

FEATURE_SEED = 0  # seed of the fixed random network behind `feature_distance`; changing it changes every number


def _bce(logits: Tensor, target: float) -> Tensor:
    """Mean binary cross-entropy of sigmoid(logits) against a constant label, computed stably from the logits."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def d_loss(d_real_logits: Tensor, d_fake_logits: Tensor) -> Tensor:
    """Discriminator loss -[log D(x) + log(1 - D(G(z)))], as BCE-with-logits: real -> 1, fake -> 0.

    Args:
        d_real_logits: (B,) D's logits on real images.
        d_fake_logits: (B',) D's logits on generated images.
    Returns:
        The scalar loss, the sum of the two batch means.
    """
    return _bce(d_real_logits, 1.0) + _bce(d_fake_logits, 0.0)


def g_loss_nonsaturating(d_fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss -log D(G(z)), as BCE-with-logits against the label 1.

    Args:
        d_fake_logits: (B,) D's logits on generated images.
    Returns:
        The scalar batch-mean loss.
    """
    return _bce(d_fake_logits, 1.0)


def gan_step(
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: Tensor,
    latent_dim: int,
    generator_rng: torch.Generator,
    labels: Tensor | None = None,
) -> dict[str, float]:
    """One D update then one G update on a batch of real images, both nets in training mode.

    For a class-conditional GAN, `labels` are the real images' classes, and the fakes are made for the same classes
    (so D sees the data's class frequencies on both sides): D judges (x, y) pairs, G makes G(z, y).

    The modules are only called, never unwrapped, so DistributedDataParallel-wrapped nets work. Each forward
    through D is followed by its own backward: a DDP-wrapped D with BatchNorm re-broadcasts its buffers in place
    at every forward, and on torch releases without the fix of pytorch/pytorch#175851 (the dependency pin allows
    them) two forwards before one backward fail autograd's version check (pytorch/pytorch#22095, #175024).

    Args:
        generator: maps z (B, latent_dim) to images (B, C, S, S) in [-1, 1].
        discriminator: maps images (B, C, S, S) to logits (B,).
        opt_g, opt_d: optimisers over the generator's and the discriminator's parameters.
        real: (B, C, S, S) real images scaled to [-1, 1], on the nets' device.
        latent_dim: size of z.
        generator_rng: source of z; it draws on its own device, and z is moved to `real`'s device.
        labels: (B,) int64 class ids of `real` for a conditional GAN, on the nets' device; None otherwise.
    Returns:
        {"d_loss", "g_loss": the losses before each update, "d_real", "d_fake": mean D(x) and mean D(G(z)) as
        probabilities, measured in the D update}.
    """
    if real.ndim != 4:
        raise ValueError(f"real must have shape (B, C, S, S), got {tuple(real.shape)}")
    generator.train()
    discriminator.train()
    z = torch.randn(real.shape[0], latent_dim, generator=generator_rng, device=generator_rng.device)
    z = z.to(device=real.device, dtype=real.dtype)  # (B, latent_dim)

    # Update D. Real and generated images go through D as separate batches, so each BN sees one kind only.
    opt_d.zero_grad(set_to_none=True)
    d_real_logits = discriminator(real, labels)  # (B,)
    loss_real = _bce(d_real_logits, 1.0)
    loss_real.backward()
    fake = generator(z, labels)  # (B, C, S, S); reused by the G update below
    d_fake_logits = discriminator(fake.detach(), labels)  # (B,)
    loss_fake = _bce(d_fake_logits, 0.0)
    loss_fake.backward()
    opt_d.step()

    # Update G. D (just updated) judges the same fakes; D's gradients from this pass are cleared by the next step.
    opt_g.zero_grad(set_to_none=True)
    loss_g = g_loss_nonsaturating(discriminator(fake, labels))
    loss_g.backward()
    opt_g.step()

    return {
        "d_loss": (loss_real + loss_fake).item(),
        "g_loss": loss_g.item(),
        "d_real": torch.sigmoid(d_real_logits.detach()).mean().item(),
        "d_fake": torch.sigmoid(d_fake_logits.detach()).mean().item(),
    }


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float = 0.999) -> None:
    """Move an exponential moving average of the weights one step: ema <- decay * ema + (1 - decay) * model.

    Buffers (BatchNorm running statistics, counters) are copied, not averaged. Parameters and buffers are matched
    in order, so a DDP-wrapped `model` works against a plain `ema_model` copy.

    Args:
        ema_model: the averaged copy, updated in place (it may live on another device).
        model: the trained model.
        decay: weight of the old average, in [0, 1]; 0 copies the model.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay={decay!r}: expected a value in [0, 1]")
    for what, ema_tensors, tensors in (
        ("parameters", list(ema_model.parameters()), list(model.parameters())),
        ("buffers", list(ema_model.buffers()), list(model.buffers())),
    ):
        if len(ema_tensors) != len(tensors):
            raise ValueError(f"ema_model has {len(ema_tensors)} {what}, model has {len(tensors)}: not the same net")
        for i, (ema, value) in enumerate(zip(ema_tensors, tensors, strict=True)):
            if ema.shape != value.shape:
                raise ValueError(f"{what} #{i}: ema_model has shape {tuple(ema.shape)}, model {tuple(value.shape)}")
            value = value.detach().to(device=ema.device, dtype=ema.dtype)
            if what == "parameters":
                ema.lerp_(value, 1.0 - decay)
            else:
                ema.copy_(value)


def make_optimizers(model: DCGAN, lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999)) -> tuple[Adam, Adam]:
    """Adam for each net with the paper's settings (beta1 = 0.5: the default 0.9 made training oscillate).

    Build them before wrapping the nets in DDP: the wrapped modules share these parameters.

    Args:
        model: the GAN.
        lr: learning rate of both optimisers.
        betas: Adam's (beta1, beta2).
    Returns:
        (opt_g, opt_d), the order `gan_step` takes them in.
    """
    if not lr > 0:
        raise ValueError(f"lr={lr!r}: expected a value > 0")
    opt_g = Adam(model.generator.parameters(), lr=lr, betas=betas)
    opt_d = Adam(model.discriminator.parameters(), lr=lr, betas=betas)
    return opt_g, opt_d


def _random_features(images: Tensor) -> Tensor:
    """Features of (N, C, H, W) images in [0, 1] from a fixed, untrained net: (N, 64 + 16 C + 2), float64.

    Three random He-initialised convs (3x3 to 16 channels, 4x4 stride 2 to 32, 4x4 stride 2 to 64) with ReLU, averaged over
    space (64), plus the image average-pooled to 4x4 (16 C) and each image's pixel mean and std (2). The weights come
    from a generator seeded with FEATURE_SEED, so the features are the same in every process and on every call.
    """
    c = images.shape[1]
    rng = torch.Generator().manual_seed(FEATURE_SEED)
    shapes = [(16, c, 3, 3), (32, 16, 4, 4), (64, 32, 4, 4)]
    # He et al. 2015: std sqrt(2 / fan_in) keeps the activations' scale through the ReLUs.
    weights = [torch.randn(s, generator=rng) * math.sqrt(2.0 / (s[1] * s[2] * s[3])) for s in shapes]
    out = []
    for chunk in images.detach().float().cpu().split(256):
        x = F.relu(F.conv2d(chunk - 0.5, weights[0], padding=1))  # (n, 16, H, W)
        x = F.relu(F.conv2d(x, weights[1], stride=2, padding=1))  # (n, 32, H/2, W/2)
        x = F.relu(F.conv2d(x, weights[2], stride=2, padding=1))  # (n, 64, H/4, W/4)
        pooled = F.adaptive_avg_pool2d(chunk, 4).flatten(1)  # (n, 16 C)
        stats = torch.stack([chunk.mean((1, 2, 3)), chunk.std((1, 2, 3))], dim=1)  # (n, 2)
        out.append(torch.cat([x.mean((2, 3)), pooled, stats], dim=1).double())
    return torch.cat(out)


def _frechet(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D):
    |mu_x - mu_y|^2 + tr(S_x) + tr(S_y) - 2 tr((S_x^1/2 S_y S_x^1/2)^1/2), symmetric-eigenvalue form of FID's trace."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    evals, evecs = np.linalg.eigh(s_x)
    root_x = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T  # S_x^1/2
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_x @ s_y @ root_x), 0, None)).sum()
    distance = np.sum((mu_x - mu_y) ** 2) + np.trace(s_x) + np.trace(s_y) - 2.0 * cross
    return float(max(distance, 0.0))


def feature_distance(a: Tensor, b: Tensor) -> float:
    """How far apart two image sets are in the statistics of simple, fixed features (lower is closer; 0 = same).

    The Fréchet distance (the formula of FID, Heusel et al. 2017) between Gaussians fitted to features from a fixed,
    seeded, untrained conv net plus 4x4-pooled pixels and per-image pixel mean/std (see `_random_features`). It
    needs no trained weights, so tests and training logs can use it to show a GAN learning; its values are not
    comparable with published FID numbers. Like FID it is biased upwards for small sets: compare numbers computed
    with the same set sizes, next to the real-vs-real value.

    Args:
        a: (N, C, H, W) images in [0, 1], N >= 2.
        b: (M, C, H, W) images in [0, 1], M >= 2, the same C, H, W as `a`.
    Returns:
        The distance, >= 0.
    """
    for name, images in (("a", a), ("b", b)):
        if images.ndim != 4 or images.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N >= 2, C, H, W), got {tuple(images.shape)}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"a and b must hold images of the same (C, H, W): {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}"
        )
    return _frechet(_random_features(a).numpy(), _random_features(b).numpy())
