"""README promises of the pipelines' options, through the command line on tiny untrained models: a user-supplied
`reference` column, per-row SSIM and the manifest's means, `--tile`, `--precision`, `--ensemble`; synthesis's `--slerp`,
`--random-pairs`, `--truncation` and `--precision`. Each group of tests shares its runs."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import skimage.data
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from restoration import codec, data, storage
from restoration.checkpoint import load_named, save_model
from restoration.cli import main
from restoration.inference import ModelRunner, latent_for
from restoration.models.restorer import Restorer, RestorerConfig
from restoration.runs import read_output
from restoration.tiling import tiled_apply

pytestmark = pytest.mark.slow  # each group's runs take tens of seconds of Ray start-up and pipeline fill


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def pixels_of(image: bytes) -> np.ndarray:
    """A PNG's samples as float64 in [0, 1], (H, W) or (H, W, C), read by Pillow (not by the pipeline's codec)."""
    return np.asarray(Image.open(io.BytesIO(image)), np.float64) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def manifest(run: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(run, "_manifest.json")))


# ----------------------------------------------------------------------------------------------------------- restore
def noisy(clean: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def restore_runs(ray_cluster, tmp_path_factory) -> dict:
    """Input shards with a `reference` column (noisy photos, their clean originals; one small image, one reference of
    the wrong size, one row without a reference), restored three times by a tiny untrained model: whole images in
    fp32, in tiles of 32 px in fp32, and whole images in bf16. Returns the inputs, the model and each run's rows."""
    root = tmp_path_factory.mktemp("options")
    torch.manual_seed(0)
    model = Restorer(RestorerConfig(depth=4, width=8))
    model_path = root / "tiny.pt"
    save_model(model_path, "restorer", model.config, model)

    camera, astronaut = skimage.data.camera(), skimage.data.astronaut()
    clean = {
        "gray.png": camera[100:196, 150:270],  # 96 x 120: several 32 px tiles
        "gray2.png": camera[300:364, 200:280],
        "colour.png": astronaut[40:112, 180:268],  # RGB: the gray model restores each channel
        "small.png": camera[200:208, 200:208],  # 8 x 8: smaller than SSIM's 11 x 11 window
        "mismatch.png": camera[0:40, 0:40],
        "noref.png": camera[400:440, 400:440],
    }
    rows = []
    for i, (key, image) in enumerate(clean.items()):
        reference = png(image)
        if key == "mismatch.png":
            reference = png(image[:30])
        rows.append({"key": key, "image": png(noisy(image, i)), "reference": None if key == "noref.png" else reference})
    shards = root / "shards"
    shards.mkdir()
    table = pa.Table.from_pylist(
        rows, schema=pa.schema([("key", pa.string()), ("image", pa.binary()), ("reference", pa.binary())])
    )
    (shards / "part-0.parquet").write_bytes(data.table_to_parquet(table))

    out = str(root / "out")
    runs = {
        "fp32": ["--precision", "fp32"],
        "tiled": ["--precision", "fp32", "--tile", "32", "--overlap", "0"],
        "bf16": ["--precision", "bf16"],
        "ensemble": ["--precision", "fp32", "--ensemble"],
    }
    results = {"inputs": {r["key"]: r for r in rows}, "model": str(model_path), "out": out}
    for run_id, flags in runs.items():
        argv = ["restore", str(shards), out, "--model", str(model_path), "--run-id", run_id, *flags]
        assert main(argv) == 0, argv
        columns = ["key", "image", "psnr", "ssim", "input_psnr", "error", "degradation"]
        table = read_output(storage.join(out, f"run_id={run_id}"), columns)
        results[run_id] = {r["key"]: r for r in table.to_pylist()}
    return results


def test_a_reference_column_is_what_psnr_and_ssim_measure_against(restore_runs):
    rows, inputs = restore_runs["fp32"], restore_runs["inputs"]
    assert sorted(rows) == sorted(inputs)
    for key in ("gray.png", "gray2.png", "colour.png"):
        row = rows[key]
        assert row["error"] is None and row["degradation"] is None, row["error"]
        restored, reference = pixels_of(row["image"]), pixels_of(inputs[key]["reference"])
        # Against the user's reference, recomputed here from the files: the PNG written and the reference given.
        assert row["psnr"] == pytest.approx(psnr(restored, reference), abs=1e-6)
        assert row["input_psnr"] == pytest.approx(psnr(pixels_of(inputs[key]["image"]), reference), abs=1e-6)
        expected_ssim = structural_similarity(
            restored,
            reference,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=-1 if restored.ndim == 3 else None,
        )
        assert row["ssim"] == pytest.approx(expected_ssim, abs=1e-4)
        assert 0 < row["ssim"] < 1
    # An image smaller than the SSIM window gets PSNR only; no reference: no metrics; a reference of another size is
    # the row's error, and the run goes on.
    assert rows["small.png"]["psnr"] is not None and rows["small.png"]["ssim"] is None
    assert rows["noref.png"]["image"] and rows["noref.png"]["psnr"] is None and rows["noref.png"]["ssim"] is None
    assert rows["noref.png"]["input_psnr"] is None
    mismatch = rows["mismatch.png"]
    assert mismatch["image"] is None and mismatch["error"].startswith("reference: "), mismatch["error"]
    assert "(30, 40, 1)" in mismatch["error"] and "(40, 40, 1)" in mismatch["error"]


def test_the_manifest_means_are_the_rows_means(restore_runs):
    rows = restore_runs["fp32"]
    report = manifest(storage.join(restore_runs["out"], "run_id=fp32"))
    assert report["rows_in"] == report["rows_out"] == len(rows) == 6
    assert report["errors"] == 1 and report["errors_by_stage"] == {"reference": 1}

    def mean(column: str) -> float:
        values = [r[column] for r in rows.values() if r[column] is not None]
        return sum(values) / len(values)

    assert len([r for r in rows.values() if r["ssim"] is not None]) == 3
    assert report["mean_psnr"] == pytest.approx(mean("psnr"), abs=1e-9)  # 4 rows: the small image counts
    assert report["mean_ssim"] == pytest.approx(mean("ssim"), abs=1e-9)  # 3 rows
    assert report["mean_input_psnr"] == pytest.approx(mean("input_psnr"), abs=1e-9)


def test_tiled_output_equals_whole_image_output(restore_runs):
    """`--tile 32 --overlap 0` on images of up to 96 x 120: the runner widens the overlap to the model's receptive
    radius, so the tiles blend into the whole-image result (within a rounding step of the 8-bit PNG)."""
    whole, tiled = restore_runs["fp32"], restore_runs["tiled"]
    config = manifest(storage.join(restore_runs["out"], "run_id=tiled"))["config"]
    assert (config["tile"], config["overlap"]) == (32, 0)
    for key in ("gray.png", "gray2.png", "colour.png"):
        a, b = pixels_of(whole[key]["image"]), pixels_of(tiled[key]["image"])
        assert np.abs(a - b).max() <= 1 / 255 + 1e-9, key
        assert np.mean(a != b) < 0.01, key
        assert tiled[key]["psnr"] == pytest.approx(whole[key]["psnr"], abs=0.01)

    # The check can see seams: the same tiles cut without the runner's overlap differ from the whole image by far
    # more than that rounding step.
    runner = ModelRunner(restore_runs["model"], tile=32, overlap=0, precision="fp32")
    assert runner.overlap > 0 and runner.tile == 32
    x = torch.from_numpy(codec.decode(restore_runs["inputs"]["gray.png"]["image"]).pixels.transpose(2, 0, 1))[None]
    with torch.inference_mode():
        seams = tiled_apply(runner.net, x, tile=32, overlap=0) - runner.net(x)
    assert seams.abs().max() > 4 / 255


def test_precision_fp32_is_fp32_and_bf16_differs_little(restore_runs):
    """On a CPU with bf16 units `auto` would run bf16; `--precision fp32` runs the model in fp32, as the manifest
    records, and `--precision bf16` gives nearly the same images and PSNR."""
    fp32, bf16 = restore_runs["fp32"], restore_runs["bf16"]
    out = restore_runs["out"]
    assert manifest(storage.join(out, "run_id=fp32"))["config"]["precision"] == "fp32"
    assert manifest(storage.join(out, "run_id=bf16"))["config"]["precision"] == "bf16"
    runners = {p: ModelRunner(restore_runs["model"], precision=p) for p in ("fp32", "bf16")}
    assert not runners["fp32"].bf16 and runners["bf16"].bf16
    differs = {}
    for key in ("gray.png", "gray2.png", "colour.png"):
        noisy_pixels = codec.decode(restore_runs["inputs"][key]["image"]).pixels
        expected = {p: codec.to_uint(r.restore_array(noisy_pixels[None])[0], 8) for p, r in runners.items()}
        got = {
            p: codec.to_uint(codec.decode(rows[key]["image"]).pixels, 8) for p, rows in (("fp32", fp32), ("bf16", bf16))
        }
        # Each run is its precision's output: the same 8-bit samples, but for the odd rounding step where a batch of
        # another size rounds differently; the other precision's output differs in a few per cent of them.
        for p in ("fp32", "bf16"):
            assert np.abs(got[p].astype(int) - expected[p]).max() <= 1, (key, p)
            assert np.mean(got[p] != expected[p]) < 0.002, (key, p, np.mean(got[p] != expected[p]))
        differs[key] = np.mean(got["fp32"] != got["bf16"])
        assert psnr(pixels_of(fp32[key]["image"]), pixels_of(bf16[key]["image"])) > 40, key
        assert bf16[key]["psnr"] == pytest.approx(fp32[key]["psnr"], abs=0.1), key
    assert min(differs.values()) > 0.01, differs  # bf16 really ran: its rounding shows in the 8-bit images


def dihedral_mean(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The self-ensemble worked out here: for each of the 8 orientations T (4 rotations, mirrored or not), T^-1(net(T x)),
    averaged. x: (B, C, H, W)."""
    outputs = []
    with torch.inference_mode():
        for mirror in (False, True):
            for k in range(4):
                t = torch.rot90(x.flip(-1) if mirror else x, k, (2, 3))
                y = torch.rot90(net(t), -k, (2, 3))
                outputs.append(y.flip(-1) if mirror else y)
    return torch.stack(outputs).mean(0)


def test_ensemble_averages_the_eight_orientations(restore_runs):
    runner = ModelRunner(restore_runs["model"], precision="fp32", ensemble=True)
    plain = ModelRunner(restore_runs["model"], precision="fp32")
    rng = np.random.default_rng(0)
    x = rng.random((2, 40, 56, 1), dtype=np.float32)  # not square: the quarter turns swap height and width
    expected = dihedral_mean(plain.net, torch.from_numpy(x.transpose(0, 3, 1, 2))).clamp(0, 1)
    got = runner.restore_array(x)
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    assert np.abs(got - plain.restore_array(x)).max() > 1e-3  # the untrained net is far from equivariant

    # Through the command line: the run's rows are the ensemble's output, and the manifest says it ran.
    rows = restore_runs["ensemble"]
    for key in ("gray.png", "colour.png"):
        noisy_pixels = codec.decode(restore_runs["inputs"][key]["image"]).pixels
        expected = codec.to_uint(runner.restore_array(noisy_pixels[None])[0], 8)
        got = codec.to_uint(codec.decode(rows[key]["image"]).pixels, 8)
        assert np.abs(got.astype(int) - expected).max() <= 1 and np.mean(got != expected) < 0.002, key
        assert np.mean(got != codec.to_uint(codec.decode(restore_runs["fp32"][key]["image"]).pixels, 8)) > 0.05, key
    assert manifest(storage.join(restore_runs["out"], "run_id=ensemble"))["config"]["ensemble"] is True


# -------------------------------------------------------------------------------------------------------- synthesis
def images_by_index(run: str, columns=("index", "image", "source_keys", "alpha")) -> dict[int, dict]:
    return {r["index"]: r for r in read_output(run, list(columns)).to_pylist()}


def samples(image: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image)))


@pytest.fixture(scope="module")
def synthesis_runs(ray_cluster, tmp_path_factory, gan_file, vae_file) -> dict:
    """Synthesis runs through the command line: an interpolation with one explicit and two random pairs on the
    sphere, and 6 DCGAN samples truncated at ψ = 0.5, in bf16 and in float32."""
    root = tmp_path_factory.mktemp("synth")
    inputs = root / "inputs"
    inputs.mkdir()
    camera = skimage.data.camera()
    for i in range(6):
        (inputs / f"item{i}.png").write_bytes(png(camera[60 * i : 60 * i + 28, 200:228]))
    out = str(root / "out")
    common = ["synthesize", "--out", out]
    argv = {
        "slerp": [
            "--model",
            vae_file,
            "--mode",
            "interpolate",
            "--inputs",
            str(inputs),
            "--pairs",
            "item0.png:item3.png",
        ]
        + ["--random-pairs", "2", "--steps", "3", "--slerp", "--seed", "4"],
        "truncated": ["--model", gan_file, "--count", "6", "--seed", "3", "--truncation", "0.5"],
        "bf16": ["--model", gan_file, "--count", "6", "--seed", "3", "--precision", "bf16"],
        "float32": ["--model", gan_file, "--count", "6", "--seed", "3", "--precision", "float32"],
    }
    for run_id, args in argv.items():
        assert main([*common, "--run-id", run_id, *args]) == 0, args
    return {"inputs": inputs, "out": out, "run": lambda run_id: storage.join(out, f"run_id={run_id}")}


def vae_reference(vae_file: str, inputs: Path, pair: list[str], alphas, mix) -> np.ndarray:
    """What interpolating `pair` gives, worked out here in float64: the means of the two encodings, mixed by `mix`,
    decoded and quantised. Returns (T, 28, 28) uint8."""
    module = load_named(vae_file).module.double().eval()
    x = torch.stack([torch.from_numpy(codec.decode((inputs / k).read_bytes()).pixels.transpose(2, 0, 1)) for k in pair])
    with torch.inference_mode():
        mu, _ = module.encode(x.double())
        z = torch.stack([mix(mu[0], mu[1], float(t)) for t in alphas])
        images = module.decode(z).float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return images[:, 0].numpy()


def shoemake(a, b, t: float):
    """slerp(a, b; t) = sin((1 - t) Ω) / sin Ω · a + sin(t Ω) / sin Ω · b, with Ω the angle between a and b."""
    omega = math.acos(float(torch.dot(a, b) / (a.norm() * b.norm())))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def test_slerp_and_random_pairs(synthesis_runs, vae_file):
    inputs = synthesis_runs["inputs"]
    rows = images_by_index(synthesis_runs["run"]("slerp"))
    assert sorted(rows) == list(range(9))  # 3 pairs x 3 steps
    pairs = [rows[3 * p]["source_keys"] for p in range(3)]
    assert pairs[0] == ["item0.png", "item3.png"]  # the explicit pair first, then the random ones
    keys = {p.name for p in inputs.iterdir()}
    assert all(len(set(pair)) == 2 and set(pair) <= keys for pair in pairs), pairs

    def lerp(a, b, t: float):
        return (1 - t) * a + t * b

    moved = 0
    for p, pair in enumerate(pairs):
        assert [rows[3 * p + j]["source_keys"] for j in range(3)] == [pair] * 3
        assert [rows[3 * p + j]["alpha"] for j in range(3)] == [0.0, 0.5, 1.0]
        expected = vae_reference(vae_file, inputs, pair, (0.0, 0.5, 1.0), shoemake)
        got = np.stack([samples(rows[3 * p + j]["image"]) for j in range(3)])
        np.testing.assert_array_equal(got, expected)
        # The straight line between the same end points passes elsewhere: the run interpolated on the sphere.
        moved += int(np.any(vae_reference(vae_file, inputs, pair, (0.5,), lerp)[0] != got[1]))
    assert moved >= 1


def gan_reference(gan_file: str, seed: int, count: int, truncation: float | None = None) -> np.ndarray:
    """Row i of a DCGAN sample run worked out here in float64: G(z_i), z_i from (seed, i). Returns (N, S, S) uint8."""
    module = load_named(gan_file).module.double().eval()
    latent_dim = load_named(gan_file).config.latent_dim
    z = torch.stack([latent_for(seed, i, latent_dim, truncation) for i in range(count)]).double()
    with torch.inference_mode():
        images = module.generator(z).float().add(1).div(2).clamp(0, 1).mul(255).round().to(torch.uint8)
    return images[:, 0].numpy()


def sampled(run: str) -> np.ndarray:
    rows = images_by_index(run, ("index", "image"))
    assert sorted(rows) == list(range(6))
    return np.stack([samples(rows[i]["image"]) for i in range(6)])


def test_truncation_samples_the_truncated_latents(synthesis_runs, gan_file):
    got = sampled(synthesis_runs["run"]("truncated"))
    np.testing.assert_array_equal(got, gan_reference(gan_file, 3, 6, truncation=0.5))  # float64: byte for byte
    assert np.any(got != gan_reference(gan_file, 3, 6))  # ... and not the untruncated ones
    assert manifest(synthesis_runs["run"]("truncated"))["config"]["truncation"] == 0.5


def test_precision_float32_and_bf16_stay_close_to_float64(synthesis_runs, gan_file):
    exact = gan_reference(gan_file, 3, 6).astype(int)
    float32 = sampled(synthesis_runs["run"]("float32")).astype(int)
    bf16 = sampled(synthesis_runs["run"]("bf16")).astype(int)
    assert np.abs(float32 - exact).max() <= 1  # float32 rounds a pixel by one step now and then
    assert np.any(bf16 != exact) and np.mean(bf16 != exact) > np.mean(float32 != exact)  # bf16 really ran
    assert psnr(bf16 / 255.0, exact / 255.0) > 30
    for run_id in ("float32", "bf16"):
        assert manifest(synthesis_runs["run"](run_id))["config"]["precision"] == run_id


# --------------------------------------------------------------------------------------------------------------- gpu
def test_gpu_on_a_cluster_without_gpus_is_one_line_and_writes_nothing(ray_cluster, tmp_path, gan_file, capsys):
    """`--gpu` where Ray has no GPU: each command exits 2 with one line naming the flag, and leaves no run behind."""
    import ray

    assert ray.cluster_resources().get("GPU", 0) == 0  # the suite's local cluster is CPU-only
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.png").write_bytes(png(skimage.data.camera()[:32, :32]))
    model = tmp_path / "tiny.pt"
    tiny = Restorer(RestorerConfig(depth=3, width=8))
    save_model(model, "restorer", tiny.config, tiny)
    out = tmp_path / "out"
    commands = {
        "restore": ["restore", str(images), str(out / "r"), "--model", str(model), "--gpu", "--run-id", "g"],
        "synthesize": ["synthesize", "--model", gan_file, "--count", "4", "--out", str(out / "s"), "--gpu"],
        "train": ["train", "restorer", "--data", str(images), "--storage", str(out / "t"), "--name", "g", "--gpu"],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["restoration: error: --gpu was given but the Ray cluster has no GPUs"], (name, err)
        written = [p for p in out.rglob("*") if p.is_file()]
        assert not written, (name, written)
