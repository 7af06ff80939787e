"""Convolutional VAE and its training maths: tiny configs on CPU, a hand-computed ELBO, and one learning run."""

import math
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from skimage import data
from torch import nn
from torch.distributions import Normal

from restoration.checkpoint import load_model, save_model
from restoration.models import MODELS
from restoration.models.vae import (
    GAUSSIAN_SIGMA,
    VAE,
    VAEConfig,
    elbo_loss,
    kl_divergence,
    reparameterize,
)
from restoration.sources import read_idx
from restoration.train.vae_core import (
    evaluate_elbo,
    fit_latent_prior,
    kl_weight,
    prior_grid,
    reconstruction_grid,
    vae_step,
)

SIZES = [28, 32, 64]
CHANNELS = [1, 3]
LIKELIHOODS = ["bernoulli", "gaussian"]


def tiny(**overrides) -> VAEConfig:
    return VAEConfig(**{"latent_dim": 3, "width": 4, **overrides})


def camera_batch(n: int, size: int, channels: int) -> torch.Tensor:
    """n (<= 10) different crops of the camera photo, area-resized to (n, channels, size, size) in [0, 1]."""
    image = torch.from_numpy(data.camera()).float().div(255)  # (512, 512)
    crops = [image[24 * i : 24 * i + 256, 16 * i : 16 * i + 256] for i in range(n)]  # n x (256, 256)
    x = F.interpolate(torch.stack(crops)[:, None], size=(size, size), mode="area")  # (n, 1, size, size)
    return x.expand(-1, channels, -1, -1).contiguous()


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Tiny convs gain nothing from a second intra-op thread, and on a busy 2-core machine OpenMP threads waiting on
    # each other made the learning test 30x slower; the thread count is put back afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# Model shapes and behaviour.


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("size", SIZES)
def test_shapes_ranges_and_backward(size, channels, likelihood):
    config = tiny(image_size=size, channels=channels, likelihood=likelihood)
    model = VAE(config)
    x = camera_batch(3, size, channels)

    recon, mu, logvar = model(x)
    assert recon.shape == (3, channels, size, size)
    assert mu.shape == logvar.shape == (3, 3)
    loss = elbo_loss(x, recon, mu, logvar, likelihood)["loss"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    with torch.no_grad():
        enc_mu, enc_logvar = model.encode(x)
        assert enc_mu.shape == enc_logvar.shape == (3, 3)
        # decode/sample/reconstruct return images, not logits: in [0, 1] even for far-out latents.
        outputs = {
            "decode": model.decode(10 * torch.randn(5, 3)),
            "sample": model.sample(4),
            "reconstruct": model.reconstruct(x),
        }
    assert outputs["decode"].shape == (5, channels, size, size)
    assert outputs["sample"].shape == (4, channels, size, size)
    assert outputs["reconstruct"].shape == (3, channels, size, size)
    for name, out in outputs.items():
        assert out.min() >= 0 and out.max() <= 1, name


@pytest.mark.parametrize("size, sides", [(28, [14, 7]), (32, [16, 8, 4]), (64, [32, 16, 8, 4])])
def test_stride_layouts(size, sides):
    model = VAE(tiny(image_size=size))
    seen = {"enc": [], "dec": []}
    hooks = [
        m.register_forward_hook(lambda _m, _a, out, key=key: seen[key].append(out.shape[-1]))
        for key, cls in (("enc", nn.Conv2d), ("dec", nn.ConvTranspose2d))
        for m in model.modules()
        if isinstance(m, cls)
    ]
    with torch.no_grad():
        model(camera_batch(1, size, 1))
    for h in hooks:
        h.remove()
    assert seen["enc"] == sides
    assert seen["dec"] == sides[::-1][1:] + [size]


def test_forward_samples_in_train_mode_and_uses_mu_in_eval_mode():
    model = VAE(tiny())
    x = camera_batch(2, 28, 1)
    with torch.no_grad():
        mu, _ = model.encode(x)
        model.eval()
        assert torch.equal(model(x)[0], model.decoder(mu))
        model.train()
        a = model(x, generator=torch.Generator().manual_seed(3))[0]
        b = model(x, generator=torch.Generator().manual_seed(3))[0]
        c = model(x, generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, model.decoder(mu))


def test_sample_is_seeded_and_decode_is_per_image():
    model = VAE(tiny(channels=3, image_size=32))
    with torch.no_grad():
        a = model.sample(6, generator=torch.Generator().manual_seed(7))
        b = model.sample(6, generator=torch.Generator().manual_seed(7))
        c = model.sample(6, generator=torch.Generator().manual_seed(8))
        z = torch.randn(6, 3)
        # No batch statistics: an image depends only on its own latent.
        assert torch.allclose(model.decode(z)[:2], model.decode(z[:2]), atol=1e-6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_size": 30}, "image_size=30"),
        ({"channels": 2}, "channels=2"),
        ({"latent_dim": 0}, "latent_dim=0"),
        ({"width": 2.5}, "width=2.5"),
        ({"likelihood": "laplace"}, "likelihood='laplace'"),
        ({"beta": -1.0}, "beta=-1.0"),
        ({"beta": math.inf}, "beta=inf"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        VAEConfig(**overrides)


def test_input_shape_is_checked():
    model = VAE(tiny(image_size=32))
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\), got \(2, 1, 28, 28\)"):
        model(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, 3\), got \(2, 4\)"):
        model.decode(torch.zeros(2, 4))


# The ELBO, by hand.


def test_bernoulli_elbo_matches_hand_computation():
    # Two 1-channel 2x2 "images", decoder logits, and a 2-d posterior per image.
    x = [[0.0, 1.0, 0.25, 0.5], [1.0, 1.0, 0.0, 0.75]]
    logits = [[-2.0, 3.0, 0.5, 0.0], [1.5, -0.5, -1.0, 2.0]]
    mu = [[0.5, -1.0], [0.0, 2.0]]
    logvar = [[0.0, -0.5], [1.0, 0.3]]
    beta = 0.7

    def sigmoid(v):
        return 1 / (1 + math.exp(-v))

    recon = [
        -sum(xi * math.log(sigmoid(li)) + (1 - xi) * math.log(1 - sigmoid(li)) for xi, li in zip(xb, lb, strict=True))
        for xb, lb in zip(x, logits, strict=True)
    ]
    kl = [
        -0.5 * sum(1 + lv - m * m - math.exp(lv) for m, lv in zip(mb, lb, strict=True))
        for mb, lb in zip(mu, logvar, strict=True)
    ]
    expected_loss = sum(r + beta * k for r, k in zip(recon, kl, strict=True)) / 2

    out = elbo_loss(
        torch.tensor(x, dtype=torch.float64).view(2, 1, 2, 2),
        torch.tensor(logits, dtype=torch.float64).view(2, 1, 2, 2),
        torch.tensor(mu, dtype=torch.float64),
        torch.tensor(logvar, dtype=torch.float64),
        "bernoulli",
        beta=beta,
    )
    assert out["loss"].item() == pytest.approx(expected_loss, abs=1e-5)
    assert out["recon"].item() == pytest.approx(sum(recon) / 2, abs=1e-5)
    assert out["kl"].item() == pytest.approx(sum(kl) / 2, abs=1e-5)


def test_gaussian_elbo_matches_hand_computation():
    x = [[0.0, 1.0, 0.25, 0.5]]
    means = [[0.1, 0.8, 0.25, 0.9]]
    s2 = GAUSSIAN_SIGMA**2
    recon = sum(
        (xi - mi) ** 2 / (2 * s2) + 0.5 * math.log(2 * math.pi * s2) for xi, mi in zip(x[0], means[0], strict=True)
    )
    out = elbo_loss(
        torch.tensor(x).view(1, 1, 2, 2),
        torch.tensor(means).view(1, 1, 2, 2),
        torch.zeros(1, 2),
        torch.zeros(1, 2),
        "gaussian",
    )
    assert out["recon"].item() == pytest.approx(recon, abs=1e-5)
    assert out["kl"].item() == 0
    assert out["loss"].item() == pytest.approx(recon, abs=1e-5)
    # The same NLL torch.distributions gives for N(mean, sigma^2).
    reference = -Normal(torch.tensor(means), GAUSSIAN_SIGMA).log_prob(torch.tensor(x)).sum()
    assert out["recon"].item() == pytest.approx(reference.item(), abs=1e-4)


def test_kl_is_zero_at_the_prior_and_matches_torch_distributions():
    assert torch.equal(kl_divergence(torch.zeros(3, 5), torch.zeros(3, 5)), torch.zeros(3))
    mu = torch.randn(4, 6, dtype=torch.float64) * 2
    logvar = torch.randn(4, 6, dtype=torch.float64)
    reference = torch.distributions.kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    ours = kl_divergence(mu, logvar)
    assert ours.shape == (4,)
    assert torch.allclose(ours, reference, atol=1e-10)
    assert (ours > 0).all()


def test_unknown_likelihood_and_shape_mismatch_are_refused():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="likelihood='poisson'"):
        elbo_loss(x, x, torch.zeros(1, 2), torch.zeros(1, 2), "poisson")
    with pytest.raises(ValueError, match=r"recon has \(1, 1, 2, 3\)"):
        elbo_loss(x, torch.zeros(1, 1, 2, 3), torch.zeros(1, 2), torch.zeros(1, 2), "bernoulli")


def test_kl_weight_warm_up():
    assert [kl_weight(s, 4, 2.0) for s in (0, 1, 2, 4, 100)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    assert kl_weight(0, 0, 0.5) == 0.5
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        kl_weight(0, -1, 1.0)
    with pytest.raises(ValueError, match="step=-2"):
        kl_weight(-2, 10, 1.0)


def test_reparameterize_is_seeded_and_has_the_right_moments():
    mu = torch.tensor([1.0, -2.0]).expand(200_000, 2)
    logvar = torch.log(torch.tensor([4.0, 0.25])).expand(200_000, 2)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    assert torch.equal(z, reparameterize(mu, logvar, torch.Generator().manual_seed(0)))
    assert not torch.equal(z, reparameterize(mu, logvar, torch.Generator().manual_seed(1)))
    # Standard errors are std / sqrt(n) < 0.005; 0.02 is four of them or more.
    assert torch.allclose(z.mean(0), torch.tensor([1.0, -2.0]), atol=0.02)
    assert torch.allclose(z.std(0), torch.tensor([2.0, 0.5]), atol=0.02)
    # Differentiable: dz/dmu = 1, dz/dlogvar = 0.5 * exp(logvar / 2) * eps.
    m = torch.zeros(1, 3, requires_grad=True)
    lv = torch.zeros(1, 3, requires_grad=True)
    zz = reparameterize(m, lv, torch.Generator().manual_seed(0))
    zz.sum().backward()
    assert torch.equal(m.grad, torch.ones(1, 3))
    assert torch.allclose(lv.grad, 0.5 * zz.detach())


# Training maths.


def test_vae_step_updates_the_model_and_reports_the_weighted_elbo():
    model = VAE(tiny())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = camera_batch(4, 28, 1)
    before = [p.detach().clone() for p in model.parameters()]
    out = vae_step(model, optimizer, x, beta=0.25, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "recon", "kl"} and all(isinstance(v, float) for v in out.values())
    assert out["loss"] == pytest.approx(out["recon"] + 0.25 * out["kl"], rel=1e-6)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_vae_step_with_a_ddp_wrapped_model(tmp_path):
    """One-process gloo group: the DDP-wrapped step must do exactly what the plain step does."""
    x = camera_batch(4, 28, 1)
    plain = VAE(tiny())
    wrapped_inner = VAE(tiny())
    wrapped_inner.load_state_dict(plain.state_dict())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(wrapped_inner)
        outs = []
        for model in (plain, wrapped):
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            outs.append(vae_step(model, optimizer, x, beta=1.0, generator=torch.Generator().manual_seed(5)))
        assert outs[0] == pytest.approx(outs[1], rel=1e-6)
        for a, b in zip(plain.parameters(), wrapped_inner.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-7)
        assert evaluate_elbo(wrapped, x) == evaluate_elbo(plain, x)
    finally:
        dist.destroy_process_group()


def test_evaluate_elbo_is_seeded_batch_size_independent_and_restores_the_mode():
    model = VAE(tiny(likelihood="gaussian"))
    x = camera_batch(7, 28, 1)
    a = evaluate_elbo(model, x, batch_size=256)
    b = evaluate_elbo(model, x, batch_size=3)
    c = evaluate_elbo(model, x, seed=1)
    assert model.training  # put back in train mode
    assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
    assert a["neg_elbo"] != c["neg_elbo"]
    assert a["neg_elbo"] == pytest.approx(a["recon"] + a["kl"], rel=1e-9)
    # The same number computed by hand from one reparameterised sample per image.
    eps = torch.randn((7, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mu, logvar = model.encode(x)
        out = elbo_loss(x, model.decoder(mu + torch.exp(0.5 * logvar) * eps), mu, logvar, "gaussian")
    assert a["neg_elbo"] == pytest.approx(out["loss"].item(), rel=1e-5)
    bad = x.clone()
    bad[0, 0, 0, 0], bad[1, 0, 0, 0] = 2.0, -0.5
    with pytest.raises(ValueError, match=r"\[0, 1\], got values in \[-0.5, 2\]"):
        evaluate_elbo(model, bad)
    with pytest.raises(ValueError, match="floating-point"):
        evaluate_elbo(model, (x * 255).to(torch.uint8))


def test_grids():
    model = VAE(tiny())
    x = camera_batch(10, 28, 1)
    grid = reconstruction_grid(model, x, n=8)
    # 2 rows and 8 columns of 28-pixel images with a 2-pixel gap around each.
    assert grid.shape == (2 + 2 * 30, 2 + 8 * 30, 3) and grid.dtype == np.uint8
    first = (x[0, 0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(grid[2:30, 2:30, 0], first) and np.array_equal(grid[2:30, 2:30, 2], first)
    with torch.no_grad():
        recon = (model.reconstruct(x[:1])[0, 0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(grid[32:60, 2:30, 1], recon)

    colour = VAE(tiny(image_size=32, channels=3))
    samples = prior_grid(colour, n=10, seed=3)
    assert samples.shape == (2 + 3 * 34, 2 + 4 * 34, 3)  # ceil(sqrt(10)) = 4 columns, 3 rows
    assert np.array_equal(samples, prior_grid(colour, n=10, seed=3))
    assert not np.array_equal(samples, prior_grid(colour, n=10, seed=4))
    assert (samples[:2] == 128).all()  # the grey gap


# Model files.


def test_model_file_round_trip(tmp_path):
    assert MODELS["vae"] == (VAEConfig, VAE)
    config = tiny(image_size=32, channels=3, likelihood="gaussian", beta=4.0)
    model = VAE(config)
    path = tmp_path / "vae.pt"
    sha = save_model(path, "vae", config, model, meta={"dataset": "camera"})
    loaded = load_model(path, expected_kind="vae")
    assert loaded.kind == "vae" and loaded.config == config and loaded.sha256 == sha
    assert loaded.meta == {"dataset": "camera"}
    assert not loaded.module.training
    x = camera_batch(2, 32, 3)
    with torch.no_grad():
        assert torch.equal(loaded.module.reconstruct(x), model.reconstruct(x))
        assert torch.equal(
            loaded.module.sample(3, torch.Generator().manual_seed(1)),
            model.sample(3, torch.Generator().manual_seed(1)),
        )


# The sampling prior.


def two_component_prior(model: VAE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weights = torch.tensor([0.25, 0.75])
    means = torch.tensor([[5.0, 0.0, 0.0], [-5.0, 1.0, 2.0]])
    tril = torch.stack([torch.eye(3) * 0.5, torch.tensor([[1.0, 0, 0], [0.5, 2.0, 0], [0, 0, 0.1]])])
    model.set_prior(weights, means, tril)
    return weights, means, tril


def test_mixture_prior_picks_components_by_weight_and_survives_the_model_file(tmp_path):
    model = VAE(tiny(prior_components=2))
    eps = torch.randn(4, 3)
    assert torch.equal(model.prior_latents(eps, torch.rand(4)), eps)  # before fitting: K copies of N(0, I)
    _, means, tril = two_component_prior(model)

    # u below the first cumulative weight picks component 0, above it component 1: z = mean_k + L_k eps.
    z = model.prior_latents(eps, torch.tensor([0.1, 0.3, 0.9, 0.2499]))
    expected = torch.stack([means[k] + tril[k] @ e for k, e in zip([0, 1, 1, 0], eps, strict=True)])
    torch.testing.assert_close(z, expected)
    many = model.prior_latents(torch.randn(20000, 3), torch.rand(20000, dtype=torch.float64))
    assert abs((many[:, 0] > 0).double().mean().item() - 0.25) < 0.02
    torch.testing.assert_close(
        many[many[:, 0] < 0].std(0), torch.tensor([1.0, (0.25 + 4) ** 0.5, 0.1]), atol=0.05, rtol=0
    )

    path = tmp_path / "vae.pt"
    save_model(path, "vae", model.config, model)
    loaded = load_model(path, expected_kind="vae")
    assert loaded.config.prior_components == 2
    with torch.no_grad():
        a = loaded.module.sample(5, generator=torch.Generator().manual_seed(3))
        b = model.eval().sample(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bad_priors_are_refused():
    with pytest.raises(ValueError, match="prior_components=-1"):
        tiny(prior_components=-1)
    with pytest.raises(ValueError, match="N\\(0, I\\)"):
        VAE(tiny()).set_prior(torch.ones(1), torch.zeros(1, 3), torch.eye(3)[None])
    model = VAE(tiny(prior_components=2))
    good = (torch.tensor([0.5, 0.5]), torch.zeros(2, 3), torch.eye(3).repeat(2, 1, 1))
    with pytest.raises(ValueError, match="expected \\(2,\\), \\(2, 3\\), \\(2, 3, 3\\)"):
        model.set_prior(good[0], torch.zeros(3, 3), good[2])
    with pytest.raises(ValueError, match="sum to 1"):
        model.set_prior(torch.tensor([0.5, 0.6]), *good[1:])
    with pytest.raises(ValueError, match="lower-triangular"):
        model.set_prior(*good[:2], torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="prior_components > 0"):
        fit_latent_prior(VAE(tiny()), torch.rand(10, 1, 28, 28))


# Learning.


@pytest.mark.slow
def test_vae_learns_fashion_mnist(fashion_mnist):
    torch.manual_seed(0)
    train = torch.from_numpy(read_idx(f"{fashion_mnist}/train-images-idx3-ubyte.gz", 0, 10_000).copy())
    test = torch.from_numpy(read_idx(f"{fashion_mnist}/t10k-images-idx3-ubyte.gz", 0, 1000).copy())
    train = train.float().div(255)[:, None]  # (10000, 1, 28, 28)
    test = test.float().div(255)[:, None]  # (1000, 1, 28, 28)

    model = VAE(VAEConfig(image_size=28, channels=1, latent_dim=16, width=16))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    before = evaluate_elbo(model, test)["neg_elbo"]
    start = time.perf_counter()
    for step in range(120):
        batch = train[torch.randint(0, len(train), (64,), generator=generator)]
        vae_step(model, optimizer, batch, beta=kl_weight(step, 20, 1.0), generator=generator)
    after = evaluate_elbo(model, test)
    print(
        f"held-out negative ELBO: {before:.1f} -> {after['neg_elbo']:.1f} nats/image "
        f"(recon {after['recon']:.1f}, kl {after['kl']:.1f}), 120 steps in {time.perf_counter() - start:.1f} s"
    )
    # Untrained logits near 0 cost about 784 log 2 = 543 nats (585 measured); 120 steps reach about 300.
    assert after["neg_elbo"] <= 0.7 * before
    assert after["kl"] > 1  # the latents are used: no posterior collapse

    # The fitted sampling prior describes the held-out posterior better than N(0, I) does: a higher mean log density
    # of held-out draws z ~ q(z|x); the same seed gives the same fit.
    with_prior = VAE(VAEConfig(image_size=28, channels=1, latent_dim=16, width=16, prior_components=8))
    with_prior.load_state_dict(model.state_dict(), strict=False)
    fit = fit_latent_prior(with_prior, (train[:3000] * 255).round().to(torch.uint8), seed=1)
    again = VAE(with_prior.config)
    again.load_state_dict(model.state_dict(), strict=False)
    fit_latent_prior(again, (train[:3000] * 255).round().to(torch.uint8), seed=1)
    assert torch.equal(again.prior_means, with_prior.prior_means)
    with torch.no_grad():
        mu, logvar = model.eval().encode(test)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=torch.Generator().manual_seed(2))
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(with_prior.prior_weights),
        torch.distributions.MultivariateNormal(with_prior.prior_means, scale_tril=with_prior.prior_scale_tril),
    )
    held_out_mixture = mixture.log_prob(z).mean().item()
    held_out_normal = Normal(0.0, 1.0).log_prob(z).sum(1).mean().item()
    print(
        f"held-out log density of q(z) draws: N(0, I) {held_out_normal:.1f}, fitted 8-mixture {held_out_mixture:.1f} "
        f"nats (fit: {fit['iterations']} EM iterations, {fit['log_likelihood']:.1f} nats on its own draws)"
    )
    assert held_out_mixture > held_out_normal + 1.0
