"""What one `restoration bench throughput` run measures."""

from __future__ import annotations

import math
from dataclasses import dataclass

from restoration import storage
from restoration.errors import UserError

SECTIONS = ("restore", "upscale", "synthesis", "training")


@dataclass(frozen=True)
class ThroughputConfig:
    """What one benchmark run measures; every field is a command-line option of the same name."""

    only: tuple[str, ...] = SECTIONS
    images: str | None = None  # folder of images; None: Train400 + Set12 of `datasets`, or the sample photos
    datasets: str | None = None  # folder of Train400 and Set12; None: `sources.datasets_dir()`
    count: int = 256
    size: int = 256
    mixed_sizes: bool = False
    noise: float = 25.0  # sigma (0-255) of the Gaussian noise baked into the input PNGs; 0 keeps the images as they are
    model: str = "denoise-gray"
    upscale_model: str = "upscale-gray-x2"  # the upscale section's model, on the crops without noise
    batch_size: int | None = None  # None: RestoreConfig's default, from the first image's size (`auto_batch_size`)
    compile: bool = False  # torch.compile the restorer, in the limit loop and in the pipeline's actors alike
    # About two minutes of pure model time is the smallest run whose numbers say something about a long batch job:
    # shorter, and start-up costs dominate.
    min_model_seconds: float = 120.0
    shard_mb: float = 4.0
    synth_model: str = "dcgan-fmnist"
    synth_count: int = 100_000  # about a minute of the raw generator on 2 cores, so start-up does not dominate
    synth_batch_size: int = 64  # SynthesizeConfig's default
    train_preset: str = "restorer-dncnn-cpu"
    train_epochs: int = 4
    train_steps_per_epoch: int = 50
    scale_check: bool = False
    store: str | None = None  # s3://bucket/prefix; None: an embedded SeaweedFS server (or `local`)
    local: str | None = None  # a local folder instead of S3: no S3 server, and the naive script reads/writes files
    naive_count: int | None = None  # images the naive script restores (the first ones); None: all of them
    out_dir: str = "bench-output"
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.only if s not in SECTIONS]
        if not self.only or unknown:
            raise UserError(f"--only must name some of {', '.join(SECTIONS)}, got {','.join(self.only)!r}")
        for name in ("count", "size", "batch_size", "synth_count", "synth_batch_size", "train_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.train_steps_per_epoch < 1:
            raise UserError(f"--train-steps-per-epoch must be >= 1, got {self.train_steps_per_epoch}")
        if not (self.min_model_seconds >= 0 and math.isfinite(self.min_model_seconds)):
            raise UserError(f"--min-model-seconds must be a number >= 0, got {self.min_model_seconds}")
        if not (0 <= self.noise < math.inf) or not self.shard_mb > 0:
            raise UserError(f"--noise must be >= 0 and --shard-mb > 0, got {self.noise} and {self.shard_mb}")
        if self.store is not None and not storage.is_s3(self.store):
            raise UserError(f"--store must be an s3://bucket/prefix URI, got {self.store!r}")
        if self.local is not None and (self.store is not None or storage.is_s3(self.local)):
            raise UserError(f"--local takes a local folder and excludes --store, got {self.local!r}")
        if self.naive_count is not None and self.naive_count < 1:
            raise UserError(f"--naive-count must be >= 1, got {self.naive_count}")
