"""Shared fixtures: one embedded S3 server and one local Ray per test session, and the datasets.

Tests that need neither never start them (the fixtures are lazy), and tests that need one are marked `slow`. Datasets come from `../shared/datasets` beside the
checkout; on a clone without it, the same tests run on photos that ship inside scikit-image, converted to match.
Fashion-MNIST comes from the Debian package that `make test` installs; every test that needs it takes the
`fashion_mnist` fixture, which skips with the same reason where the package is missing. The datasets that several
modules train on or read back (Train400, the Fashion-MNIST test split) are ingested once per session, and the small
DnCNN that two modules need trained (one checks that it learned, the other restores with it) is trained once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from restoration.sources import datasets_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = datasets_dir()
FASHION_MNIST_REASON = "needs the Debian package dataset-fashion-mnist (make test installs it)"

# Ray Train's controller looks at its workers every 2 s by default, so each training run of the suite (and each restart
# after a fault) waits up to 2 s more to see that its workers finished or failed. Set here, before any Ray starts, so
# that the session's Ray and the ones the demo, the GPU kit and the two-node cluster start inherit it. A poll that a
# busy worker misses is only retried (a worker counts as hung after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 600 s).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# Fixtures that start a real component (the S3 server, a local Ray, a two-node cluster) or train a model take seconds to
# tens of seconds: a test that uses one is `slow`, so `make test-fast` runs the pure-Python tests alone.
SLOW_FIXTURES = {"s3", "ray_cluster", "cluster", "train400_shards", "fmnist_test_shards", "trained_restorer"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The Fashion-MNIST idx folder ($RESTORATION_FASHION_MNIST, else the Debian package's); skips where it is missing."""
    from restoration.sources import fashion_mnist_folder

    path = Path(fashion_mnist_folder())
    if not path.is_dir():
        pytest.skip(f"{FASHION_MNIST_REASON}; {path} does not exist")
    return path


@dataclass(frozen=True)
class Ingested:
    """Input shards written once for the session: where they are and the ingest's own report."""

    uri: str
    report: object  # restoration.data.IngestReport


@pytest.fixture(scope="session")
def train400_shards(s3, ray_cluster, train400) -> Ingested:
    """Train400 as Parquet shards on the embedded S3, in 2 MiB shards (several, so two workers each get some)."""
    from restoration import data

    uri = s3.uri("shared", "train400")
    return Ingested(uri, data.ingest(str(train400), uri, shard_mb=2))


@pytest.fixture(scope="session")
def fmnist_test_shards(s3, ray_cluster, fashion_mnist) -> Ingested:
    """The Fashion-MNIST test split (10,000 labelled images) as 1 MiB Parquet shards, ingested through Ray."""
    from restoration import data

    uri = s3.uri("shared", "fmnist-test")
    return Ingested(uri, data.ingest(str(fashion_mnist), uri, split="test", shard_mb=1, executor="ray"))


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


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory) -> str:
    """An untrained but real VAE model file (the synthesis plumbing is under test, not the images' quality)."""
    import torch

    from restoration.checkpoint import save_model
    from restoration.models.vae import VAE, VAEConfig

    torch.manual_seed(0)
    model = VAE(VAEConfig(width=16, latent_dim=8))
    path = tmp_path_factory.mktemp("models") / "vae.pt"
    save_model(path, "vae", model.config, model)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """An untrained but real restorer file, 4 layers of 8 channels (shape and plumbing tests), from seeded weights so
    that its output is the same on every machine."""
    import torch

    from restoration.checkpoint import save_model
    from restoration.models.restorer import Restorer, RestorerConfig

    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Restorer(RestorerConfig(depth=4, width=8))
    save_model(path, "restorer", model.config, model)
    return str(path)


@dataclass(frozen=True)
class TrainedRestorer:
    """The session's trained DnCNN: its model file and `fit_restorer`'s history."""

    path: str
    history: dict
    steps: int


@pytest.fixture(scope="session")
def trained_restorer(tmp_path_factory, train400) -> TrainedRestorer:
    """A 7-layer, 32-wide DnCNN trained for 40 steps at σ = 25 on 40x40 patches of 200 Train400 images, from seeded
    initial weights (about +5 dB on Set12): test_restorer_learns.py checks that it learned, test_restore_pipeline.py
    restores with it."""
    import torch

    from restoration.checkpoint import save_model
    from restoration.models.restorer import Restorer, RestorerConfig
    from restoration.sources import load_images
    from restoration.train.restorer_core import FitConfig, NoiseSpec, fit_restorer

    steps = 40
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Restorer(RestorerConfig(depth=7, width=32))
    images = load_images(train400, channels=1, limit=200)
    config = FitConfig(patch_size=40, batch_size=32, lr=2e-3, steps=steps, noise=NoiseSpec(25.0))
    history = fit_restorer(model, images, config)
    path = tmp_path_factory.mktemp("models") / "trained.pt"
    save_model(path, "restorer", model.config, model, meta={"trained_steps": steps})
    return TrainedRestorer(str(path), history, steps)
