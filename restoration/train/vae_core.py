"""The VAE's training core in plain PyTorch: KL warm-up, one optimisation step, held-out ELBO, image grids.

The objective is the negative ELBO of D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014
(arXiv:1312.6114), with the KL term weighted by beta (Higgins et al., ICLR 2017). The linear KL warm-up from 0 follows
S. R. Bowman et al., "Generating Sentences from a Continuous Space", CoNLL 2016 (their "KL cost annealing"): early in
training the reconstruction term shapes the latent space before the prior pulls the posteriors together.

No Ray here: the Ray Train loop calls these functions; every source of randomness is an explicit generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from restoration.models.vae import VAE, elbo_loss, kl_divergence, reconstruction_nll


def _unwrap(model: nn.Module) -> VAE:
    """The VAE itself, also when it is wrapped by DistributedDataParallel (which keeps it in `.module`)."""
    vae = getattr(model, "module", model)
    if not isinstance(vae, VAE):
        raise TypeError(f"expected a VAE (or a DDP-wrapped VAE), got {type(vae).__name__}")
    return vae


def kl_weight(step: int, warmup_steps: int, beta: float) -> float:
    """Weight of the KL term at a step: linear warm-up from 0 to beta, then beta.

    Args:
        step: optimisation steps done so far (>= 0).
        warmup_steps: length of the warm-up; 0 gives beta from the first step.
        beta: the final weight (`VAEConfig.beta`).
    Returns:
        beta * min(1, step / warmup_steps).
    """
    if step < 0:
        raise ValueError(f"step={step!r}: expected >= 0")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r}: expected >= 0 (0 means no warm-up)")
    if warmup_steps == 0:
        return float(beta)
    return float(beta) * min(1.0, step / warmup_steps)


def vae_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    beta: float,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
) -> dict[str, float]:
    """One optimisation step on the negative ELBO, with one reparameterised posterior sample per image.

    The forward pass goes through `model` itself, so a DistributedDataParallel wrapper all-reduces the gradients;
    the likelihood is read from the wrapped VAE's config.

    Args:
        model: a `VAE`, or a DDP-wrapped one.
        optimizer: optimiser over the model's parameters (Adam in the training loop).
        x: (B, C, S, S) images in [0, 1], on the model's device.
        beta: weight of the KL term for this step (see `kl_weight`).
        generator: source of the posterior samples, on the model's device or the CPU.
        labels: (B,) int64 class ids of a conditional VAE, on the model's device (None for an unconditional one).
    Returns:
        {"loss", "recon", "kl"}: batch means in nats per image, before the update.
    """
    vae = _unwrap(model)
    model.train()
    recon, mu, logvar = model(x, generator=generator, labels=labels)  # (B, C, S, S), (B, D), (B, D)
    losses = elbo_loss(x, recon, mu, logvar, vae.config.likelihood, beta)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    # One device-to-host copy for the three numbers instead of three.
    values = torch.stack([losses[k].detach() for k in ("loss", "recon", "kl")]).tolist()
    return dict(zip(("loss", "recon", "kl"), values, strict=True))


@torch.no_grad()
def evaluate_elbo(
    model: nn.Module, images: Tensor, batch_size: int = 256, seed: int = 0, labels: Tensor | None = None
) -> dict[str, float]:
    """Negative ELBO (beta = 1) of held-out images, with one posterior sample per image from a fixed seed.

    The samples are drawn on the CPU from `seed`, so the same model and images give the same numbers on any device
    and with any `batch_size` (up to float rounding).

    Args:
        model: a `VAE`, or a DDP-wrapped one; run in eval mode and put back in the mode it was in.
        images: (N, C, S, S) floating-point images in [0, 1], on any device.
        batch_size: images per forward pass.
        seed: seed of the posterior samples.
        labels: (N,) int64 class ids of the images, for a conditional VAE.
    Returns:
        {"neg_elbo", "recon", "kl"}: means over the images, in nats per image (neg_elbo = recon + kl).
    """
    vae = _unwrap(model)
    if images.ndim != 4 or len(images) == 0 or not images.is_floating_point():
        raise ValueError(
            f"images must be a non-empty floating-point (N, C, S, S) tensor, got {tuple(images.shape)} {images.dtype}"
        )
    lo, hi = images.min().item(), images.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"images must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected >= 1")
    parameter = vae.decoder.project.weight
    # All eps drawn at once, in image order: torch's CPU sampler does not promise that splitting one draw into
    # several smaller ones yields the same numbers, and the result must not depend on batch_size.
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn((len(images), vae.config.latent_dim), generator=generator, dtype=parameter.dtype)  # (N, D)
    was_training = vae.training
    vae.eval()
    # Sums stay on the device (in float64) until the end: one host sync per call, not per batch.
    recon_sum = torch.zeros((), dtype=torch.float64, device=parameter.device)
    kl_sum = torch.zeros((), dtype=torch.float64, device=parameter.device)
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device=parameter.device, dtype=parameter.dtype)
            y = None if labels is None else vae.condition(labels[start : start + len(x)], len(x))  # (b, classes)
            mu, logvar = vae.encoder(x, y)  # (b, D), (b, D)
            z = mu + torch.exp(0.5 * logvar) * eps[start : start + len(x)].to(mu.device)  # (b, D), reparameterised
            recon = vae.decoder(z, y)  # (b, C, S, S) logits or means
            recon_sum += reconstruction_nll(x, recon, vae.config.likelihood).double().sum()
            kl_sum += kl_divergence(mu, logvar).double().sum()
    finally:
        vae.train(was_training)
    n, recon_sum, kl_sum = len(images), recon_sum.item(), kl_sum.item()
    return {"neg_elbo": (recon_sum + kl_sum) / n, "recon": recon_sum / n, "kl": kl_sum / n}


@torch.no_grad()
def fit_latent_prior(
    model: nn.Module, images: Tensor, seed: int = 0, batch_size: int = 1000, labels: Tensor | None = None
) -> dict[str, float]:
    """Fit the VAE's sampling prior to its aggregate posterior q(z) and store it in the model (`VAE.set_prior`).

    One z ~ q(z|x) per image, then a Gaussian mixture with `prior_components` full-covariance components, fitted by EM
    from a k-means start (scikit-learn's `GaussianMixture`). Fitting to draws of q(z|x) rather than to the means mu(x)
    covers the posterior's spread too; on Fashion-MNIST it gives the lower FID of the two.

    Args:
        model: a `VAE` built with `prior_components > 0`, or a DDP-wrapped one; its mode is kept.
        images: (N, C, S, S) images, uint8 or floating point in [0, 1], N >= prior_components; on any device.
        seed: seeds the posterior draws and the mixture's initialisation.
        batch_size: images per encoder pass.
        labels: (N,) int64 class ids of the images, for a conditional VAE: one mixture per class, fitted to the draws
            of q(z|x, y) of that class's images (each class needs >= prior_components images).
    Returns:
        {"components", "images", "iterations", "log_likelihood"}: the last is the mean log density of the draws
        under the fitted mixture, in nats per image (for a conditional VAE: under their class's mixture; iterations:
        the most any class's fit took).
    """
    from sklearn.mixture import GaussianMixture

    vae = _unwrap(model)
    k = vae.config.prior_components
    if not k:
        raise ValueError("the model samples from N(0, I): build it with prior_components > 0 to fit a prior")
    if images.ndim != 4 or len(images) < k:
        raise ValueError(f"images of shape {tuple(images.shape)}: expected (N, C, S, S) with N >= {k} (components)")
    classes = vae.config.num_classes
    if classes and (labels is None or labels.shape != (len(images),)):
        raise ValueError(f"a conditional VAE's prior is fitted per class: expected labels of shape ({len(images)},)")
    if classes:
        counts = torch.bincount(labels.cpu(), minlength=classes)
        if int(counts.min()) < k:
            raise ValueError(f"class {int(counts.argmin())} has {int(counts.min())} images: expected >= {k} per class")
    parameter = vae.decoder.project.weight
    generator = torch.Generator().manual_seed(seed)
    was_training = vae.training
    vae.eval()
    draws = []
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(parameter.device)
            x = x.to(parameter.dtype).div(255) if not x.is_floating_point() else x.to(parameter.dtype)
            mu, logvar = vae.encode(x, None if labels is None else labels[start : start + batch_size])  # (b, D) x2
            eps = torch.randn(mu.shape, generator=generator, dtype=torch.float64)  # drawn on the CPU: any device
            draws.append(mu.double().cpu() + torch.exp(0.5 * logvar.double().cpu()) * eps)
    finally:
        vae.train(was_training)
    z = torch.cat(draws).numpy()  # (N, D) float64
    groups = [labels.cpu().numpy() == c for c in range(classes)] if classes else [np.ones(len(z), bool)]
    fits = [GaussianMixture(k, covariance_type="full", max_iter=200, random_state=seed).fit(z[g]) for g in groups]
    prior = [
        np.stack([m.weights_ / m.weights_.sum() for m in fits]),  # (groups, K)
        np.stack([m.means_ for m in fits]),  # (groups, K, D)
        np.stack([np.linalg.cholesky(m.covariances_) for m in fits]),  # (groups, K, D, D)
    ]
    vae.set_prior(*(torch.from_numpy(t if classes else t[0]) for t in prior))
    return {
        "components": k,
        "images": len(z),
        "iterations": max(int(m.n_iter_) for m in fits),
        "log_likelihood": float(sum(m.score(z[g]) * g.sum() for m, g in zip(fits, groups, strict=True)) / len(z)),
    }


def _grid(images: Tensor, columns: int, pad: int = 2) -> np.ndarray:
    """Tile (N, C, S, S) images in [0, 1], row-major, into one (H, W, 3) uint8 picture with grey `pad`-pixel gaps."""
    n, c, s, _ = images.shape
    rows = max(1, math.ceil(n / columns))
    images = images.detach().float().cpu().clamp(0, 1)
    if c == 1:
        images = images.expand(-1, 3, -1, -1)  # (N, 3, S, S), gray shown as RGB
    step = s + pad
    grid = torch.full((3, pad + rows * step, pad + columns * step), 0.5)  # (3, H, W)
    for i in range(n):
        top, left = pad + (i // columns) * step, pad + (i % columns) * step
        grid[:, top : top + s, left : left + s] = images[i]
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)


@torch.no_grad()
def reconstruction_grid(model: nn.Module, x: Tensor, n: int = 8, labels: Tensor | None = None) -> np.ndarray:
    """Originals on the first row, their deterministic reconstructions decode(mu) on the second.

    Args:
        model: a `VAE`, or a DDP-wrapped one.
        x: (B, C, S, S) images in [0, 1]; the first min(n, B) are shown.
        n: images per row.
        labels: (B,) int64 class ids of the images, for a conditional VAE.
    Returns:
        (H, W, 3) uint8 picture of 2 rows of min(n, B) images.
    """
    vae = _unwrap(model)
    if n < 1 or len(x) == 0:
        raise ValueError(f"need n >= 1 and at least one image, got n={n!r} and {len(x)} images")
    parameter = vae.decoder.project.weight
    originals = x[:n].to(device=parameter.device, dtype=parameter.dtype)  # (n, C, S, S)
    recons = vae.reconstruct(originals, None if labels is None else labels[:n])  # (n, C, S, S)
    return _grid(torch.cat([originals, recons]), columns=len(originals))


@torch.no_grad()
def prior_grid(model: nn.Module, n: int = 64, seed: int = 0) -> np.ndarray:
    """n samples of the sampling prior decoded, in a near-square grid; the same seed gives the same picture on any device.
    A conditional VAE's grid has one class per row instead, ceil(n / classes) images each.

    Args:
        model: a `VAE`, or a DDP-wrapped one.
        n: number of samples (>= 1).
        seed: seed of the latents, drawn on the CPU.
    Returns:
        (H, W, 3) uint8 picture with ceil(sqrt(n)) images per row.
    """
    vae = _unwrap(model)
    if n < 1:
        raise ValueError(f"n={n!r}: expected >= 1")
    classes = vae.config.num_classes
    if classes:
        columns = math.ceil(n / classes)
        labels = torch.arange(classes).repeat_interleave(columns)  # (classes * columns,)
        samples = vae.sample(len(labels), generator=torch.Generator().manual_seed(seed), labels=labels)
        return _grid(samples, columns=columns)
    samples = vae.sample(n, generator=torch.Generator().manual_seed(seed))  # (n, C, S, S)
    return _grid(samples, columns=math.ceil(math.sqrt(n)))
