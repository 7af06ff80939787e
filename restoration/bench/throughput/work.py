"""The benchmark's images: square crops of real photos, with noise baked into 8-bit PNGs, and where they are put.

The default work is 256 noisy (sigma 25) 256x256 crops of Set12/Train400; the restore section repeats them under new
keys until the raw model alone needs `--min-model-seconds`.
"""

from __future__ import annotations

import io
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from restoration import data, samples, sources, storage
from restoration.bench.throughput.config import ThroughputConfig
from restoration.errors import UserError

MIXED_SIZES = (180, 256, 512)  # Train400's size, Set12's two sizes
DEFAULT_FOLDERS = ("Set12", "Train400")  # under `sources.datasets_dir`


@dataclass(frozen=True)
class WorkImage:
    key: str
    png: bytes
    height: int
    width: int


class Work(NamedTuple):
    noisy: list[WorkImage]  # the restore inputs
    clean: list[WorkImage]  # the same crops without noise: the training data
    origin: str  # where the crops came from


@dataclass(frozen=True)
class Staged:
    """Images uploaded as objects and ingested into input shards (`stage_inputs`)."""

    raw: str  # URI of the objects
    shards: str  # URI of the shards
    shard_files: int
    rows: int
    upload_s: float
    ingest_s: float


def _open_uint8(path: Path, gray: bool) -> np.ndarray:
    with Image.open(path) as image:
        colour = not gray and image.mode not in ("1", "L", "LA", "I", "I;16", "F")
        return np.asarray(image.convert("RGB" if colour else "L"))


def source_images(folder: str | None, datasets: str | None = None) -> tuple[list[np.ndarray], str]:
    """The photos crops are cut from: `folder`, else Set12 + Train400 of `datasets` (see `sources.datasets_dir`),
    else the sample photos (as gray).

    Returns:
        (uint8 arrays (H, W) or (H, W, 3), a description of where they came from).
    """
    if folder is not None:
        paths = sources.image_paths(folder)
        if not paths:
            raise UserError(f"--images {folder!r} holds no image files ({', '.join(sources.IMAGE_SUFFIXES)})")
        return [_open_uint8(p, gray=False) for p in paths], str(folder)
    root = sources.datasets_dir(datasets)
    folders = [root / name for name in DEFAULT_FOLDERS]
    if all(f.is_dir() for f in folders):
        paths = [p for f in folders for p in sources.image_paths(f)]
        return [_open_uint8(p, gray=True) for p in paths], f"Set12 + Train400 ({root})"
    names = samples.GRAY_PHOTOS + samples.COLOR_PHOTOS
    return [_open_uint8(samples.sample_photo(n), gray=True) for n in names], "restoration.samples photos (gray)"


def cut_crops(sources: list[np.ndarray], count: int, sizes: tuple[int, ...], rng: np.random.Generator) -> list:
    """`count` square crops, the i-th of side sizes[i % len(sizes)], each from a random source large enough (the
    largest source scaled up when none is) at a random offset.

    Returns:
        uint8 arrays (S, S) or (S, S, 3).
    """
    crops = []
    for i in range(count):
        size = sizes[i % len(sizes)]
        fitting = [s for s in sources if min(s.shape[:2]) >= size]
        if fitting:
            src = fitting[int(rng.integers(len(fitting)))]
        else:
            big = max(sources, key=lambda s: min(s.shape[:2]))
            scale = size / min(big.shape[:2])
            w, h = math.ceil(big.shape[1] * scale), math.ceil(big.shape[0] * scale)
            src = np.asarray(Image.fromarray(big).resize((w, h), Image.Resampling.LANCZOS))
        y = int(rng.integers(src.shape[0] - size + 1))
        x = int(rng.integers(src.shape[1] - size + 1))
        crops.append(np.ascontiguousarray(src[y : y + size, x : x + size]))
    return crops


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_work(config: ThroughputConfig) -> Work:
    """The distinct benchmark images, keyed `img-000000.png`, ...: noisy crops as PNG and the clean ones."""
    rng = np.random.default_rng(config.seed)
    photos, origin = source_images(config.images, config.datasets)
    sizes = MIXED_SIZES if config.mixed_sizes else (config.size,)
    noisy, clean = [], []
    for i, crop in enumerate(cut_crops(photos, config.count, sizes, rng)):
        key, (h, w) = f"img-{i:06d}.png", crop.shape[:2]
        clean.append(WorkImage(key, png(crop), h, w))
        if config.noise > 0:  # N(0, sigma/255) on [0, 1] images, i.e. sigma on the 0-255 scale, then 8-bit PNG
            crop = np.clip(np.rint(crop + rng.normal(0.0, config.noise, crop.shape)), 0, 255).astype(np.uint8)
        noisy.append(WorkImage(key, png(crop), h, w))
    return Work(noisy, clean, origin)


def repeat_work(work: list[WorkImage], count: int) -> list[WorkImage]:
    """`count` images cycling through `work`, each under a new key."""
    return [
        WorkImage(f"img-{i:06d}.png", w.png, w.height, w.width)
        for i, w in ((i, work[i % len(work)]) for i in range(count))
    ]


def megapixels(work: list[WorkImage]) -> float:
    return sum(w.height * w.width for w in work) / 1e6


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.strip("/")


def upload(work: list[WorkImage], prefix_uri: str, threads: int = 8) -> float:
    """PUT each image as its own object under `prefix_uri` (or write it as a file under a local folder). Returns the
    seconds taken."""
    t0 = time.perf_counter()
    if not storage.is_s3(prefix_uri):
        Path(prefix_uri).mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda w: Path(prefix_uri, w.key).write_bytes(w.png), work))
        return time.perf_counter() - t0
    bucket, prefix = split_s3(prefix_uri)
    client = storage.boto3_client()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda w: client.put_object(Bucket=bucket, Key=f"{prefix}/{w.key}", Body=w.png), work))
    return time.perf_counter() - t0


def stage_inputs(work: list[WorkImage], root: str, shard_mb: float) -> Staged:
    """Upload the images as objects under `root/raw`, then ingest them into shards under `root/shards`."""
    raw, shards = storage.join(root, "raw"), storage.join(root, "shards")
    upload_s = upload(work, raw)
    report = data.ingest(raw, shards, shard_mb=shard_mb, executor="local")
    if report.errors or report.rows != len(work):
        raise RuntimeError(f"ingest of {raw} wrote {report.rows} of {len(work)} rows; errors: {report.errors[:3]}")
    return Staged(raw, shards, len(report.shards), report.rows, upload_s, report.seconds)
