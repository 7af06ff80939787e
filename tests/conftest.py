"""Shared fixtures: one embedded S3 server and one local Ray per test session, and the datasets.

Tests that need neither never start them (the fixtures are lazy). Datasets come from `../shared/datasets` beside the
checkout; on a clone without it, the same tests run on photos that ship inside scikit-image, converted to match.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def s3():
    """A real SeaweedFS S3 server on 127.0.0.1 (free ports), its AWS_* variables set for the whole session."""
    from restoration.s3server import EmbeddedS3

    server = EmbeddedS3().start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """One local Ray for the session, started after the S3 variables are set so its workers inherit them."""
    import ray

    from restoration.cluster import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def _fallback_gray(folder: Path, size: int, count: int, names: tuple[str, ...]) -> Path:
    """Gray crops of scikit-image photos as PNG files: a stand-in for Train400/Set12 on a clone without them."""
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    crops = []
    for name in names:
        image = np.asarray(Image.fromarray(getattr(skdata, name)()).convert("L"))
        h, w = image.shape
        for y in range(0, h - size + 1, size):
            for x in range(0, w - size + 1, size):
                crops.append(image[y : y + size, x : x + size])
    for i, crop in enumerate(crops[:count]):
        Image.fromarray(crop).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def train400(tmp_path_factory) -> Path:
    """The DnCNN training set (400 gray 180×180 PNG), or gray crops of sample photos."""
    path = SHARED_DATASETS / "Train400"
    if path.is_dir():
        return path
    return _fallback_gray(
        tmp_path_factory.mktemp("train400"),
        180,
        400,
        ("camera", "astronaut", "coffee", "chelsea", "rocket", "page", "text"),
    )


@pytest.fixture(scope="session")
def set12(tmp_path_factory) -> Path:
    """The Set12 evaluation images (gray, 256×256 and 512×512), or gray crops of other sample photos."""
    path = SHARED_DATASETS / "Set12"
    if path.is_dir():
        return path
    return _fallback_gray(tmp_path_factory.mktemp("set12"), 256, 12, ("coins", "moon", "brick", "grass", "gravel"))


@pytest.fixture(scope="module")
def gan_file(tmp_path_factory) -> str:
    """An untrained but real DCGAN model file (the synthesis plumbing is under test, not the images' quality)."""
    import torch

    from restoration.checkpoint import save_model
    from restoration.models.dcgan import DCGAN, DCGANConfig

    torch.manual_seed(0)
    model = DCGAN(DCGANConfig(g_width=16, d_width=16, latent_dim=32))
    path = tmp_path_factory.mktemp("models") / "gan.pt"
    save_model(path, "dcgan", model.config, model)
    return str(path)
