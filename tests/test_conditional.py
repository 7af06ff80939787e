"""Class-conditional generation: the conditional DCGAN (labels in, class names in its file, that it learns them),
`--labels` parsing and refusal, rows that carry their class and stay byte-identical whatever the parallelism, the
manifest's per-class counts, and the FID benchmark's per-class fields."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from restoration import storage
from restoration.checkpoint import load_model, load_named, save_model
from restoration.errors import UserError
from restoration.models.dcgan import DCGAN, DCGANConfig
from restoration.pipelines.synthesize import SynthesizeConfig, run_synthesize
from restoration.runs import read_output
from restoration.train.dcgan import FASHION_MNIST_LABELS
from restoration.train.gan_core import gan_step, make_optimizers


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these nets are tiny, and two threads on a busy 2-core machine spin-wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(labels=("top", "bottom"), seed: int = 0) -> DCGAN:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DCGAN(DCGANConfig(latent_dim=8, g_width=4, d_width=4, labels=labels))


@pytest.fixture(scope="module")
def cond_gan_file(tmp_path_factory) -> str:
    """An untrained conditional DCGAN with Fashion-MNIST's class names (the plumbing is under test, not quality)."""
    model = _tiny(FASHION_MNIST_LABELS)
    path = tmp_path_factory.mktemp("models") / "cond.pt"
    save_model(path, "dcgan", model.config, model)
    return str(path)


# The model.


def test_a_conditional_dcgan_takes_class_ids_and_its_file_keeps_the_class_names(tmp_path):
    model = _tiny()
    z, y = torch.randn(3, 8), torch.tensor([0, 1, 1])
    assert model.generator.eval()(z, y).shape == (3, 1, 28, 28)
    assert model.discriminator.eval()(torch.zeros(3, 1, 28, 28), y).shape == (3,)
    # The label reaches both nets: the same z (or image) with another class gives another output.
    assert not torch.equal(model.generator(z, y), model.generator(z, 1 - y))
    assert not torch.equal(
        model.discriminator(model.generator(z, y), y), model.discriminator(model.generator(z, y), 1 - y)
    )
    with pytest.raises(ValueError, match="class-conditional \\(2 classes\\): it needs labels"):
        model.generator(z)
    with pytest.raises(ValueError, match="class ids must lie in \\[0, 2\\)"):
        model.generator(z, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="unconditional: it takes no labels"):
        _tiny(labels=()).generator(z, y)
    with pytest.raises(ValueError, match="not a class name"):
        DCGANConfig(labels=("a", "7"))  # digits are class ids
    with pytest.raises(ValueError, match="names appear twice"):
        DCGANConfig(labels=("a", "a"))

    save_model(tmp_path / "c.pt", "dcgan", model.config, model)
    loaded = load_model(tmp_path / "c.pt")
    assert loaded.config.labels == ("top", "bottom") and loaded.config.num_classes == 2
    assert torch.equal(
        loaded.module.sample(4, torch.Generator().manual_seed(0), labels=torch.tensor([1, 0, 1, 0])),
        model.sample(4, torch.Generator().manual_seed(0), labels=torch.tensor([1, 0, 1, 0])),
    )
    # A file written before labels existed is an unconditional GAN, its weights (and hash) unchanged.
    assert load_named("dcgan-fmnist").config.labels == ()


def _bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 28, 28) images in [-1, 1] and their classes: 0 a bright bar in the top half, 1 in the bottom half."""
    rng = np.random.default_rng(seed)
    images, labels = np.zeros((n, 1, 28, 28), np.float32), rng.integers(0, 2, n)
    for i in range(n):
        row, col = rng.integers(2, 10) + 14 * labels[i], rng.integers(2, 14)
        images[i, 0, row : row + 4, col : col + 12] = rng.uniform(0.6, 1.0)
    return torch.from_numpy(images) * 2 - 1, torch.from_numpy(labels).long()


def test_a_tiny_conditional_gan_learns_to_make_the_class_asked_for():
    """100 fixed steps on two classes that differ only in where their bar is: asked for a class, the generator puts
    the bar in that class's half (a generator that ignores the label gets about half of them right)."""
    model = _tiny()
    opt_g, opt_d = make_optimizers(model, lr=5e-4)
    images, labels = _bars(512, seed=0)
    rng = torch.Generator().manual_seed(1)
    for _ in range(100):
        batch = torch.randint(0, len(images), (32,), generator=rng)
        gan_step(model.generator, model.discriminator, opt_g, opt_d, images[batch], 8, rng, labels[batch])
    asked = torch.arange(2).repeat(50)
    samples = model.sample(100, torch.Generator().manual_seed(2), labels=asked)  # (100, 1, 28, 28) in [0, 1]
    made = (samples[:, 0, 14:].sum((1, 2)) > samples[:, 0, :14].sum((1, 2))).long()  # 1: brighter bottom half
    assert (made == asked).float().mean() >= 0.9


# Labels on the command line and in the pipeline.


def test_label_lists_are_parsed_laid_out_in_index_order_and_unknown_classes_refused():
    from restoration.cli import _label_counts
    from restoration.inference import label_ids, row_labels

    assert _label_counts("sneaker:10000,bag:5000") == (("sneaker", 10000), ("bag", 5000))
    assert _label_counts("sneaker") == (("sneaker", None),)  # a count-less name: refused by sample mode's config
    for bad in ("sneaker:0", "sneaker:x", ":5", "bag:5,"):
        with pytest.raises(Exception, match="expected NAME:COUNT"):
            _label_counts(bad)
    names = FASHION_MNIST_LABELS
    assert label_ids((("sneaker", 3), ("8", 2)), names, "m") == [(7, 3), (8, 2)]  # by name or by id
    with pytest.raises(UserError, match="m has no class 'sneakers': expected one of 0=t-shirt, 1=trouser") as e:
        label_ids((("sneakers", 3),), names, "m")
    assert "\n" not in str(e.value) and "9=ankle-boot" in str(e.value)
    with pytest.raises(UserError, match="no class '10'"):
        label_ids((("10", 3),), names, "m")
    with pytest.raises(UserError, match="twice"):
        label_ids((("bag", 3), ("8", 1)), names, "m")
    with pytest.raises(UserError, match="m is class-conditional: say what to make with --labels"):
        label_ids((), names, "m")
    with pytest.raises(UserError, match="m is not class-conditional"):
        label_ids((("bag", 3),), (), "m")
    assert row_labels([(7, 3), (8, 2)], [0, 2, 3, 4]) == [7, 7, 8, 8] and row_labels([], [0, 1]) is None

    config = SynthesizeConfig(model="m", output="o", labels=(("bag", 3), ("coat", 4)))
    assert config.count == 7  # the counts' total
    with pytest.raises(UserError, match="--count 5 disagrees"):
        SynthesizeConfig(model="m", output="o", count=5, labels=(("bag", 3), ("coat", 4)))
    with pytest.raises(UserError, match="names bag more than once"):
        SynthesizeConfig(model="m", output="o", labels=(("bag", 3), ("bag", 4)))


def test_the_command_line_refuses_a_class_the_model_does_not_know_in_one_line(cond_gan_file, tmp_path, capsys):
    from restoration.cli import main

    argv = ["synthesize", "--model", cond_gan_file, "--out", str(tmp_path)]
    assert main([*argv, "--labels", "sneaker:3,hat:2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no class 'hat': expected one of 0=t-shirt" in err
    assert main([*argv, "--count", "3"]) == 2  # a conditional model needs classes
    assert "is class-conditional" in capsys.readouterr().err
    assert main([*argv, "--label", "bag"]) == 2  # --label takes --count
    assert "--label NAME takes --count N" in capsys.readouterr().err
    assert (
        main(["synthesize", "--model", "dcgan-fmnist", "--out", str(tmp_path), "--label", "bag", "--count", "2"]) == 2
    )
    assert "dcgan-fmnist is not class-conditional" in capsys.readouterr().err


def test_an_actors_rows_carry_their_class_and_depend_on_seed_index_and_class_alone(cond_gan_file):
    from restoration.inference import GeneratorActor

    def rows(labels, start, stop, batch_size=64):
        config = SynthesizeConfig(model=cond_gan_file, output="o", labels=labels, seed=3, batch_size=batch_size)
        table = GeneratorActor(config, run_id="r", threads=1)(pa.table({"start": [start], "stop": [stop]}))
        return table.column("label").to_pylist(), table.column("pixels").to_pylist()

    labels, pixels = rows((("sneaker", 4), ("0", 3)), 0, 7, batch_size=3)
    assert labels == [7, 7, 7, 7, 0, 0, 0]
    alone = rows((("sneaker", 4), ("0", 3)), 5, 6)
    assert alone == ([0], [pixels[5]])  # the same row in another batch
    assert rows((("t-shirt", 7),), 5, 6) == ([0], [pixels[5]])  # the same (seed, index, class) in another layout
    assert rows((("bag", 7),), 5, 6)[1] != [pixels[5]]  # another class from the same z


def test_a_conditional_run_is_identical_whatever_the_parallelism_and_counts_rows_per_class(
    s3, ray_cluster, cond_gan_file
):
    """Two actors on Ray, batches of 16, give byte for byte the rows one in-process actor makes in batches of 7."""
    from restoration.inference import GeneratorActor

    out = s3.uri("synth", "cond")
    labels = (("sneaker", 25), ("8", 15))
    config = SynthesizeConfig(
        model=cond_gan_file, output=out, labels=labels, seed=1, run_id="a", workers=2, batch_size=16
    )
    report = run_synthesize(config)
    assert report.complete and report.rows_out == 40
    got = read_output(storage.join(out, "run_id=a"), ["index", "label", "image"]).sort_by("index")
    one = GeneratorActor(dataclasses.replace(config, workers=1, batch_size=7), run_id="a", threads=1, encode=True)
    expected = one(pa.table({"start": [0], "stop": [40]})).select(["index", "label", "image"])
    assert got.equals(expected)
    assert got.column("label").to_pylist() == [7] * 25 + [8] * 15
    manifest = json.loads(storage.read_bytes(storage.join(out, "run_id=a", "_manifest.json")))
    assert (
        manifest["rows_by_label"]
        == report.rows_by_label
        == {
            "sneaker": {"id": 7, "requested": 25, "rows": 25, "errors": 0},
            "bag": {"id": 8, "requested": 15, "rows": 15, "errors": 0},
        }
    )


# The benchmark.


def test_the_fid_bench_reports_per_class_fid_and_accuracy_for_a_conditional_model(cond_gan_file, fashion_mnist):
    from restoration.bench.fid import format_class_table, run_fid_bench

    result = run_fid_bench([cond_gan_file], n=200, seed=0, fashion_mnist=fashion_mnist)
    row = result["rows"][0]
    assert [c["label"] for c in row["per_class"]] == list(FASHION_MNIST_LABELS)
    assert sum(c["n"] for c in row["per_class"]) == 200 and all(c["n"] >= 2 for c in row["per_class"])
    assert all(c["fid"] > c["floor_fid"] > 0 for c in row["per_class"])  # an untrained model, real images
    assert result["real_accuracy"] == row["real_accuracy"] > 0.8  # the classifier on real test images
    assert 0 <= row["label_accuracy"] < 0.5  # an untrained model's samples are rarely what was asked
    table = format_class_table(row)
    assert table.count("\n") == 12 and "7 sneaker" in table
    floor = next(r for r in result["rows"] if r["name"] == "floor")
    assert "per_class" not in floor


def test_a_labelled_run_smaller_than_a_batch_sizes_its_actors_on_its_own_rows(cond_gan_file):
    """The start-up measurement of the encoder's share runs the generator on the run's first batch; a run of fewer
    rows than a batch has its classes laid over those rows alone."""
    from restoration.pipelines.synthesize import data_share

    config = SynthesizeConfig(model=cond_gan_file, output="o", labels=(("bag", 3), ("coat", 2)), batch_size=16)
    share = data_share(config)
    assert share is not None and 0 <= share <= 1
