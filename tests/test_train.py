"""Ray Train runs of every model family: DDP on CPU (gloo) with data and checkpoints on the embedded S3, recovery from
an injected worker failure, resuming a finished run by name, the best checkpoint exported, and each family's model
measurably better than the untrained one after a fixed, small number of steps."""

from __future__ import annotations

import io
import json
import posixpath
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from restoration import codec, data, storage
from restoration import fid as F
from restoration.checkpoint import load_model, save_model
from restoration.cli import main
from restoration.inference import ModelRunner, latent_for
from restoration.models.dcgan import DCGAN
from restoration.models.restorer import Restorer
from restoration.models.vae import VAE
from restoration.runs import read_output
from restoration.sources import read_idx
from restoration.train import LaunchConfig, launch, resolve_config
from restoration.train.gan_core import feature_distance
from restoration.train.restorer_core import NoiseSpec, evaluate_psnr
from restoration.train.vae_core import evaluate_elbo

pytestmark = pytest.mark.slow

TINY = {"depth": 4, "width": 16, "patch_size": 32, "batch_size": 8, "steps_per_epoch": 8, "val_max_side": 96}
GENERATORS = {
    "dcgan": {
        "g_width": 16,
        "d_width": 16,
        "latent_dim": 32,
        "batch_size": 32,
        "eval_samples": 128,
        "steps_per_epoch": 150,
    },
    "vae": {
        "width": 16,
        "latent_dim": 8,
        "batch_size": 64,
        "eval_images": 1000,
        "prior_components": 4,
        "steps_per_epoch": 40,
    },
}
PREVIEWS = {"dcgan": ["samples.png"], "vae": ["samples.png", "reconstructions.png"]}
FID_SAMPLES = 1000  # generated and real (train-split) images per side of the DCGAN checks


def checkpoint_models(run_uri: str) -> dict[int, bytes]:
    """The model file of every checkpoint folder of a run, by the epoch its metadata names."""
    folders = {posixpath.dirname(i.path) for i in storage.list_files(run_uri)}
    models = {}
    for folder in sorted(f for f in folders if posixpath.basename(f).startswith("checkpoint_")):
        model = storage.read_bytes(f"s3://{folder}/model.pt")
        models[int(load_model(model).meta["epoch"])] = model
    return models


def held_out_train400(folder) -> list[np.ndarray]:
    """The restorer runs' validation images, read from the folder itself: the keys `data.held_out` picks, gray
    float32 (H, W, 1) in [0, 1] as the training loop decodes them."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and data.held_out(p.relative_to(folder).as_posix()))
    assert files, f"no validation images among {folder}'s files"
    return [np.asarray(Image.open(p).convert("L"), np.float32)[..., None] / 255 for p in files]


@pytest.fixture(scope="module")
def ddp_run(s3, ray_cluster, train400_shards):
    """A two-worker restorer run that fails once at epoch 1 and keeps every checkpoint. It ranks its checkpoints by
    the *lowest* validation PSNR, so that the checkpoint it must export is not the latest one (training improves the
    net, see the learning check): an export of the latest checkpoint, or one that ignored the run's score order,
    would show."""
    runs = s3.uri("train", "runs")
    config = resolve_config("restorer", None, {**TINY, "epochs": 3, "fail_at_epoch": 1, "score_order": "min"})
    where = LaunchConfig(storage=runs, name="ddp", workers=2, max_failures=1, num_to_keep=None)
    report = launch("restorer", config, where, train400_shards.uri)
    model = storage.read_bytes(storage.join(runs, "ddp", "model.pt"))  # before the resume below exports again
    return SimpleNamespace(data=train400_shards.uri, runs=runs, where=where, config=config, report=report, model=model)


def test_two_worker_ddp_on_s3_survives_a_failure_learns_exports_the_best_and_resumes(ddp_run, train400):
    runs, where, config, report = ddp_run.runs, ddp_run.where, ddp_run.config, ddp_run.report

    # Epoch 1 raised once; FailureConfig restarted the worker group from the epoch-0 checkpoint, not from scratch.
    assert report.epochs == [0, 1, 2]
    assert [m["started_from_epoch"] for m in report.history] == [0, 1, 1]
    saved = json.loads(storage.read_bytes(storage.join(runs, "ddp", "config.json")))
    assert saved["kind"] == "restorer" and saved["epochs"] == 3

    # The net learned: the last checkpoint denoises the held-out images (recomputed here, outside the run) by a clear
    # margin better than the same net at its seeded initial weights did.
    checkpoints = checkpoint_models(storage.join(runs, "ddp"))
    assert sorted(checkpoints) == [0, 1, 2]
    val_images = held_out_train400(train400)
    noise = NoiseSpec(sigma=config.val_sigma)
    torch.manual_seed(config.seed)  # what the training loop does before building the net
    untrained = evaluate_psnr(Restorer(config.model_config()), val_images, noise, max_side=config.val_max_side)
    last = load_model(checkpoints[2], expected_kind="restorer").module
    trained = evaluate_psnr(last, val_images, noise, max_side=config.val_max_side)
    assert trained["psnr_input"] == untrained["psnr_input"]  # the same noisy inputs
    assert trained["psnr"] > untrained["psnr"] + 2.5, (trained, untrained)
    assert trained["psnr"] > trained["psnr_input"] + 2.0, trained  # and it beats the noisy input itself
    psnr = {int(m["epoch"]): m["val_psnr"] for m in report.history}
    assert psnr[2] == pytest.approx(trained["psnr"], abs=0.05)  # the run validated on the same images

    # STORAGE/NAME/model.pt is the best checkpoint's model file by the run's own score: here the lowest val_psnr.
    best = min(psnr, key=psnr.get)
    assert best != 2  # the latest checkpoint is not the best one, so an export of the latest would fail below
    loaded = load_model(ddp_run.model, expected_kind="restorer")  # loads as a restorer the pipelines can use
    assert loaded.meta["metrics"]["epoch"] == best and loaded.sha256 == report.model_sha256
    assert ddp_run.model == checkpoints[best]  # that checkpoint's model file, byte for byte
    assert report.metrics["val_psnr"] == psnr[best]

    # Starting the finished run again with more epochs continues from its last checkpoint.
    more = resolve_config("restorer", None, {**TINY, "epochs": 4, "score_order": "min"})
    again = launch("restorer", more, where, ddp_run.data)
    assert again.epochs == [0, 1, 2, 3]
    assert again.history[-1]["started_from_epoch"] == 3


def test_train_cli_dry_run_and_bad_arguments(capsys):
    args = ["train", "restorer", "--data", "x", "--storage", "/tmp/runs", "--preset", "restorer-dncnn-cpu"]
    assert main([*args, "--dry-run", "--set", "sigma=15", "--epochs", "2"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (
        resolved["config"]["sigma"] == 15
        and resolved["config"]["epochs"] == 2
        and resolved["name"] == "restorer-dncnn-cpu"
    )
    assert main([*args, "--dry-run", "--set", "nope=1"]) == 2
    assert "unknown field" in capsys.readouterr().err
    assert main(["train", "restorer", "--data", "x", "--storage", "y", "--preset", "bogus", "--dry-run"]) == 2
    assert "unknown preset 'bogus'" in capsys.readouterr().err
    assert main(["train", "restorer", "--data", "x", "--storage", "y", "--set", "depth=1", "--dry-run"]) == 2
    assert "depth" in capsys.readouterr().err


def held_out_fmnist_test(folder, count: int) -> torch.Tensor:
    """The first `count` validation images of the Fashion-MNIST test split as the generator runs hold them out
    (keys test/00000 ... whose `data.held_out` is true), float (N, 1, 28, 28) in [0, 1]."""
    images = read_idx(str(folder / "t10k-images-idx3-ubyte.gz"))  # (10000, 28, 28) uint8
    index = [i for i in range(len(images)) if data.held_out(f"test/{i:05d}")][:count]
    return torch.from_numpy(images[index].astype(np.float32) / 255)[:, None]


def first_fmnist_train(folder, count: int) -> torch.Tensor:
    """The first `count` images of the Fashion-MNIST train split (the runs train on the test split), float (N, 1, 28,
    28) in [0, 1] as `fid.load_fashion_mnist` gives them, read without decoding the other 60,000 - count."""
    images = read_idx(str(folder / "train-images-idx3-ubyte.gz"), 0, count)  # (count, 28, 28) uint8
    return torch.from_numpy(images.astype(np.float32) / 255)[:, None]


def untrained(kind: str, config) -> torch.nn.Module:
    """The family's net at seeded initial weights, in eval mode. A DCGAN's generator first runs 50 train-mode
    forwards, so that its BatchNorm statistics are what a run with a vanishing learning rate leaves them (its
    EMA copy takes the trained net's buffers): otherwise the baseline would be the worse one for that reason alone."""
    torch.manual_seed(config.seed)
    model = (DCGAN if kind == "dcgan" else VAE)(config.model_config())
    if kind == "dcgan":
        with torch.no_grad():
            for _ in range(50):
                model.generator.train()(torch.randn(config.batch_size, config.latent_dim))
    return model.eval()


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_generator_loops_learn_checkpoint_previews_and_export(s3, ray_cluster, fashion_mnist, fmnist_test_shards, kind):
    runs = s3.uri("train", "gen-runs")
    config = resolve_config(kind, None, {**GENERATORS[kind], "epochs": 2})
    report = launch(kind, config, LaunchConfig(storage=runs, name=kind), fmnist_test_shards.uri)
    assert report.epochs == [0, 1]
    loaded = load_model(storage.read_bytes(report.model_path), expected_kind=kind)
    images = loaded.module.sample(4, generator=torch.Generator().manual_seed(0)).detach()
    assert tuple(images.shape) == (4, 1, 28, 28) and float(images.min()) >= 0 and float(images.max()) <= 1
    if kind == "vae":  # the sampling prior was fitted to the checkpoint's posterior before the model file was written
        assert loaded.config.prior_components == 4 and loaded.meta["prior"]["components"] == 4
        assert not torch.equal(loaded.module.prior_means, torch.zeros(4, 8))

    # A fixed, small number of steps made the model measurably better than the same net untrained, measured here
    # outside the run (a run with a vanishing learning rate fails each of these checks).
    if kind == "dcgan":
        # The exported (EMA) generator's samples vs an untrained generator's, against train-split images the run never
        # saw: FID in the bundled classifier's features (restoration.fid), and the distance in the seeded random
        # features that the run scores its checkpoints by (gan_core.feature_distance).
        extractor = F.load_extractor()[0]
        real = first_fmnist_train(fashion_mnist, FID_SAMPLES)
        scores = {}
        with torch.no_grad():
            for name, module in (("trained", loaded.module), ("untrained", untrained(kind, config))):
                fake = module.sample(FID_SAMPLES, generator=torch.Generator().manual_seed(1))
                scores[name] = {"fid": F.fid(real, fake, extractor), "features": feature_distance(fake, real)}
        assert scores["trained"]["fid"] < 0.75 * scores["untrained"]["fid"], scores
        assert scores["trained"]["features"] < 0.25 * scores["untrained"]["features"], scores
        # D learned too: in the last epoch it tells real images from generated ones (mean probabilities).
        last = report.history[-1]
        assert last["d_real"] - last["d_fake"] > 0.3, last
    else:
        # The held-out negative ELBO (nats per image) of the exported model vs the untrained net, on the run's
        # validation images; the run's own score (val_nelbo) fell from epoch to epoch too.
        val = held_out_fmnist_test(fashion_mnist, config.eval_images)
        trained = evaluate_elbo(loaded.module, val)["neg_elbo"]
        before = evaluate_elbo(untrained(kind, config), val)["neg_elbo"]
        assert trained < before - 75, (trained, before)
        nelbo = [m["val_nelbo"] for m in report.history]
        assert nelbo[1] < nelbo[0], nelbo
        assert report.metrics["val_nelbo"] == pytest.approx(trained, rel=1e-2)  # the run validated on these images

    # Every checkpoint carries its preview grids next to the state and the model file.
    folders = {posixpath.dirname(i.path) for i in storage.list_files(storage.join(runs, kind))}
    checkpoints = {f for f in folders if posixpath.basename(f).startswith("checkpoint_")}
    assert checkpoints
    states = {}
    for name in checkpoints:
        files = {posixpath.basename(i.path) for i in storage.list_files("s3://" + name)}
        assert {"state.pt", "model.pt", *PREVIEWS[kind]} <= files
        state = torch.load(io.BytesIO(storage.read_bytes(f"s3://{name}/state.pt")), weights_only=True)
        states[state["epoch"]] = state

    if kind == "dcgan":
        # The exported generator is the EMA copy of the exported epoch's checkpoint, not the raw generator; the
        # discriminator is the trained one (so the file can go on training).
        state = states[loaded.meta["epoch"]]
        exported = loaded.module.state_dict()
        generator = {k: v for k, v in exported.items() if k.startswith("generator.")}
        assert all(torch.equal(v, state["ema"][k.removeprefix("generator.")]) for k, v in generator.items())
        weights = [k for k in generator if k.endswith(".weight")]
        assert any(not torch.equal(exported[k], state["model"][k]) for k in weights)
        assert all(torch.equal(v, state["model"][k]) for k, v in exported.items() if k.startswith("discriminator."))

    # `synthesize` takes the run's model file straight from S3: its rows are that file's samples.
    out = s3.uri("train", "gen-synthesized")
    argv = ["synthesize", "--model", report.model_path, "--count", "8", "--seed", "5", "--out", out, "--run-id", kind]
    assert main(argv) == 0
    synthesized = storage.join(out, f"run_id={kind}")
    manifest = json.loads(storage.read_bytes(storage.join(synthesized, "_manifest.json")))
    assert manifest["model_sha256"] == loaded.sha256 and manifest["rows_out"] == 8 and manifest["errors"] == 0
    rows = read_output(synthesized, ["index", "image"]).to_pylist()
    got = np.stack([np.asarray(Image.open(io.BytesIO(r["image"]))) for r in sorted(rows, key=lambda r: r["index"])])
    assert got.shape == (8, 28, 28) and len({g.tobytes() for g in got}) == 8
    if kind == "dcgan":  # G(z_i) worked out here in float64, z_i from (seed, index): byte for byte
        z = torch.stack([latent_for(5, i, loaded.config.latent_dim) for i in range(8)]).double()
        with torch.inference_mode():
            expected = loaded.module.double().generator(z).add(1).div(2).clamp(0, 1).mul(255).round().to(torch.uint8)
        np.testing.assert_array_equal(got, expected[:, 0].numpy())


def test_a_ray_trained_model_file_on_s3_serves_restore(s3, ray_cluster, ddp_run, train400):
    """`restore --model s3://.../NAME/model.pt`: the run's exported file, loaded by the pipeline's actors, gives the
    rows (compared with the same file applied here, outside Ray)."""
    model_uri = storage.join(ddp_run.runs, "ddp", "model.pt")
    loaded = load_model(storage.read_bytes(model_uri), expected_kind="restorer")
    inputs = s3.uri("train", "noisy-held-out")
    noisy = {}
    for i, image in enumerate(held_out_train400(train400)[:3]):
        rng = np.random.default_rng(i)
        pixels = np.clip(image[..., 0] * 255 + rng.normal(0, 25, image.shape[:2]), 0, 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        noisy[f"img{i}.png"] = buf.getvalue()
        storage.write_bytes(storage.join(inputs, f"img{i}.png"), buf.getvalue())
    out = s3.uri("train", "restored-by-ray-trained")
    assert main(["restore", inputs, out, "--model", model_uri, "--run-id", "r", "--precision", "fp32"]) == 0
    run = storage.join(out, "run_id=r")
    manifest = json.loads(storage.read_bytes(storage.join(run, "_manifest.json")))
    assert manifest["model_sha256"] == loaded.sha256
    rows = {r["key"]: r for r in read_output(run, ["key", "image", "error"]).to_pylist()}
    assert sorted(rows) == sorted(noisy) and all(r["error"] is None for r in rows.values())
    runner = ModelRunner(model_uri, precision="fp32")
    for key, image in noisy.items():
        expected = codec.to_uint(runner.restore_array(codec.decode(image).pixels[None])[0], 8)
        got = codec.to_uint(codec.decode(rows[key]["image"]).pixels, 8)
        assert np.abs(got.astype(int) - expected).max() <= 1, key
        assert np.mean(got != expected) < 0.002, key


def test_bf16_mixed_degradations_fine_tune_from_a_model_file(s3, ray_cluster, ddp_run, tmp_path):
    # The base is the DDP run's exported model with its BatchNorm folded into the convolutions: the same eval-mode
    # function (to float rounding) in a net without BN, whose statistics would move even at a vanishing learning rate.
    base = load_model(ddp_run.model, expected_kind="restorer")
    base_psnr = base.meta["metrics"]["val_psnr"]  # the exported (best) epoch's
    folded = base.module.fold_batch_norm()
    start = tmp_path / "base.pt"
    save_model(start, "restorer", folded.config, folded, meta=base.meta)

    # Fine-tune under bf16 autocast with blur/noise/JPEG patches, starting from the base model's weights: with a
    # vanishing learning rate the weights stay where init_from put them, so validation starts where the base ended.
    overrides = {**TINY, "batch_norm": False, "epochs": 1, "precision": "bf16", "jpeg_p": 0.5, "blur_p": 0.3}
    config = resolve_config("restorer", None, {**overrides, "noise_p": 0.7, "init_from": str(start), "lr": 1e-9})
    tuned = launch("restorer", config, LaunchConfig(storage=ddp_run.runs, name="tuned", workers=1), ddp_run.data)
    assert np.isfinite(tuned.history[0]["loss"])
    assert abs(tuned.history[0]["val_psnr"] - base_psnr) < 0.05
    # The exported weights are the base model's (a fresh start would have He-initialised ones).
    tuned_state = load_model(storage.read_bytes(tuned.model_path)).module.state_dict()
    base_state = folded.state_dict()
    assert max((tuned_state[k] - v).abs().max().item() for k, v in base_state.items()) < 1e-6


def test_workers_that_leave_no_cpu_for_the_parquet_listing_are_refused(s3, ray_cluster, fmnist_test_shards):
    """Reading Parquet begins with Ray Data's file listing, a task that takes a whole CPU: 1.5 of the test cluster's
    2 CPUs for the worker would leave it waiting forever, so the launch refuses before anything runs."""
    runs = s3.uri("train", "refused-runs")
    config = resolve_config("dcgan", None, {"g_width": 8, "d_width": 8, "epochs": 1, "steps_per_epoch": 1})
    where = LaunchConfig(storage=runs, name="too-wide", cpus_per_worker=1.5)
    with pytest.raises(
        ValueError, match=r"--cpus-per-worker 1.5 .* \(1 needed, the cluster has 2\); expected at most 1"
    ):
        launch("dcgan", config, where, fmnist_test_shards.uri)
    assert not storage.exists(storage.join(runs, "too-wide", "config.json"))  # refused before the run was set up


IMAGE_FAMILIES = {
    "upscaler": ("upscale-x2-cpu", {"width": 8, "depth": 3, "patch_size": 16, "batch_size": 4}),
    "inpainter": ("inpaint-tiny", {}),
    "repairer": ("repair-tiny", {}),
}


@pytest.mark.parametrize("kind", list(IMAGE_FAMILIES))
def test_each_image_family_runs_the_shared_epoch_loop_through_ray_train(s3, ray_cluster, train400_shards, kind):
    """The upscaler, inpainter and repairer run the restorer's epoch loop (`worker.run_epochs`) through Ray Train on
    the S3 shards: every epoch reported with its loss, schedule and validation, a checkpoint each, and the exported
    model file of the family's kind, the best epoch's."""
    preset, tiny = IMAGE_FAMILIES[kind]
    config = resolve_config(kind, preset, {**tiny, "epochs": 2, "steps_per_epoch": 3, "time_budget_s": 600.0})
    runs = s3.uri("train", "families")
    report = launch(kind, config, LaunchConfig(storage=runs, name=kind), train400_shards.uri)
    assert report.epochs == [0, 1]
    for epoch, metrics in enumerate(report.history):
        assert metrics["epoch"] == epoch and metrics["started_from_epoch"] == 0 and metrics["planned_epochs"] == 2
        assert np.isfinite(metrics["loss"]) and metrics["lr"] > 0 and np.isfinite(metrics["val_psnr"])
    assert sorted(checkpoint_models(storage.join(runs, kind))) == [0, 1]
    loaded = load_model(storage.read_bytes(report.model_path), expected_kind=kind)
    assert loaded.meta["metrics"] == report.metrics and loaded.meta["train_config"]["epochs"] == 2
