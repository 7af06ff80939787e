"""Bulk synthesis through a real local Ray and real S3: reproducibility across batchings, exact counts, resume,
interpolation end points, scheduled runs, and the scheduling manifests."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from restoration import storage
from restoration.checkpoint import save_model
from restoration.models.vae import VAE, VAEConfig
from restoration.pipelines.synthesize import SynthesizeConfig, run_synthesize, scheduled_config
from restoration.runs import read_output

REPO = Path(__file__).resolve().parents[1]


def images_by_index(uri: str) -> dict[int, bytes]:
    table = read_output(uri, ["index", "image"])
    return dict(zip(table.column("index").to_pylist(), table.column("image").to_pylist(), strict=True))


def test_same_seed_and_index_give_identical_pngs_whatever_the_batching(s3, ray_cluster, gan_file):
    out = s3.uri("synth", "repro")
    a = run_synthesize(
        SynthesizeConfig(model=gan_file, output=out, count=60, seed=5, run_id="a", workers=1, batch_size=7)
    )
    b = run_synthesize(
        SynthesizeConfig(model=gan_file, output=out, count=60, seed=5, run_id="b", workers=2, batch_size=16)
    )
    assert a.rows_out == b.rows_out == 60 and a.complete and b.complete
    first, second = images_by_index(storage.join(out, "run_id=a")), images_by_index(storage.join(out, "run_id=b"))
    assert sorted(first) == list(range(60)) and first == second
    other = run_synthesize(SynthesizeConfig(model=gan_file, output=out, count=4, seed=6, run_id="c"))
    assert other.rows_out == 4 and images_by_index(storage.join(out, "run_id=c"))[0] != first[0]


def test_counts_keys_resume_and_preview(s3, ray_cluster, gan_file):
    out = s3.uri("synth", "resume")
    # An interrupted run: only the first 30 of 100 images made it.
    run_synthesize(SynthesizeConfig(model=gan_file, output=out, count=30, run_id="r"))
    with pytest.raises(ValueError, match="--resume"):
        run_synthesize(SynthesizeConfig(model=gan_file, output=out, count=100, run_id="r"))
    report = run_synthesize(SynthesizeConfig(model=gan_file, output=out, count=100, run_id="r", resume=True))
    assert report.skipped_resumed == 30 and report.rows_out == 100 and report.duplicates == 0 and report.complete
    assert sum(report.phase_seconds.values()) == pytest.approx(report.seconds, abs=1e-6)
    table = read_output(storage.join(out, "run_id=r"), ["key", "index", "seed", "width", "height", "error"])
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == 100 and sorted(table.column("index").to_pylist()) == list(range(100))
    assert "r/000000000042" in keys and table.column("error").null_count == 100
    assert set(table.column("width").to_pylist()) == {28}
    preview = Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "run_id=r", "_preview.png"))))
    assert preview.size[0] > 8 * 28


def test_interpolation_end_points_are_the_reconstructions(s3, ray_cluster, vae_file, fashion_mnist):
    from restoration.sources import read_idx

    folder = s3.uri("synth", "inputs")
    images = read_idx(f"{fashion_mnist}/t10k-images-idx3-ubyte.gz", 0, 6)
    for i, image in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        storage.write_bytes(storage.join(folder, f"item{i}.png"), buf.getvalue())
    out = s3.uri("synth", "interp")
    pairs = (("item0.png", "item3.png"), ("item5.png", "item1.png"))
    interp = run_synthesize(
        SynthesizeConfig(
            model=vae_file, output=out, mode="interpolate", inputs=folder, pairs=pairs, steps=5, run_id="i"
        )
    )
    assert interp.rows_out == 10 and interp.errors == 0
    recon = run_synthesize(
        SynthesizeConfig(model=vae_file, output=out, mode="reconstruct", inputs=folder, run_id="rec")
    )
    assert recon.rows_out == 6
    rows = read_output(storage.join(out, "run_id=i"), ["index", "image", "source_keys", "alpha"]).to_pylist()
    by_index = {r["index"]: r for r in rows}
    rec_rows = read_output(storage.join(out, "run_id=rec"), ["image", "source_keys"]).to_pylist()
    reconstruction = {r["source_keys"][0]: r["image"] for r in rec_rows}
    for p, (a, b) in enumerate(pairs):
        start, end = by_index[p * 5], by_index[p * 5 + 4]
        assert start["source_keys"] == [a, b] and start["alpha"] == 0.0 and end["alpha"] == 1.0
        assert start["image"] == reconstruction[a] and end["image"] == reconstruction[b]
        assert by_index[p * 5 + 2]["image"] not in (reconstruction[a], reconstruction[b])


def test_a_finished_scheduled_run_is_left_untouched(s3, ray_cluster, gan_file):
    out = s3.uri("synth", "daily")
    config = scheduled_config(SynthesizeConfig(model=gan_file, output=out, count=20))
    assert config.resume and len(config.run_id) == 10 and config.run_id[4] == "-"  # YYYY-MM-DD
    run_synthesize(config)
    run_folder = storage.join(out, f"run_id={config.run_id}")
    before = {i.path: storage.read_bytes("s3://" + i.path) for i in storage.list_files(run_folder)}
    again = run_synthesize(scheduled_config(SynthesizeConfig(model=gan_file, output=out, count=20)))
    after = {i.path: storage.read_bytes("s3://" + i.path) for i in storage.list_files(run_folder)}
    assert again.complete and before == after  # nothing rewritten, not even the manifest


def test_wrong_model_kind_and_bad_arguments_are_one_line_errors(tmp_path, capsys):
    from restoration.cli import main
    from restoration.models.restorer import Restorer, RestorerConfig

    restorer = Restorer(RestorerConfig(depth=3, width=4))
    save_model(tmp_path / "r.pt", "restorer", restorer.config, restorer)
    assert main(["synthesize", "--model", str(tmp_path / "r.pt"), "--count", "3", "--out", str(tmp_path)]) == 2
    assert "expected a dcgan or vae" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["synthesize", "--model", "x", "--count", "-5", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "-5" in capsys.readouterr().err


def test_scheduling_manifests_are_valid_yaml_and_the_job_has_help():
    documents = list(yaml.safe_load_all((REPO / "jobs" / "schedule" / "rayjob-cronjob.yaml").read_text()))
    kinds = [d["kind"] for d in documents]
    assert kinds[:2] == ["CronJob", "ConfigMap"]
    rayjob = yaml.safe_load(documents[1]["data"]["rayjob.yaml"])
    assert rayjob["kind"] == "RayJob" and "jobs/scheduled_generation.py" in rayjob["spec"]["entrypoint"]
    assert documents[0]["spec"]["concurrencyPolicy"] == "Forbid"
    cron = (REPO / "jobs" / "schedule" / "crontab").read_text()
    assert "ray job submit" in cron and "scheduled_generation.py" in cron
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "scheduled_generation.py"), "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--scheduled" in proc.stdout


def test_latent_depends_only_on_seed_and_index():
    from restoration.inference import latent_for

    assert torch.equal(latent_for(3, 17, 8), latent_for(3, 17, 8))
    assert not torch.equal(latent_for(3, 17, 8), latent_for(3, 18, 8))
    assert float(latent_for(3, 17, 64, truncation=0.5).abs().max()) <= 0.5
    np.testing.assert_allclose(torch.stack([latent_for(0, i, 4) for i in range(4000)]).std().item(), 1.0, atol=0.05)


# Random float64 products, each also with one operand moved by 8 bytes in memory: a process that imported `restoration`
# gets the same bits for both (MKL's strict reproducibility mode), and so does a Ray worker of its cluster.
_MKL_PRODUCTS = """
import random, sys, torch
import restoration
torch.set_num_threads(1)
rng, changed = random.Random(0), 0
for _ in range(400):
    m, k, n = rng.randint(1, 300), rng.randint(1, 300), rng.randint(1, 300)
    a, b = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    moved = torch.empty(m * k + 1, dtype=torch.float64)[1:].view(m, k).copy_(a)
    changed += not torch.equal(moved @ b, a @ b)
print("changed", changed)
"""


def test_matrix_products_do_not_depend_on_where_their_operands_sit_in_memory(ray_cluster):
    import os

    import ray

    done = subprocess.run([sys.executable, "-c", _MKL_PRODUCTS], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["changed", "0"], done.stdout

    @ray.remote(num_cpus=0)
    def worker_env():
        return os.environ.get("MKL_CBWR")

    assert ray.get(worker_env.remote()) == os.environ["MKL_CBWR"] == "AUTO,STRICT"


def test_actor_rows_are_raw_samples_and_encoding_gives_the_pngs_of_the_generator_output(gan_file):
    """The actor only quantises; `encode_images` (a task of its own in the pipeline) makes the PNGs, byte for byte
    the PNGs of the generator's float output, and keeps error rows' null images."""
    import pyarrow as pa

    from restoration import codec
    from restoration.inference import GeneratorActor, latent_for
    from restoration.pipelines.synthesize import OUTPUT_SCHEMA, PIXELS_SCHEMA, encode_images

    actor = GeneratorActor(SynthesizeConfig(model=gan_file, output="unused", count=5, seed=4), run_id="r", threads=1)
    before = time.time()
    raw = actor(pa.table({"start": [0], "stop": [5]}))
    assert raw.schema == PIXELS_SCHEMA and raw.column("channels").to_pylist() == [1] * 5
    stamps = raw.column("generated_at").to_pylist()  # one generator batch: one stamp, taken when it finished
    assert len(set(stamps)) == 1 and before <= stamps[0] <= time.time()
    rows = raw.to_pylist()
    rows[2].update(pixels=None, width=None, height=None, channels=None, error="decode: broken")
    encoded = encode_images(pa.Table.from_pylist(rows, schema=PIXELS_SCHEMA))
    assert encoded.schema == OUTPUT_SCHEMA
    assert encoded.column("index").to_pylist() == [0, 1, 2, 3, 4]
    assert encoded.column("image")[2].as_py() is None and encoded.column("error")[2].as_py() == "decode: broken"

    with torch.inference_mode():
        z = torch.stack([latent_for(4, i, actor.loaded.config.latent_dim) for i in (0, 4)]).double()
        floats = actor.module.generator(z).add(1).div(2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for image, png in zip(floats, encoded.column("image").to_pylist()[::4], strict=True):
        assert png == codec.encode_png(image)
        assert np.array_equal(np.array(Image.open(io.BytesIO(png))), codec.to_uint(image, 8)[:, :, 0])


def test_an_actor_on_cpus_encodes_its_own_pngs_byte_for_byte_as_the_encode_tasks_do(gan_file):
    import pyarrow as pa

    from restoration.inference import GeneratorActor
    from restoration.pipelines.synthesize import OUTPUT_SCHEMA, encode_images

    config = SynthesizeConfig(model=gan_file, output="unused", count=70, seed=2, batch_size=16)
    items = pa.table({"start": [3, 40], "stop": [20, 70]})
    encoded = GeneratorActor(config, run_id="r", threads=1, encode=True)(items)
    separate = encode_images(GeneratorActor(config, run_id="r", threads=1)(items))
    assert encoded.schema == OUTPUT_SCHEMA
    assert encoded.column("index").to_pylist() == list(range(3, 20)) + list(range(40, 70))
    assert encoded.drop_columns(["generated_at"]).equals(separate.drop_columns(["generated_at"]))


@pytest.mark.parametrize(
    ("count", "done", "longest"),
    [
        (10, set(), 4),
        (10, {0, 1, 5}, 4),  # gaps at the start and in the middle
        (10, set(range(10)), 3),  # a finished run: nothing left
        (3_000, {7, 2_999}, 1_024),
        (10, {3, 15}, 4),  # a resumed run asked for fewer images than it already holds
        (5_000, set(range(0, 5_000, 2)), 1),  # every other index: 2,500 runs of one
    ],
)
def test_index_runs_cover_exactly_the_indices_left_to_generate(count, done, longest):
    from restoration.pipelines.synthesize import RUN_SCHEMA, index_runs

    table = index_runs(count, done, longest)
    assert table.schema == RUN_SCHEMA
    runs = table.to_pylist()
    assert all(0 < run["stop"] - run["start"] <= longest for run in runs)
    covered = [i for run in runs for i in range(run["start"], run["stop"])]
    assert covered == [i for i in range(count) if i not in done]


def test_vae_rows_come_from_its_mixture_prior_by_seed_and_index_alone(tmp_path):
    """A VAE with a fitted sampling prior: row i decodes prior_latents(eps_i, u_i), both drawn from (seed, i) alone,
    so a row is the same in any batch."""
    import pyarrow as pa

    from restoration import codec
    from restoration.inference import GeneratorActor, latent_for, uniforms_for

    assert torch.equal(uniforms_for(5, [3, 9]), uniforms_for(5, [9, 3]).flip(0))
    assert not torch.equal(uniforms_for(5, [3]), uniforms_for(6, [3]))
    torch.manual_seed(0)
    model = VAE(VAEConfig(width=16, latent_dim=8, prior_components=3))
    means = torch.stack([torch.full((8,), v) for v in (-3.0, 0.0, 3.0)])
    model.set_prior(torch.tensor([0.2, 0.3, 0.5]), means, torch.eye(8).repeat(3, 1, 1) * 0.3)
    path = tmp_path / "vae.pt"
    save_model(path, "vae", model.config, model)

    actor = GeneratorActor(SynthesizeConfig(model=str(path), output="unused", count=6, seed=5), run_id="r", threads=1)
    rows = actor(pa.table({"start": [0, 3], "stop": [3, 6]}))  # two runs of indices in one task
    alone = actor(pa.table({"start": [4], "stop": [5]}))
    assert alone.column("pixels")[0] == rows.column("pixels")[4]
    with torch.inference_mode():
        eps = torch.stack([latent_for(5, i, 8) for i in range(6)]).double()
        z = actor.module.prior_latents(eps, uniforms_for(5, list(range(6))))
        assert not torch.allclose(z, eps)  # the mixture moved them
        expected = codec.to_uint(actor.module.decode(z).permute(0, 2, 3, 1).numpy(), 8)
    got = [np.frombuffer(p, np.uint8).reshape(28, 28, 1) for p in rows.column("pixels").to_pylist()]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
