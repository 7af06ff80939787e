"""Convolutional variational autoencoder.

D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014 (arXiv:1312.6114). An encoder q(z|x) =
N(mu(x), diag(exp(logvar(x)))) and a decoder p(x|z) are trained together by maximising the evidence lower bound

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || N(0, I)),

with the expectation estimated by one reparameterised sample z = mu + exp(logvar / 2) * eps, eps ~ N(0, I), and the
KL term in closed form (the paper's Appendix B). `beta` weights the KL term as in I. Higgins et al., "beta-VAE:
Learning Basic Visual Concepts with a Constrained Variational Framework", ICLR 2017; beta = 1 is the plain ELBO.

Likelihoods p(x|z) over pixels in [0, 1]:
- "bernoulli": the decoder outputs logits and the reconstruction term is the binary cross-entropy summed over pixels,
  as the paper does for MNIST (grey levels act as soft targets, the usual practice for non-binarised images).
- "gaussian": the decoder outputs means and p(x|z) = N(mean, GAUSSIAN_SIGMA^2) per pixel with a fixed variance.

The nets use no normalisation layers, so an image depends only on its own z: a sample is the same whichever batch
it was drawn in, which is what makes seeded synthesis reproducible across worker counts.

Sampling prior. Training fits q(z|x) against N(0, I), but the aggregate posterior q(z) = E_x q(z|x) never fills
N(0, I) exactly, and decoding z from the holes gives the blurred in-between shapes that VAE samples are known for.
With `prior_components = K > 0` the model also holds a K-component Gaussian mixture with full covariances, fitted
after training to samples of q(z) (ex-post density estimation, as in P. Ghosh et al., "From Variational to
Deterministic Autoencoders", ICLR 2020), and `sample` draws z from it; the loss is untouched. On the bundled
Fashion-MNIST model it lowers FID from 103.7 to about 51 (README, Quality).

Class-conditional when `VAEConfig.labels` names the classes (empty: unconditional, the files from before): the
conditional VAE of K. Sohn, H. Lee, X. Yan, "Learning Structured Output Representation using Deep Conditional
Generative Models", NeurIPS 2015, with the class y as the condition. The encoder q(z|x, y) reads y's one-hot vector
beside its conv features, the decoder p(x|z, y) beside z; the prior p(z|y) is N(0, I) and the ELBO keeps its form.
Both read y through a linear layer, so the decoder also takes soft conditions (B, classes) between one-hot vectors:
that is how one z is moved from one class to another (`restoration synthesize --mode interpolate --labels A,B`).
The sampling prior of a conditional VAE is one K-component mixture per class, fitted to that class's q(z|x, y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoration.models.dcgan import check_class_ids, check_label_names

LIKELIHOODS = ("bernoulli", "gaussian")
# Number of stride-2 stages and the spatial side they reach: 28 -> 14 -> 7; 32 -> 16 -> 8 -> 4; 64 -> ... -> 4.
LAYOUTS = {28: (2, 7), 32: (3, 4), 64: (4, 4)}
# Fixed standard deviation of the "gaussian" likelihood on the [0, 1] pixel scale. 0.1 (about 25 grey levels) makes
# the reconstruction term 50 x (squared error) per pixel, strong enough against the KL term to avoid posterior
# collapse without the near-deterministic autoencoder that a tiny sigma gives.
GAUSSIAN_SIGMA = 0.1


@dataclass(frozen=True)
class VAEConfig:
    image_size: int = 28  # 28, 32 or 64
    channels: int = 1  # 1 (gray) or 3 (RGB)
    latent_dim: int = 16  # dimensions of z
    width: int = 32  # channels of the first conv; each stride-2 stage doubles them
    likelihood: str = "bernoulli"  # "bernoulli" (decoder outputs logits) or "gaussian" (decoder outputs means)
    beta: float = 1.0  # weight of the KL term (beta-VAE when != 1)
    prior_components: int = 0  # 0: sample z ~ N(0, I); K: from a K-component mixture fitted to the posterior
    labels: tuple[str, ...] = ()  # class names, index = class id; empty: unconditional (mixture prior: K per class)
    # Conditional VAE only: `decode` gives the decoder the class vector moved away from the uniform mix of classes,
    # c + class_guidance * (c - 1/classes), so that samples show their class more plainly (0: the class vector as
    # trained). Training and the ELBO never use it; it is set on a trained model (scripts/bundle_generator.py).
    class_guidance: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))  # a JSON round trip gives a list
        check_label_names(self.labels, "VAEConfig.labels")
        if self.image_size not in LAYOUTS:
            raise ValueError(
                f"VAEConfig.image_size={self.image_size!r}: expected one of {', '.join(map(str, LAYOUTS))}"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"VAEConfig.channels={self.channels!r}: expected 1 (gray) or 3 (RGB)")
        for name in ("latent_dim", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VAEConfig.{name}={value!r}: expected an int >= 1")
        k = self.prior_components
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"VAEConfig.prior_components={k!r}: expected an int >= 0 (0: the standard normal prior)")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"VAEConfig.likelihood={self.likelihood!r}: expected one of {', '.join(LIKELIHOODS)}")
        beta = self.beta
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not (0 <= beta < math.inf):
            raise ValueError(f"VAEConfig.beta={beta!r}: expected a finite number >= 0")
        w = self.class_guidance
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not (0 <= w < math.inf):
            raise ValueError(f"VAEConfig.class_guidance={w!r}: expected a finite number >= 0")
        if w and not self.labels:
            raise ValueError(
                f"VAEConfig.class_guidance={w!r}: only a conditional VAE (labels set) has classes to guide"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes: 0 for an unconditional VAE."""
        return len(self.labels)


def stage_widths(config: VAEConfig) -> list[int]:
    """Channels after each stride-2 encoder stage: width, 2 width, 4 width, ... (the decoder mirrors them)."""
    stages, _ = LAYOUTS[config.image_size]
    return [config.width * 2**i for i in range(stages)]


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw z ~ N(mu, exp(logvar)) as mu + exp(logvar / 2) * eps, differentiable in mu and logvar.

    Args:
        mu, logvar: (B, D) posterior means and log-variances.
        generator: source of eps. eps is drawn on the generator's device and moved to mu's, so a CPU generator gives
            the same z on any device; None uses the global generator of mu's device.
    Returns:
        (B, D) samples.
    """
    device = mu.device if generator is None else generator.device
    eps = torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype).to(mu.device)
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form (Kingma & Welling 2014, Appendix B).

    Args:
        mu, logvar: (B, D).
    Returns:
        (B,) -0.5 * sum_d (1 + logvar - mu^2 - exp(logvar)), in nats.
    """
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def reconstruction_nll(x: Tensor, recon: Tensor, likelihood: str) -> Tensor:
    """-log p(x|z) per example, summed over every pixel and channel.

    Args:
        x: (B, C, H, W) targets in [0, 1].
        recon: (B, C, H, W) decoder output: logits ("bernoulli") or means ("gaussian").
        likelihood: "bernoulli" or "gaussian".
    Returns:
        (B,) negative log-likelihoods in nats.
    """
    if likelihood == "bernoulli":
        # -[x log sigmoid(l) + (1 - x) log(1 - sigmoid(l))], computed stably from the logits l.
        nll = F.binary_cross_entropy_with_logits(recon, x, reduction="none")
    elif likelihood == "gaussian":
        # -log N(x; mean, s^2) = (x - mean)^2 / (2 s^2) + log(2 pi s^2) / 2; the constant keeps it a true NLL.
        s2 = GAUSSIAN_SIGMA**2
        nll = 0.5 * (x - recon).pow(2) / s2 + 0.5 * math.log(2 * math.pi * s2)
    else:
        raise ValueError(f"likelihood={likelihood!r}: expected one of {', '.join(LIKELIHOODS)}")
    return nll.flatten(1).sum(dim=1)


def elbo_loss(
    x: Tensor, recon: Tensor, mu: Tensor, logvar: Tensor, likelihood: str, beta: float = 1.0
) -> dict[str, Tensor]:
    """The negative (beta-weighted) ELBO, averaged over the batch.

    Args:
        x: (B, C, H, W) targets in [0, 1].
        recon: (B, C, H, W) decoder output for a sample of q(z|x): logits or means, see `reconstruction_nll`.
        mu, logvar: (B, D) the posterior q(z|x).
        likelihood: "bernoulli" or "gaussian".
        beta: weight of the KL term.
    Returns:
        {"loss": mean of (recon_nll + beta * kl), "recon": mean recon_nll, "kl": mean kl}, scalar tensors in nats
        per image; "loss" carries the gradient.
    """
    if x.shape != recon.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but recon has {tuple(recon.shape)}; expected equal shapes")
    recon_nll = reconstruction_nll(x, recon, likelihood)  # (B,)
    kl = kl_divergence(mu, logvar)  # (B,)
    return {"loss": (recon_nll + beta * kl).mean(), "recon": recon_nll.mean(), "kl": kl.mean()}


class Encoder(nn.Module):
    """x (B, C, S, S) in [0, 1] [, condition (B, classes)] -> (mu, logvar), each (B, latent_dim): stride-2 4x4 convs,
    then one linear layer (over the conv features and, when conditional, the one-hot class)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        _, side = LAYOUTS[config.image_size]
        layers, in_channels = [], config.channels
        for out_channels in stage_widths(config):
            # k=4, s=2, p=1 halves the side exactly: (S + 2 - 4) / 2 + 1 = S / 2.
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.ReLU()]
            in_channels = out_channels
        self.convs = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels * side * side + config.num_classes, 2 * config.latent_dim)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        c, s = self.config.channels, self.config.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"VAE expects input of shape (B, {c}, {s}, {s}), got {tuple(x.shape)}")
        h = self.convs(x).flatten(1)  # (B, width * 2^(stages-1) * side * side)
        if condition is not None:
            h = torch.cat([h, condition], dim=1)  # (B, features + classes)
        mu, logvar = self.head(h).chunk(2, dim=1)  # (B, D), (B, D)
        return mu, logvar


class Decoder(nn.Module):
    """z (B, latent_dim) [, condition (B, classes)] -> (B, C, S, S) logits or means: one linear layer (over z and,
    when conditional, the class vector), then stride-2 4x4 transposed convs."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        _, self.side = LAYOUTS[config.image_size]
        widths = stage_widths(config)[::-1]  # e.g. [4w, 2w, w] for 32
        self.top = widths[0]
        self.project = nn.Linear(config.latent_dim + config.num_classes, self.top * self.side * self.side)
        layers = []
        for in_channels, out_channels in zip(widths, widths[1:] + [config.channels], strict=True):
            # k=4, s=2, p=1 doubles the side exactly: (S - 1) * 2 - 2 + 4 = 2 S.
            layers += [nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1), nn.ReLU()]
        self.deconvs = nn.Sequential(*layers[:-1])  # no ReLU after the last layer: it outputs logits or means

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        d = self.config.latent_dim
        if z.ndim != 2 or z.shape[1] != d:
            raise ValueError(f"VAE decoder expects z of shape (B, {d}), got {tuple(z.shape)}")
        if condition is not None:
            z = torch.cat([z, condition], dim=1)  # (B, D + classes)
        h = F.relu(self.project(z)).view(-1, self.top, self.side, self.side)  # (B, top, side, side)
        return self.deconvs(h)  # (B, C, S, S)


class VAE(nn.Module):
    """Convolutional VAE with a diagonal Gaussian posterior and a standard normal prior; class-conditional (CVAE)
    when `config.labels` is set, and then every method that encodes or decodes takes the classes `labels`."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise TypeError(f"VAE expects a VAEConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        k, d, c = config.prior_components, config.latent_dim, config.num_classes
        if k:
            # The sampling prior: mixture weights, means and Cholesky factors of the covariances, one mixture per
            # class for a conditional VAE (a leading (classes,) dimension). Until `set_prior` it is K copies of
            # N(0, I), which is N(0, I) itself.
            lead = (c,) if c else ()
            self.register_buffer("prior_weights", torch.full((*lead, k), 1.0 / k))  # ([C,] K)
            self.register_buffer("prior_means", torch.zeros(*lead, k, d))  # ([C,] K, D)
            self.register_buffer("prior_scale_tril", torch.eye(d).repeat(*lead, k, 1, 1))  # ([C,] K, D, D)

    def condition(self, labels: Tensor | None, n: int) -> Tensor | None:
        """The class vectors the nets read: None for an unconditional VAE, else one-hot vectors of class ids.

        Args:
            labels: (n,) int64 class ids, or (n, classes) floating-point class weights (rows of non-negative weights
                summing to 1, e.g. (1 - a) onehot(i) + a onehot(j) between two classes); None for an unconditional VAE.
            n: the batch size the labels must match.
        Returns:
            None, or (n, classes) in the decoder's dtype and on its device.
        """
        c = self.config.num_classes
        weight = self.decoder.project.weight
        if labels is not None and labels.is_floating_point():
            if not c:
                raise ValueError("VAE is unconditional: it takes no labels")
            if labels.shape != (n, c) or (labels < 0).any() or (labels.sum(1) - 1).abs().max() > 1e-4:
                raise ValueError(
                    f"VAE class weights must have shape ({n}, {c}), be >= 0 and sum to 1 per row, "
                    f"got shape {tuple(labels.shape)}"
                )
            return labels.to(weight.device, weight.dtype)
        check_class_ids(labels, n, c, "VAE")
        return None if labels is None else F.one_hot(labels.to(weight.device), c).to(weight.dtype)

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, draw z, decode: what the ELBO needs.

        In training mode z is a reparameterised sample of q(z|x) (drawn with `generator`); in eval mode z = mu, so
        eval-mode outputs are deterministic (`evaluate_elbo` samples explicitly instead of relying on this).

        Args:
            x: (B, C, S, S) images in [0, 1].
            generator: source of the posterior sample in training mode.
            labels: (B,) int64 class ids of a conditional VAE (None for an unconditional one).
        Returns:
            (recon, mu, logvar): (B, C, S, S) logits ("bernoulli") or means ("gaussian"), and (B, D) twice.
        """
        y = self.condition(labels, x.shape[0])  # (B, classes) or None
        mu, logvar = self.encoder(x, y)  # (B, D), (B, D)
        z = reparameterize(mu, logvar, generator) if self.training else mu  # (B, D)
        return self.decoder(z, y), mu, logvar

    def encode(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, C, S, S) images in [0, 1] [and their classes (B,)] -> (mu, logvar), each (B, D)."""
        return self.encoder(x, self.condition(labels, x.shape[0]))

    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, D) latents [and classes: (B,) ids or (B, classes) weights] -> (B, C, S, S) images in [0, 1]: the mean
        of p(x|z[, y]), with the class vector guided by `config.class_guidance`."""
        condition = self.condition(labels, z.shape[0])  # (B, classes) or None
        w = self.config.class_guidance
        if condition is not None and w:
            condition = condition + w * (condition - 1.0 / self.config.num_classes)
        out = self.decoder(z, condition)
        # The mean of a Bernoulli is sigmoid(logit); a Gaussian mean is unbounded, so clamp it to the pixel range.
        return torch.sigmoid(out) if self.config.likelihood == "bernoulli" else out.clamp(0, 1)

    def set_prior(self, weights: Tensor, means: Tensor, scale_tril: Tensor) -> None:
        """Set the sampling prior's mixture: weights (K,) summing to 1, means (K, D), lower-triangular Cholesky
        factors (K, D, D) of the covariances with positive diagonals; a conditional VAE takes one mixture per class,
        (classes, K), (classes, K, D), (classes, K, D, D), each class's weights summing to 1."""
        k, d = self.config.prior_components, self.config.latent_dim
        if not k:
            raise ValueError("this VAE samples from N(0, I): build it with VAEConfig.prior_components > 0")
        weights, means, scale_tril = (
            torch.as_tensor(t, dtype=self.prior_means.dtype) for t in (weights, means, scale_tril)
        )
        lead = tuple(self.prior_weights.shape[:-1])  # (classes,) or ()
        if weights.shape != (*lead, k) or means.shape != (*lead, k, d) or scale_tril.shape != (*lead, k, d, d):
            raise ValueError(
                f"prior of shapes {tuple(weights.shape)}, {tuple(means.shape)}, {tuple(scale_tril.shape)}: "
                f"expected {(*lead, k)}, {(*lead, k, d)}, {(*lead, k, d, d)}"
            )
        if (weights < 0).any() or (weights.sum(-1) - 1).abs().max() > 1e-4:
            raise ValueError("prior weights must be >= 0 and sum to 1")
        if not torch.equal(scale_tril, scale_tril.tril()) or (scale_tril.diagonal(dim1=-2, dim2=-1) <= 0).any():
            raise ValueError("prior scale_tril must be lower-triangular with a positive diagonal")
        self.prior_weights.copy_(weights)
        self.prior_means.copy_(means)
        self.prior_scale_tril.copy_(scale_tril)

    def prior_latents(self, eps: Tensor, u: Tensor, labels: Tensor | None = None) -> Tensor:
        """Map standard normal draws to draws of the sampling prior.

        Args:
            eps: (B, D) draws of N(0, I).
            u: (B,) draws of U[0, 1) choosing each row's mixture component (unused with the N(0, I) prior).
            labels: a conditional VAE's classes: (B,) ids, each row drawn from its class's mixture, or (B, classes)
                weights, each row drawn from the classes' mixtures mixed by them (0.5/0.5: a z typical of both
                classes, which `--mode interpolate --labels A,B` keeps while the condition moves).
        Returns:
            (B, D) latents: eps itself, or mean_k + L_k eps with k the component whose cumulative weight passes u.
        """
        if not self.config.prior_components:
            return eps
        weights, means, tril = self.prior_weights.double(), self.prior_means, self.prior_scale_tril
        u = u.to(weights.device, torch.float64).contiguous()
        if self.config.num_classes:
            # Every class's components side by side, weighted by the row's class weights: (B, classes * K).
            y = self.condition(labels, eps.shape[0]).to(weights.device, torch.float64)  # (B, classes)
            cumulative = (y[:, :, None] * weights).flatten(1).cumsum(1)  # (B, classes * K)
            k = torch.searchsorted(cumulative, u[:, None], right=True)[:, 0]  # (B,)
            means, tril = means.flatten(0, 1), tril.flatten(0, 1)  # (classes * K, D), (classes * K, D, D)
        else:
            cumulative = weights.cumsum(0)  # (K,)
            k = torch.searchsorted(cumulative, u, right=True)  # (B,)
        k = k.clamp_max(len(means) - 1)
        means, tril = means.to(eps.dtype)[k], tril.to(eps.dtype)[k]  # (B, D), (B, D, D)
        return means + (tril @ eps.unsqueeze(-1)).squeeze(-1)

    def sample(self, n: int, generator: torch.Generator | None = None, labels: Tensor | None = None) -> Tensor:
        """Draw n images from the model: z from the sampling prior (N(0, I) or the fitted mixture), then `decode`.

        Args:
            n: number of images (>= 0).
            generator: source of z, drawn on the generator's device and moved to the model's, so a CPU generator
                gives the same latents on any device; None uses the global generator of the model's device.
            labels: (n,) int64 class ids for a conditional VAE (None: classes drawn uniformly from `generator`,
                after z and the component draws); must be None for an unconditional one.
        Returns:
            (n, C, S, S) images in [0, 1] on the model's device.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n={n!r}: expected an int >= 0")
        weight = self.decoder.project.weight
        device = weight.device if generator is None else generator.device
        z = torch.randn((n, self.config.latent_dim), generator=generator, device=device, dtype=weight.dtype)
        z = z.to(weight.device)
        u = (
            torch.rand((n,), generator=generator, device=device, dtype=torch.float64)
            if self.config.prior_components
            else None
        )
        if labels is None and self.config.num_classes:
            labels = torch.randint(self.config.num_classes, (n,), generator=generator, device=device)
        if self.config.prior_components:
            z = self.prior_latents(z, u, labels)
        return self.decode(z, labels)  # (n, C, S, S)

    def reconstruct(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Deterministic reconstruction decode(mu(x[, y])): (B, C, S, S) in [0, 1] -> (B, C, S, S) in [0, 1]."""
        mu, _ = self.encode(x, labels)
        return self.decode(mu, labels)
