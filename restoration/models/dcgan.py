"""DCGAN: a generator of transposed convolutions and a discriminator of strided convolutions.

A. Radford, L. Metz, S. Chintala, "Unsupervised Representation Learning with Deep Convolutional Generative
Adversarial Networks", ICLR 2016 (arXiv:1511.06434). The paper's architecture guidelines, all followed here:
no pooling (strided convolutions in D, fractionally-strided ones in G), BatchNorm in both nets except G's output and
D's input layer, ReLU in G with tanh at the output, LeakyReLU(0.2) in D, no fully connected hidden layers, and
weights drawn from N(0, 0.02).

Both nets mirror each other across a fixed resolution layout: at each resolution they use the same channel
multiplier of their base width (`g_width` = ngf, `d_width` = ndf):

    image_size 28:  7 (4x) -> 14 (2x) -> 28          (the usual MNIST-sized variant; the first kernel is 7x7)
    image_size 32:  4 (4x) ->  8 (2x) -> 16 (1x) -> 32
    image_size 64:  4 (8x) ->  8 (4x) -> 16 (2x) -> 32 (1x) -> 64   (the paper's 64x64 LSUN/ImageNet layout)

D ends in a logit with no sigmoid: losses use BCE-with-logits, which is the same objective computed stably.
The whole GAN is one model file of kind "dcgan"; synthesis only runs `DCGAN.generator` (or `DCGAN.sample`).

Class-conditional when `DCGANConfig.labels` names the classes (empty: unconditional, the files from before). G takes
the label as a one-hot vector beside z (M. Mirza, S. Osindero, "Conditional Generative Adversarial Nets",
arXiv:1411.1784): its first layer is linear in its input, so this is the same as a learned label embedding. D is a
projection discriminator (T. Miyato, M. Koyama, "cGANs with Projection Discriminator", ICLR 2018):
logit(x, y) = psi(phi(x)) + <embed(y), phi(x)>, with phi(x) D's last feature map flattened and psi its final layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# image_size -> (side of the first feature map, channel multiplier of each feature map from smallest to largest).
LAYOUTS: dict[int, tuple[int, tuple[int, ...]]] = {
    28: (7, (4, 2)),
    32: (4, (4, 2, 1)),
    64: (4, (8, 4, 2, 1)),
}


@dataclass(frozen=True)
class DCGANConfig:
    image_size: int = 28  # 28 (Fashion-MNIST), 32 or 64
    channels: int = 1  # 1 (gray) or 3 (RGB)
    latent_dim: int = 100  # z ~ N(0, I) of this size; the paper uses 100
    g_width: int = 64  # generator base width (ngf); the widest layer has multiplier x ngf channels
    d_width: int = 64  # discriminator base width (ndf)
    labels: tuple[str, ...] = ()  # class names, index = class id; empty: unconditional

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))  # a JSON round trip gives a list
        check_label_names(self.labels, "DCGANConfig.labels")
        if self.image_size not in LAYOUTS:
            raise ValueError(
                f"DCGANConfig.image_size={self.image_size!r}: expected one of {', '.join(map(str, LAYOUTS))}"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"DCGANConfig.channels={self.channels!r}: expected 1 (gray) or 3 (RGB)")
        for name in ("latent_dim", "g_width", "d_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DCGANConfig.{name}={value!r}: expected an int >= 1")

    @property
    def num_classes(self) -> int:
        """Number of classes: 0 for an unconditional GAN."""
        return len(self.labels)


def check_label_names(labels: tuple[str, ...], what: str) -> None:
    """Refuse class names that a `--labels NAME:COUNT,...` list could not spell: each a non-empty string of letters,
    digits, '-' or '_', not all digits (digits are class ids), no two alike.

    Args:
        labels: the names, index = class id.
        what: how errors call the names, e.g. "DCGANConfig.labels".
    """
    for name in labels:
        if not isinstance(name, str) or not name or name.isdigit() or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"{what}: {name!r} is not a class name (letters, digits, '-' or '_', not only digits)")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{what}: names appear twice in {list(labels)}")


def check_class_ids(labels: Tensor | None, n: int, num_classes: int, who: str) -> None:
    """Refuse labels that do not fit a net: a conditional one needs n class ids in [0, num_classes), an
    unconditional one (num_classes 0) takes none."""
    if num_classes == 0:
        if labels is not None:
            raise ValueError(f"{who} is unconditional: it takes no labels")
        return
    if labels is None:
        raise ValueError(f"{who} is class-conditional ({num_classes} classes): it needs labels")
    if labels.shape != (n,) or labels.dtype != torch.long:
        raise ValueError(
            f"{who} expects labels of shape ({n},) and dtype int64, got {tuple(labels.shape)} {labels.dtype}"
        )
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{who}: class ids must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")


def weights_init(module: nn.Module) -> None:
    """DCGAN initialisation, for `model.apply(weights_init)`: conv weights N(0, 0.02), BN weight N(1, 0.02), bias 0.

    Args:
        module: one submodule; modules other than (transposed) convolutions and BatchNorm are left alone.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):  # the projection discriminator's class vectors, on D's weights' scale
        nn.init.normal_(module.weight, 0.0, 0.02)


class UpBlock(nn.Module):
    """ConvTranspose2d + BatchNorm + ReLU: G's hidden layer. A bias before BN is redundant, so the conv has none."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DownBlock(nn.Module):
    """Conv2d(4, stride 2, padding 1) halving H and W, optional BatchNorm, LeakyReLU(0.2): D's hidden layer."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Generator(nn.Module):
    """z (B, latent_dim) [, labels (B,)] -> image (B, C, S, S) in [-1, 1].

    A conditional generator reads [z, one_hot(label)] (B, latent_dim + num_classes) where the layouts below say z.

    For image_size 28 and ngf = g_width:
        z (B, latent, 1, 1) -> (B, 4*ngf, 7, 7) -> (B, 2*ngf, 14, 14) -> tanh (B, C, 28, 28)
    For 64: (B, 8*ngf, 4, 4) -> (B, 4*ngf, 8, 8) -> (B, 2*ngf, 16, 16) -> (B, ngf, 32, 32) -> (B, C, 64, 64).
    """

    def __init__(self, config: DCGANConfig):
        super().__init__()
        self.config = config
        first, mults = LAYOUTS[config.image_size]
        widths = [m * config.g_width for m in mults]
        # Project z to the first feature map: a transposed conv of a 1x1 input with kernel `first` and no padding
        # is the paper's "project and reshape" (a fully connected layer) written as a convolution.
        blocks = [UpBlock(config.latent_dim + config.num_classes, widths[0], first, 1, 0)]
        # Each later block doubles H and W: (H - 1) * 2 - 2 * 1 + 4 = 2H.
        blocks += [UpBlock(w_in, w_out, 4, 2, 1) for w_in, w_out in zip(widths[:-1], widths[1:], strict=True)]
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.ConvTranspose2d(widths[-1], config.channels, 4, 2, 1, bias=False)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        latent, classes = self.config.latent_dim, self.config.num_classes
        if z.ndim != 2 or z.shape[1] != latent:
            raise ValueError(f"Generator expects z of shape (B, {latent}), got {tuple(z.shape)}")
        check_class_ids(labels, z.shape[0], classes, "Generator")
        if classes:
            z = torch.cat([z, F.one_hot(labels, classes).to(z.dtype)], dim=1)  # (B, latent + classes)
        x = self.blocks(z[:, :, None, None])  # (B, ngf * mults[-1], S/2, S/2)
        return torch.tanh(self.to_image(x))  # (B, C, S, S)


class Discriminator(nn.Module):
    """image (B, C, S, S) in [-1, 1] [, labels (B,)] -> real/fake logits (B,).

    For image_size 28 and ndf = d_width (the mirror image of the generator):
        (B, C, 28, 28) -> (B, 2*ndf, 14, 14) -> (B, 4*ndf, 7, 7) -> conv 7x7 valid -> (B, 1, 1, 1) -> (B,)
    The first layer has no BatchNorm (the paper: BN on D's input layer made training unstable).
    """

    def __init__(self, config: DCGANConfig):
        super().__init__()
        self.config = config
        first, mults = LAYOUTS[config.image_size]
        widths = [m * config.d_width for m in reversed(mults)]
        blocks = [DownBlock(config.channels, widths[0], batch_norm=False)]
        blocks += [DownBlock(w_in, w_out, batch_norm=True) for w_in, w_out in zip(widths[:-1], widths[1:], strict=True)]
        self.blocks = nn.Sequential(*blocks)
        # A valid conv with kernel = the last map's side reads the whole map: the paper's final linear layer.
        self.to_logit = nn.Conv2d(widths[-1], 1, first, 1, 0, bias=False)
        # Projection: one vector per class, the size of the flattened last feature map (the input of `to_logit`).
        if config.num_classes:
            self.embed = nn.Embedding(config.num_classes, widths[-1] * first * first)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        c, s = self.config.channels, self.config.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"Discriminator expects images of shape (B, {c}, {s}, {s}), got {tuple(x.shape)}")
        check_class_ids(labels, x.shape[0], self.config.num_classes, "Discriminator")
        h = self.blocks(x)  # (B, ndf * mults[0], first, first)
        logits = self.to_logit(h).flatten()  # (B,)
        if labels is not None:
            logits = logits + (self.embed(labels) * h.flatten(1)).sum(1)  # + <embed(y), phi(x)>
        return logits


class DCGAN(nn.Module):
    """The generator and discriminator of one GAN, saved and loaded together as a "dcgan" model file."""

    def __init__(self, config: DCGANConfig):
        super().__init__()
        if not isinstance(config, DCGANConfig):
            raise TypeError(f"DCGAN expects a DCGANConfig, got {type(config).__name__}")
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        self.apply(weights_init)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.generator(z, labels)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        truncation: float | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Draw n images from the generator.

        The generator runs in eval mode (BatchNorm uses its running statistics), so each image depends only on its
        own z, not on which other images share the batch; the module's mode is restored afterwards.

        Args:
            n: number of images (>= 1).
            generator: source of z, see `sample_latent`; None uses torch's global generator.
            truncation: psi > 0 for the truncation trick (see `sample_latent`), or None for z ~ N(0, I).
            labels: (n,) int64 class ids for a conditional GAN (None: classes drawn uniformly from `generator`,
                after z); must be None for an unconditional one.
        Returns:
            (n, C, S, S) images in [0, 1], on the model's device.
        """
        parameter = next(self.generator.parameters())
        device = generator.device if generator is not None else parameter.device
        z = sample_latent(n, self.config.latent_dim, generator, truncation, device)  # (n, latent)
        if labels is None and self.config.num_classes:
            labels = torch.randint(self.config.num_classes, (n,), generator=generator, device=device)
        if labels is not None:
            labels = labels.to(parameter.device)
        was_training = self.generator.training
        self.generator.eval()
        try:
            z = z.to(device=parameter.device, dtype=parameter.dtype)
            images = self.generator(z, labels)  # (n, C, S, S) in [-1, 1]
        finally:
            self.generator.train(was_training)
        return ((images + 1) / 2).clamp(0, 1)


def sample_latent(
    n: int,
    latent_dim: int,
    generator: torch.Generator | None = None,
    truncation: float | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw latent codes z ~ N(0, I), optionally truncated.

    Truncation trick (A. Brock, J. Donahue, K. Simonyan, "Large Scale GAN Training for High Fidelity Natural Image
    Synthesis", ICLR 2019): every entry with |z| > psi is redrawn from N(0, 1) until none is left, so each entry
    follows a normal truncated to [-psi, psi]. Smaller psi trades variety for fidelity; psi -> inf is no truncation.
    Redrawing takes about log(n * latent_dim) / P(|z| <= psi) rounds, so psi is expected to be around 0.3 or more.

    Args:
        n: number of codes (>= 1).
        latent_dim: size of each code.
        generator: source of randomness; None uses torch's global generator.
        truncation: psi > 0, or None.
        device: where to draw; must be the generator's device when one is given (None: the generator's, or CPU).
    Returns:
        (n, latent_dim) float32 codes.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r}: expected an int >= 1")
    if truncation is not None and not (truncation > 0 and math.isfinite(truncation)):
        raise ValueError(f"truncation={truncation!r}: expected a finite psi > 0, or None")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    z = torch.randn(n, latent_dim, generator=generator, device=device)  # (n, latent_dim)
    if truncation is not None:
        outside = z.abs() > truncation
        while outside.any():
            z[outside] = torch.randn(int(outside.sum()), generator=generator, device=device)
            outside = z.abs() > truncation
    return z
