"""`make demo`: the main job end to end on embedded defaults — a real S3 server on loopback, the sample photos that
ship with scikit-image and scikit-learn, and a local Ray cluster when one is needed."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from restoration import data, samples, storage
from restoration.s3server import EmbeddedS3


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


def run_demo(out: str | None = None) -> dict:
    """Run the demo and print what it wrote.

    Args:
        out: local folder for outputs a person looks at (default ./demo-output).

    Returns:
        A summary dict (used by the test of the README's quick start).
    """
    out_dir = Path(out or "demo-output").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedS3() as s3, _environment(s3.env), tempfile.TemporaryDirectory() as tmp:
        print(f"embedded S3 (SeaweedFS) at {s3.endpoint}, bucket s3://{s3.bucket}")
        photos = samples.copy_sample_photos(Path(tmp) / "photos")
        print(f"sample photos: {len(photos)} ({', '.join(p.name for p in photos)})")

        shards_uri = s3.uri("demo", "shards")
        report = data.ingest(str(Path(tmp) / "photos"), shards_uri, shard_mb=1.0)
        print(report.summary())
        for info in storage.list_files(shards_uri):
            print(f"  s3://{info.path}  {info.size / 1024:.0f} KiB")
        return {"ingest": report, "out": str(out_dir)}
