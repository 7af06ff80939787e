"""`make demo`: the main job end to end on embedded defaults — a real S3 server on loopback (SeaweedFS), a local Ray
cluster, the bundled denoisers (`denoise-gray` for the gray photos, `denoise-color` for the colour ones), and the
sample photos that ship with scikit-image and scikit-learn.

    sample photos ─ ingest ─► Parquet shards on S3 ─ restore --degrade noise:25 ─► Parquet on S3 ─► ./demo-output/
    bundled DCGAN and VAE ─ synthesize 64 images each ─► Parquet on S3, preview grids ─► ./demo-output/
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from restoration import codec, data, degrade, metrics, samples, storage
from restoration.s3server import EmbeddedS3

DEMO_MODEL = "denoise"  # the gray or colour denoiser, per photo
DEMO_DEGRADATION = "noise:25"
DEMO_GENERATORS = ("dcgan-fmnist", "vae-fmnist")


@contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_demo(out: str | None = None, model: str = DEMO_MODEL) -> dict:
    """Run the demo and print what it wrote.

    Args:
        out: local folder for what a person looks at (default ./demo-output): the run's Parquet and manifest, copied
            from the embedded S3 before it stops, and a contact sheet PNG (degraded | restored | clean).
        model: restorer to use (bundled name or model file).

    Returns:
        {"ingest": IngestReport, "restore": RestoreReport, "out": folder, "contact_sheet": path}.
    """
    from restoration.pipelines.restore import RestoreConfig, run_restore
    from restoration.pipelines.synthesize import SynthesizeConfig, run_synthesize

    out_dir = Path(out or "demo-output").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedS3() as s3, _environment(s3.env), tempfile.TemporaryDirectory() as tmp:
        print(f"embedded S3 (SeaweedFS) at {s3.endpoint}, bucket s3://{s3.bucket}")
        photos = samples.copy_sample_photos(Path(tmp) / "photos")
        print(f"sample photos: {len(photos)} ({', '.join(p.name for p in photos)})")

        # Ingest: photos -> Parquet shards on S3.
        shards = s3.uri("demo", "shards")
        ingested = data.ingest(str(Path(tmp) / "photos"), shards, shard_mb=1.0)
        print(ingested.summary())
        for info in storage.list_files(shards):
            print(f"  s3://{info.path}  {info.size / 1024:.0f} KiB")

        # Restore: degrade with σ = 25 noise (so there is a clean reference), restore, write Parquet on S3.
        output = s3.uri("demo", "restored")
        config = RestoreConfig(input=shards, output=output, model=model, degrade=DEMO_DEGRADATION, run_id="demo")
        report = run_restore(config)
        print(report.summary())

        # Copy the run out of the temporary S3 store, and draw the contact sheet.
        run_uri = storage.join(output, "run_id=demo")
        local_run = out_dir / "run_id=demo"
        for info in storage.list_files(run_uri):
            relative = posixpath.relpath(info.path, storage.resolve(run_uri)[1])
            storage.write_bytes(str(local_run / relative), storage.read_bytes("s3://" + info.path))
        sheet_path = out_dir / "contact_sheet.png"
        Image.fromarray(_contact_sheet(shards, local_run, config)).save(sheet_path)
        print(f"wrote {local_run}/ (Parquet + _manifest.json) and {sheet_path} (degraded | restored | clean)")

        # Synthesize: a small batch from each bundled generator, its preview grid copied out.
        synthesized = {}
        for generator in DEMO_GENERATORS:
            run = run_synthesize(
                SynthesizeConfig(model=generator, output=s3.uri("demo", "generated"), count=64, run_id=generator)
            )
            print(run.summary())
            preview = out_dir / f"{generator}_samples.png"
            preview.write_bytes(storage.read_bytes(storage.join(run.output, "_preview.png")))
            print(f"wrote {preview}")
            synthesized[generator] = run
        return {
            "ingest": ingested,
            "restore": report,
            "synthesize": synthesized,
            "out": str(out_dir),
            "contact_sheet": str(sheet_path),
        }


def _contact_sheet(shards: str, run_folder: Path, config) -> np.ndarray:
    """degraded | restored | clean for every photo; the degraded image is recomputed from the same (seed, key)."""
    fs, _ = storage.resolve(shards)
    inputs = pa.concat_tables(
        pq.read_table(f, filesystem=fs, columns=["key", "image"]) for f in data.shard_files(shards)
    )
    outputs = pa.concat_tables(
        pq.read_table(p, columns=["key", "image", "error"]) for p in run_folder.glob("*.parquet")
    )
    restored = {r["key"]: r["image"] for r in outputs.to_pylist() if r["error"] is None}
    columns: list[list[np.ndarray]] = [[], [], []]
    for row in sorted(inputs.to_pylist(), key=lambda r: r["key"]):
        if row["key"] not in restored:
            continue
        clean = codec.decode(row["image"]).pixels
        noisy = degrade.apply(clean, config.degrade, degrade.rng_for(config.seed, row["key"]))
        columns[0].append(np.clip(noisy, 0, 1))
        columns[1].append(
            np.asarray(Image.open(io.BytesIO(restored[row["key"]])).convert("RGB" if clean.shape[2] == 3 else "L"))
        )
        columns[2].append(clean)
    return metrics.contact_sheet(columns, labels=[f"degraded ({config.degrade})", "restored", "clean"], crop=96)
