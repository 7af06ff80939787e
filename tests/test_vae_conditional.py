"""The conditional VAE: class ids into encoder and decoder, class names in its file, files from before loading as
unconditional VAEs, a sampling prior per class, that it learns to use the class; synthesis of classes and the
interpolation between two classes (one z, the condition moving), with its refusals; one Ray Train run on labelled
shards."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from restoration import codec, storage
from restoration.checkpoint import load_model, load_named, save_model
from restoration.errors import UserError
from restoration.inference import GeneratorActor, latent_for, uniforms_for
from restoration.models.vae import VAE, VAEConfig
from restoration.pipelines.synthesize import SynthesizeConfig
from restoration.runs import read_output
from restoration.train import vae_core
from restoration.train.worker import FASHION_MNIST_LABELS


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these nets are tiny, and two threads on a busy 2-core machine spin-wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(labels=("top", "bottom"), prior_components: int = 0, seed: int = 0) -> VAE:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return VAE(VAEConfig(latent_dim=4, width=4, labels=labels, prior_components=prior_components))


def _with_prior(model: VAE, offset: float = 3.0) -> VAE:
    """A per-class prior with class c's two components at +-(c + 1) * offset in every dimension, weights 1/4 and 3/4."""
    c, k, d = model.config.num_classes, model.config.prior_components, model.config.latent_dim
    signs = torch.tensor([1.0, -1.0])[:, None]  # (K, 1)
    means = torch.stack([signs * (i + 1) * offset * torch.ones(k, d) for i in range(c)])  # (C, K, D)
    model.set_prior(torch.tensor([[0.25, 0.75]] * c), means, 0.1 * torch.eye(d).repeat(c, k, 1, 1))
    return model


@pytest.fixture(scope="module")
def cond_vae_file(tmp_path_factory) -> str:
    """An untrained conditional VAE with Fashion-MNIST's class names and a per-class prior (plumbing under test)."""
    model = _with_prior(_tiny(FASHION_MNIST_LABELS, prior_components=2))
    path = tmp_path_factory.mktemp("models") / "cvae.pt"
    save_model(path, "vae", model.config, model)
    return str(path)


# The model.


def test_the_class_reaches_encoder_and_decoder_and_the_file_keeps_the_class_names(tmp_path):
    model = _tiny().eval()
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 1])
    recon, mu, logvar = model(x, labels=y)
    assert recon.shape == (3, 1, 28, 28) and mu.shape == logvar.shape == (3, 4)
    assert not torch.equal(model.encode(x, y)[0], model.encode(x, 1 - y)[0])
    z = torch.randn(3, 4)
    assert not torch.equal(model.decode(z, y), model.decode(z, 1 - y))
    # Class weights between one-hot vectors: the ends are the classes themselves.
    one_hot = torch.nn.functional.one_hot(y, 2).double()
    assert torch.allclose(model.decode(z, one_hot), model.decode(z, y), atol=1e-6)
    with pytest.raises(ValueError, match="class-conditional \\(2 classes\\): it needs labels"):
        model.decode(z)
    with pytest.raises(ValueError, match="class ids must lie in \\[0, 2\\)"):
        model.decode(z, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="sum to 1 per row"):
        model.decode(z, torch.full((3, 2), 0.4))
    with pytest.raises(ValueError, match="unconditional: it takes no labels"):
        _tiny(labels=()).decode(z, y)
    with pytest.raises(ValueError, match="not a class name"):
        VAEConfig(labels=("a", "7"))

    path = tmp_path / "cvae.pt"
    save_model(path, "vae", model.config, model)
    loaded = load_model(path, expected_kind="vae")
    assert loaded.config.labels == ("top", "bottom") and loaded.config.num_classes == 2
    torch.testing.assert_close(loaded.module.decode(z, y), model.decode(z, y))
    # A file written before labels existed is an unconditional VAE, its weights (and hash) unchanged.
    assert load_named("vae-fmnist").config.labels == ()


def test_class_guidance_moves_the_decoders_class_vector_away_from_the_uniform_mix_and_survives_the_file(tmp_path):
    model = _tiny(labels=("top", "bottom", "bag"), seed=1).eval()
    guided = VAE(dataclasses.replace(model.config, class_guidance=1.5)).eval()
    guided.load_state_dict(model.state_dict())
    z, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 1])
    one_hot = torch.nn.functional.one_hot(y, 3).float()
    with torch.no_grad():
        # decode(z, y) with guidance w reads one_hot + w (one_hot - 1/3), here 2.5 one_hot - 0.5
        expected = torch.sigmoid(model.decoder(z, 2.5 * one_hot - 0.5))
        torch.testing.assert_close(guided.decode(z, y), expected)
        assert not torch.allclose(guided.decode(z, y), model.decode(z, y))
        # Class weights are guided alike; training's forward pass (the ELBO) never is.
        torch.testing.assert_close(guided.decode(z, one_hot), expected)
        x = torch.rand(4, 1, 28, 28)
        torch.testing.assert_close(guided(x, labels=y)[0], model(x, labels=y)[0])
    path = tmp_path / "guided.pt"
    save_model(path, "vae", guided.config, guided)
    loaded = load_model(path, expected_kind="vae")
    assert loaded.config.class_guidance == 1.5
    with torch.no_grad():
        torch.testing.assert_close(loaded.module.decode(z, y), expected)
    with pytest.raises(ValueError, match="class_guidance=-1: expected a finite number >= 0"):
        VAEConfig(labels=("a", "b"), class_guidance=-1)
    with pytest.raises(ValueError, match="only a conditional VAE"):
        VAEConfig(class_guidance=1.0)


def test_a_per_class_prior_draws_each_row_from_its_class_and_a_1_to_1_mix_from_both():
    model = _with_prior(_tiny(prior_components=2))
    n = 4000
    eps, u = torch.randn(n, 4), torch.rand(n, dtype=torch.float64)
    for c in (0, 1):
        z = model.prior_latents(eps, u, torch.full((n,), c))
        # class c's components sit at +-(c + 1) * 3 with weights 1/4 (+) and 3/4 (-)
        assert set(z.mean(1).abs().round().unique().tolist()) == {3.0 * (c + 1)}
        assert abs(float((z.mean(1) > 0).double().mean()) - 0.25) < 0.03
    both = model.prior_latents(eps, u, torch.tensor([[0.5, 0.5]]).expand(n, 2))
    assert abs(float((both.mean(1).abs() > 4.5).double().mean()) - 0.5) < 0.03  # half of the rows from class 1
    with pytest.raises(ValueError, match="expected \\(2, 2\\), \\(2, 2, 4\\)"):
        model.set_prior(torch.ones(2) / 2, torch.zeros(2, 4), torch.eye(4).repeat(2, 1, 1))


def test_fit_latent_prior_fits_one_mixture_per_class():
    model = _tiny(prior_components=2)
    # An encoder whose posterior is N(+5, e^-8) for class 0 and N(-5, e^-8) for class 1, whatever the image.
    with torch.no_grad():
        model.encoder.head.weight.zero_()
        model.encoder.head.weight[:4, -2:] = torch.tensor([5.0, -5.0])
        model.encoder.head.bias.copy_(torch.tensor([0.0] * 4 + [-8.0] * 4))
    images, labels = torch.rand(80, 1, 28, 28), torch.arange(2).repeat(40)
    summary = vae_core.fit_latent_prior(model, images, labels=labels)
    assert summary["components"] == 2 and summary["images"] == 80
    assert model.prior_means.shape == (2, 2, 4) and torch.allclose(model.prior_weights.sum(1), torch.ones(2))
    torch.testing.assert_close(
        model.prior_means, torch.tensor([5.0, -5.0])[:, None, None].expand(2, 2, 4), atol=0.1, rtol=0
    )
    with pytest.raises(ValueError, match="fitted per class"):
        vae_core.fit_latent_prior(model, images)
    with pytest.raises(ValueError, match="class 1 has 1 images: expected >= 2 per class"):
        vae_core.fit_latent_prior(model, images[:3], labels=torch.tensor([0, 0, 1]))


def _bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: a bright bar in the top half; class 1: in the bottom half; its row and column at random."""
    rng = np.random.default_rng(seed)
    images, labels = np.zeros((n, 1, 28, 28), np.float32), rng.integers(0, 2, n)
    for i in range(n):
        row, col = rng.integers(2, 10) + 14 * labels[i], rng.integers(2, 14)
        images[i, 0, row : row + 3, col : col + 12] = 1.0
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def test_a_conditional_vae_learns_to_put_the_class_where_it_belongs():
    """300 steps on bars whose half (top or bottom) is the class: decoding the same z with either class puts the
    bar's mass into that class's half, so the decoder reads the condition, not only z."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=4, width=8, labels=("top", "bottom")))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    images, labels = _bars(512, seed=0)
    rng = torch.Generator().manual_seed(1)
    for _ in range(300):
        batch = torch.randint(0, 512, (64,), generator=rng)
        vae_core.vae_step(model, optimizer, images[batch], beta=1.0, generator=rng, labels=labels[batch])
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        top, bottom = (
            model.decode(z, torch.zeros(64, dtype=torch.long)),
            model.decode(z, torch.ones(64, dtype=torch.long)),
        )
    share_top = lambda x: float(x[:, :, :14].sum() / x.sum())  # noqa: E731
    assert share_top(top) > 0.8 and share_top(bottom) < 0.2, (share_top(top), share_top(bottom))


# Synthesis.


def _actor_rows(config: SynthesizeConfig, items: pa.Table) -> pa.Table:
    return GeneratorActor(config, run_id="r", threads=1)(items)


def _decoded(model: VAE, z: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """What the actor writes for latents z and classes y, worked out here in float64."""
    with torch.inference_mode():
        images = model.double().decode(z.double(), y).clamp(0, 1).mul(255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


def test_sampled_rows_come_from_their_class_prior_and_depend_on_seed_index_and_class_alone(cond_vae_file):
    config = SynthesizeConfig(model=cond_vae_file, output="o", labels=(("sneaker", 3), ("0", 2)), seed=4, batch_size=2)
    table = _actor_rows(config, pa.table({"start": [0], "stop": [5]}))
    assert table.column("label").to_pylist() == [7, 7, 7, 0, 0]
    model = load_model(cond_vae_file).module
    y = torch.tensor([7, 7, 7, 0, 0])
    eps = torch.stack([latent_for(4, i, 4) for i in range(5)]).double()
    z = model.double().prior_latents(eps, uniforms_for(4, list(range(5))), y)
    expected = _decoded(model, z, y)
    got = np.stack([np.frombuffer(p, np.uint8).reshape(28, 28, 1) for p in table.column("pixels").to_pylist()])
    np.testing.assert_array_equal(got, expected)
    alone = _actor_rows(dataclasses.replace(config, batch_size=64), pa.table({"start": [4], "stop": [5]}))
    assert alone.column("pixels").to_pylist() == table.column("pixels").to_pylist()[4:]


def test_interpolation_between_classes_keeps_one_z_and_moves_the_condition(cond_vae_file):
    config = SynthesizeConfig(
        model=cond_vae_file, output="o", mode="interpolate", labels=(("sneaker", None), ("bag", None)), steps=5
    )
    assert config.count == 1  # one sequence unless --count says more
    item = {"index": 10, "source_keys": ["sneaker", "bag"], "sources": []}  # the third sequence (p = 2)
    table = _actor_rows(
        config,
        pa.Table.from_pylist(
            [item],
            schema=pa.schema(
                [("index", pa.int64()), ("source_keys", pa.list_(pa.string())), ("sources", pa.list_(pa.binary()))]
            ),
        ),
    )
    assert table.column("index").to_pylist() == [10, 11, 12, 13, 14]
    assert table.column("alpha").to_pylist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert table.column("label").to_pylist() == [7, None, None, None, 8]  # a class where the condition is one
    assert table.column("source_keys").to_pylist() == [["sneaker", "bag"]] * 5
    model = load_model(cond_vae_file).module.double()
    both = torch.zeros(1, 10, dtype=torch.float64)
    both[0, [7, 8]] = 0.5
    z = model.prior_latents(latent_for(0, 2, 4)[None].double(), uniforms_for(0, [2]), both).expand(5, -1)
    alphas = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    condition = torch.zeros(5, 10, dtype=torch.float64)
    condition[:, 7], condition[:, 8] = 1 - alphas, alphas
    got = np.stack([np.frombuffer(p, np.uint8).reshape(28, 28, 1) for p in table.column("pixels").to_pylist()])
    np.testing.assert_array_equal(got, _decoded(model, z, condition))
    assert len({g.tobytes() for g in got}) == 5  # the condition moves the image


def test_bad_label_interpolations_are_refused_in_one_line(cond_vae_file, vae_file):
    from restoration.cli import _label_counts

    assert _label_counts("sneaker,bag") == (("sneaker", None), ("bag", None))
    base = dict(model=cond_vae_file, output="o", mode="interpolate")
    for labels, message in [
        ((("sneaker", None),), "--labels sneaker: expected two different classes without counts"),
        ((("sneaker", None), ("bag", None), ("coat", None)), "expected two different classes"),
        ((("sneaker", 3), ("bag", None)), "--labels sneaker:3,bag: expected two different classes without counts"),
        ((("bag", None), ("bag", None)), "expected two different classes"),
    ]:
        with pytest.raises(UserError, match=message):
            SynthesizeConfig(**base, labels=labels)
    with pytest.raises(UserError, match="between two classes .* or between input images .* not both"):
        SynthesizeConfig(**base, labels=(("sneaker", None), ("bag", None)), inputs="in", random_pairs=2)
    with pytest.raises(UserError, match="--mode sample needs NAME:COUNT"):
        SynthesizeConfig(model="m", output="o", labels=(("sneaker", None),))
    with pytest.raises(UserError, match="need --mode sample or interpolate"):
        SynthesizeConfig(model="m", output="o", mode="reconstruct", inputs="in", labels=(("bag", 2),))
    with pytest.raises(UserError, match="or, for a conditional VAE, --labels A,B"):
        SynthesizeConfig(**base)

    pair = (("sneaker", None), ("hat", None))
    with pytest.raises(UserError, match="has no class 'hat': expected one of 0=t-shirt") as e:
        GeneratorActor(SynthesizeConfig(**base, labels=pair), run_id="r")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="is not class-conditional"):
        GeneratorActor(SynthesizeConfig(**{**base, "model": vae_file}, labels=(("a", None), ("b", None))), run_id="r")
    with pytest.raises(UserError, match="is class-conditional: --mode reconstruct of input images"):
        GeneratorActor(SynthesizeConfig(model=cond_vae_file, output="o", mode="reconstruct", inputs="in"), run_id="r")


def test_a_label_interpolation_run_writes_count_sequences(s3, ray_cluster, cond_vae_file, tmp_path, capsys):
    from restoration.cli import main

    out = s3.uri("synth", "cvae-between")
    argv = ["synthesize", "--model", cond_vae_file, "--out", out, "--mode", "interpolate", "--labels", "sneaker,bag"]
    assert main([*argv, "--steps", "4", "--count", "3", "--run-id", "b", "--seed", "2"]) == 0
    rows = read_output(storage.join(out, "run_id=b"), ["index", "label", "alpha", "image", "source_keys"])
    rows = rows.sort_by("index").to_pylist()
    assert [r["index"] for r in rows] == list(range(12))
    assert [r["label"] for r in rows] == [7, None, None, 8] * 3
    config = SynthesizeConfig(
        model=cond_vae_file,
        output="o",
        mode="interpolate",
        labels=(("sneaker", None), ("bag", None)),
        steps=4,
        seed=2,
    )
    item = {"index": 4, "source_keys": ["sneaker", "bag"], "sources": []}
    schema = pa.schema(
        [("index", pa.int64()), ("source_keys", pa.list_(pa.string())), ("sources", pa.list_(pa.binary()))]
    )
    pixels = _actor_rows(config, pa.Table.from_pylist([item], schema=schema)).column("pixels").to_pylist()
    decoded = [codec.decode(r["image"]).pixels for r in rows[4:8]]
    assert [np.round(d * 255).astype(np.uint8).tobytes() for d in decoded] == pixels
    # Between images, the conditional model is refused in one line.
    capsys.readouterr()  # the run's own output
    assert (
        main(
            [
                "synthesize",
                "--model",
                cond_vae_file,
                "--out",
                str(tmp_path),
                "--mode",
                "interpolate",
                "--inputs",
                str(tmp_path),
                "--random-pairs",
                "1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is class-conditional: --mode interpolate of input images" in err


# Training.


def test_a_conditional_vae_trains_through_ray_train_on_labelled_shards(s3, ray_cluster, fmnist_test_shards):
    from restoration.train.launcher import LaunchConfig, launch, resolve_config

    overrides = dict(
        latent_dim=4,
        width=4,
        batch_size=32,
        steps_per_epoch=3,
        epochs=1,
        eval_images=50,
        prior_components=2,
        prior_fit_images=200,
    )
    config = resolve_config("vae", "vae-fmnist-cond-cpu", overrides)
    report = launch(
        "vae", config, LaunchConfig(storage=s3.uri("train", "cvae-runs"), name="cvae"), fmnist_test_shards.uri
    )
    loaded = load_model(storage.read_bytes(report.model_path), expected_kind="vae")
    assert loaded.config.labels == FASHION_MNIST_LABELS and loaded.module.prior_means.shape == (10, 2, 4)
    assert 0 <= report.metrics["label_accuracy"] <= 1
