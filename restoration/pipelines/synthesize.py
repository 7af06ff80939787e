"""The synthesis pipeline: items → generator actors (GAN / VAE) → PNG → Parquet under OUT/run_id=<id>/.

    sample:       range(N) → z_i from a generator seeded by (seed, i) alone → G(z_i), or decode(z_i) with z_i
                  mapped to the VAE's sampling prior (its fitted mixture, or N(0, I))
    interpolate:  pairs of input images → VAE encode (μ) → lerp/slerp at T alphas → decode
    reconstruct:  input images → VAE encode (μ) → decode

Reproducible by construction: row i's latent depends only on (seed, i), and the generator runs in float64 on the CPU
(bf16/float32 on GPUs is opt-in), so the same model, seed and index give byte-identical PNGs whatever the batch
size, the number of workers or retries — float32 convolutions differ in the last bits between batch sizes, which
is enough to flip a rounded pixel now and then. Counts scale to millions: rows stream through Ray Data and nothing
collects them on the driver; the run's `_preview.png` (the first 64 images) and `_manifest.json` come last.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image

from restoration import codec, data, degrade, files, storage
from restoration.cluster import DATA_TASK_CPUS
from restoration.pipelines.restore import (
    default_run_id,
    phase_seconds,
    read_output,
    remove_tree,
    rows_dir,
    run_dir,
    staging_dir,
    write_attempt,
)

MODES = ("sample", "interpolate", "reconstruct")
OUTPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("index", pa.int64()),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("model_sha256", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_keys", pa.list_(pa.string())),
        ("alpha", pa.float64()),
        ("run_id", pa.string()),
        ("error", pa.string()),
        # Unix seconds when the generator finished the row's batch (or the row failed): the run's timeline, unblurred
        # by the encode and the write, which take whole tasks of rows at a time.
        ("generated_at", pa.float64()),
        ("file", pa.string()),  # with --format files/both: the image file written, relative to the run folder
    ]
)
# What the generator runs give: OUTPUT_SCHEMA with the image as raw uint8 samples (height, width, channels), which
# `encode_images` turns into PNG, inside the actor on CPUs and in tasks of its own beside a GPU actor.
PIXELS_SCHEMA = pa.schema(
    [f for f in OUTPUT_SCHEMA if f.name != "image"]
    + [pa.field("pixels", pa.binary()), pa.field("channels", pa.int32())]
)
# What the actors receive in sample mode: runs of consecutive output indices [start, stop), one actor task's worth
# each (see `task_rows`), made on the driver, so no read tasks (and no worker processes for them) stand between the
# start of a run and its first generator batch.
RUN_SCHEMA = pa.schema([("start", pa.int64()), ("stop", pa.int64())])
# What they receive in the other modes: one row per input item.
ITEM_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),  # first output index of the item
        ("source_keys", pa.list_(pa.string())),
        ("sources", pa.list_(pa.binary())),  # encoded input images (interpolate: 2, reconstruct: 1)
    ]
)


# The fields that decide which images a run holds (not how it was scheduled): a finished run with the same ones is
# left untouched by a rerun.
_WORK_FIELDS = (
    *("mode", "count", "seed", "truncation", "inputs", "pairs", "random_pairs", "steps", "slerp", "precision"),
    *("format", "image_format", "quality"),
)


@dataclass(frozen=True)
class SynthesizeConfig:
    model: str
    output: str
    count: int = 0  # sample mode: number of images
    mode: str = "sample"
    seed: int = 0
    run_id: str | None = None
    resume: bool = False
    truncation: float | None = None  # GAN truncation ψ (sample mode)
    inputs: str | None = None  # interpolate / reconstruct: input shards or image folder
    pairs: tuple[tuple[str, str], ...] = ()  # interpolate: explicit (key_a, key_b) pairs ...
    random_pairs: int = 0  # ... or this many pairs drawn from the inputs with `seed`
    steps: int = 8  # interpolate: images per pair (alpha = 0 ... 1)
    slerp: bool = False
    workers: int | None = None
    batch_size: int = 64
    precision: str = "float64"  # float64 (reproducible across batchings), float32, bf16 (GPU)
    gpu: bool | None = None
    format: str = "parquet"  # "parquet", "files" (OUT/run_id=<id>/<index>.png) or "both" (see restoration.files)
    image_format: str = "png"  # the files' format: png, jpeg or webp
    quality: int = 95  # JPEG/WebP quality of the files

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "sample" and self.count < 1:
            raise ValueError(f"--count must be >= 1, got {self.count}")
        if self.mode != "sample" and not self.inputs:
            raise ValueError(f"--mode {self.mode} needs --inputs (input shards or a folder of images)")
        if self.mode == "interpolate" and not self.pairs and self.random_pairs < 1:
            raise ValueError("--mode interpolate needs --pairs A:B,... or --random-pairs K (K >= 1)")
        if self.steps < 2:
            raise ValueError(f"--steps must be >= 2 (alpha 0 and 1 at least), got {self.steps}")
        if self.truncation is not None and not (self.truncation > 0 and math.isfinite(self.truncation)):
            raise ValueError(f"--truncation must be a number > 0, got {self.truncation}")
        if self.batch_size < 1 or (self.workers is not None and self.workers < 1):
            raise ValueError("--batch-size and --workers must be >= 1")
        if self.precision not in ("float64", "float32", "bf16"):
            raise ValueError(f"--precision must be float64, float32 or bf16, got {self.precision!r}")
        files.check_options(self.format, self.image_format, self.quality)


def load_generator(name_or_path: str, mode: str):
    """Load a dcgan or vae model file; interpolate/reconstruct need a VAE."""
    from restoration.checkpoint import ModelFileError, load_named

    loaded = load_named(name_or_path)
    if loaded.kind not in ("dcgan", "vae"):
        raise ModelFileError(f"{name_or_path} holds a {loaded.kind} model, expected a dcgan or vae for synthesis")
    if mode != "sample" and loaded.kind != "vae":
        raise ModelFileError(f"--mode {mode} needs a vae model; {name_or_path} holds a {loaded.kind}")
    return loaded


def latent_for(seed: int, index: int, latent_dim: int, truncation: float | None = None):
    """Row `index`'s latent: drawn from a generator seeded by (seed, index) alone. Returns a (latent_dim,) tensor."""
    import torch

    from restoration.models.dcgan import sample_latent

    rng = torch.Generator().manual_seed(degrade.seed_for(seed, f"latent/{index}"))
    return sample_latent(1, latent_dim, generator=rng, truncation=truncation)[0]


def uniforms_for(seed: int, indices: list[int]):
    """One U[0, 1) draw per row, seeded by (seed, index) alone: picks the component of a VAE's mixture prior.
    Returns a (len(indices),) float64 tensor."""
    import torch

    draws = [np.random.default_rng(degrade.seed_for(seed, f"component/{i}")).random() for i in indices]
    return torch.tensor(draws, dtype=torch.float64)


def slerp(a, b, alpha: float):
    """Spherical interpolation between latents (Shoemake 1985); falls back to lerp for nearly parallel vectors."""
    import torch

    omega = torch.arccos(torch.clamp(torch.dot(a / a.norm(), b / b.norm()), -1.0, 1.0))
    if omega.abs() < 1e-6:
        return (1 - alpha) * a + alpha * b
    return (torch.sin((1 - alpha) * omega) * a + torch.sin(alpha * omega) * b) / torch.sin(omega)


class GeneratorActor:
    """Holds one generator on its device; maps a batch of items (RUN_SCHEMA in sample mode, ITEM_SCHEMA otherwise)
    to PIXELS_SCHEMA rows (quantised, not yet encoded), or with `encode` to OUTPUT_SCHEMA rows (PNG)."""

    def __init__(self, config: SynthesizeConfig, run_id: str, threads: int | None = None, encode: bool = False) -> None:
        import torch

        from restoration.checkpoint import model_label
        from restoration.cluster import prioritise_model_actor
        from restoration.device import default_device

        prioritise_model_actor()
        if threads:
            torch.set_num_threads(threads)
        self.config, self.run_id, self.encode = config, run_id, encode
        self.loaded = load_generator(config.model, config.mode)
        self.device = default_device()
        self.dtype = {"float64": torch.float64, "float32": torch.float32, "bf16": torch.float32}[config.precision]
        self.module = self.loaded.module.to(self.device, self.dtype).eval()
        self.name = model_label(config.model)

    def __call__(self, items: pa.Table) -> pa.Table:
        import torch

        rows = _Rows()
        with torch.inference_mode():
            if self.config.mode == "sample":
                runs = zip(items.column("start").to_pylist(), items.column("stop").to_pylist(), strict=True)
                self._sample([i for start, stop in runs for i in range(start, stop)], rows)
            else:
                for item in items.to_pylist():
                    self._from_inputs(item, rows)
        return rows.table(self, encode=self.encode)

    # ------------------------------------------------------------------------------------------------ modes
    def _sample(self, indices: list[int], rows: _Rows) -> None:
        """A task's rows (see `task_rows`), through the generator `config.batch_size` at a time."""
        import torch

        latent_dim = self.loaded.config.latent_dim
        for start in range(0, len(indices), self.config.batch_size):
            chunk = indices[start : start + self.config.batch_size]
            z = torch.stack([latent_for(self.config.seed, i, latent_dim, self.config.truncation) for i in chunk])
            if self.loaded.kind == "vae":  # N(0, I) draws -> the VAE's sampling prior (unchanged for N(0, I) itself)
                z = self.module.prior_latents(z.to(self.device, self.dtype), uniforms_for(self.config.seed, chunk))
            images = self._decode(z)  # (B, S, S, C) uint8
            rows.add(chunk, images, time.time())

    def _from_inputs(self, item: dict, rows: _Rows) -> None:
        import torch

        keys, index = item["source_keys"], item["index"]
        try:
            x = torch.stack([self._to_tensor(codec.decode(data).pixels) for data in item["sources"]])
        except (codec.DecodeError, ValueError) as e:
            n = self.config.steps if self.config.mode == "interpolate" else 1
            rows.add(list(range(index, index + n)), None, time.time(), keys, error=f"decode: {e}")
            return
        mu, _ = self.module.encode(x.to(self.device, self.dtype))  # (k, D)
        if self.config.mode == "reconstruct":
            rows.add([index], self._decode(mu[:1]), time.time(), keys)
            return
        alphas = np.linspace(0.0, 1.0, self.config.steps)
        mix = slerp if self.config.slerp else (lambda a, b, t: (1 - t) * a + t * b)
        z = torch.stack([mix(mu[0], mu[1], float(a)) for a in alphas])
        images = self._decode(z)
        rows.add(list(range(index, index + len(alphas))), images, time.time(), keys, [float(a) for a in alphas])

    # ------------------------------------------------------------------------------------------------ helpers
    def _decode(self, z) -> np.ndarray:
        """Latents (B, D) -> images (B, S, S, C) uint8, quantised as a whole batch with `codec.to_uint`'s arithmetic
        (float32: clip to [0, 1], times 255, round half to even), here in torch, in place and on the model's device:
        on CPUs that is a third of the cost of NumPy on the permuted copy, and a GPU sends back bytes, not floats."""
        import torch

        z = z.to(self.device, self.dtype)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
            if self.loaded.kind == "dcgan":
                images = self.module.generator(z).float().add_(1).div_(2)
            else:
                images = self.module.decode(z).float()
        if torch.isnan(images).any():  # as `codec.to_uint` refuses them
            raise ValueError(f"{self.name} generated {int(torch.isnan(images).sum())} NaN samples")
        images = images.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def _to_tensor(self, pixels: np.ndarray):
        """(H, W, C) float in [0, 1] -> (C, S, S) at the VAE's size and channels."""
        import torch
        import torch.nn.functional as F

        cfg = self.loaded.config
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (C, H, W)
        if x.shape[0] != cfg.channels:
            x = x.mean(0, keepdim=True) if cfg.channels == 1 else x.expand(3, -1, -1)
        if x.shape[1:] != (cfg.image_size, cfg.image_size):
            x = F.interpolate(x[None], size=(cfg.image_size, cfg.image_size), mode="area")[0]
        return x


class _Rows:
    """One actor call's output, gathered a generator batch at a time as columns and made into one table at the end:
    a dict per row and `Table.from_pylist` cost more than the PNG of a 28x28 image."""

    def __init__(self) -> None:
        self.index: list[int] = []
        self.source_keys: list[list[str] | None] = []
        self.alpha: list[float | None] = []
        self.generated_at: list[float] = []
        self.error: list[str | None] = []
        self.images: list[np.ndarray] = []  # (B, S, S, C) uint8 per batch of rows with an image

    def add(
        self,
        indices: list[int],
        images: np.ndarray | None,
        done_at: float,
        source_keys=None,
        alphas=None,
        error: str | None = None,
    ) -> None:
        """Rows `indices` with their `images` (B, S, S, C) uint8, or with `error` and no image; `done_at` is the Unix
        time the generator finished them (or they failed)."""
        n = len(indices)
        self.index += indices
        self.source_keys += [source_keys] * n
        self.alpha += alphas if alphas is not None else [None] * n
        self.generated_at += [done_at] * n
        self.error += [error] * n
        if images is not None:
            self.images.append(images)

    def table(self, actor: GeneratorActor, encode: bool) -> pa.Table:
        """OUTPUT_SCHEMA rows with PNG images when `encode`, else PIXELS_SCHEMA rows with the raw samples."""
        n = len(self.index)
        ok = np.array([e is None for e in self.error], bool)
        samples = np.concatenate(self.images) if self.images else np.zeros((0, 1, 1, 1), np.uint8)
        blobs = codec.png_batch(samples) if encode else [image.tobytes() for image in samples]
        data: list[bytes | None] = [None] * n
        for row, blob in zip(np.flatnonzero(ok).tolist(), blobs, strict=True):
            data[row] = blob
        height, width, channels = samples.shape[1:]

        def where_ok(value: int) -> pa.Array:
            return pa.array(np.where(ok, value, 0).astype(np.int32), mask=~ok)

        columns = {
            "key": pa.array([f"{actor.run_id}/{i:012d}" for i in self.index], pa.string()),
            "index": pa.array(self.index, pa.int64()),
            "seed": pa.array(np.full(n, actor.config.seed, np.int64)),
            "model": pa.array([actor.name] * n, pa.string()),
            "model_sha256": pa.array([actor.loaded.sha256] * n, pa.string()),
            "image" if encode else "pixels": pa.array(data, pa.binary()),
            "width": where_ok(width),
            "height": where_ok(height),
            "source_keys": pa.array(self.source_keys, pa.list_(pa.string())),
            "alpha": pa.array(self.alpha, pa.float64()),
            "run_id": pa.array([actor.run_id] * n, pa.string()),
            "error": pa.array(self.error, pa.string()),
            "generated_at": pa.array(self.generated_at, pa.float64()),
            "channels": where_ok(channels),
            "file": pa.nulls(n, pa.string()),  # set by `write_files` when the run writes files
        }
        schema = OUTPUT_SCHEMA if encode else PIXELS_SCHEMA
        return pa.table([columns[name] for name in schema.names], schema=schema)


def encode_images(batch: pa.Table) -> pa.Table:
    """PIXELS_SCHEMA rows -> OUTPUT_SCHEMA rows: the raw samples become PNG files (error rows keep a null image)."""
    shapes = zip(*(batch.column(name).to_pylist() for name in ("height", "width", "channels")), strict=True)
    pngs: list[bytes | None] = []
    for pixels, (height, width, channels) in zip(batch.column("pixels").to_pylist(), shapes, strict=True):
        if pixels is None:
            pngs.append(None)
            continue
        samples = np.frombuffer(pixels, dtype=np.uint8).reshape(1, height, width, channels)
        pngs += codec.png_batch(samples)
    columns = {name: batch.column(name) for name in OUTPUT_SCHEMA.names if name != "image"}
    columns["image"] = pa.array(pngs, type=pa.binary())
    return pa.table([columns[name] for name in OUTPUT_SCHEMA.names], schema=OUTPUT_SCHEMA)


# Sample mode: the pixels one actor task generates, in generator batches of `batch_size`. Every Ray Data task costs a
# few milliseconds of scheduling and object-store work in the driver, the actor and the encode task, which at 64
# images of 28x28 (about 40 ms of a DCGAN on one core) was a third of the run; tasks of about 0.8 MP cut that ~16x.
TASK_PIXELS = 1024 * 28 * 28


def task_rows(config: SynthesizeConfig, image_size: int, workers: int) -> int:
    """Rows per actor task in sample mode: a multiple of `config.batch_size` near `TASK_PIXELS`, and small enough that
    every one of `workers` actors gets at least 4 tasks."""
    batches = max(
        1,
        min(
            TASK_PIXELS // (image_size * image_size * config.batch_size),
            math.ceil(config.count / (4 * workers * config.batch_size)),
        ),
    )
    return batches * config.batch_size


def index_runs(count: int, done: set[int], longest: int) -> pa.Table:
    """The indices in [0, count) not in `done`, as RUN_SCHEMA rows of at most `longest` consecutive indices each."""
    done_sorted = np.array(sorted(i for i in done if 0 <= i < count), dtype=np.int64)
    gap_starts = np.concatenate([[0], done_sorted + 1])
    gap_stops = np.concatenate([done_sorted, [count]])
    keep = gap_stops > gap_starts
    gap_starts, gap_stops = gap_starts[keep], gap_stops[keep]
    pieces = -(-(gap_stops - gap_starts) // longest)  # runs per gap, rounded up
    first_piece = np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = np.repeat(gap_starts, pieces) + longest * (np.arange(pieces.sum()) - first_piece)
    stops = np.minimum(starts + longest, np.repeat(gap_stops, pieces))
    return pa.table([pa.array(starts, pa.int64()), pa.array(stops, pa.int64())], schema=RUN_SCHEMA)


def data_share(config: SynthesizeConfig) -> float | None:
    """In sample mode, the fraction of an image's CPU time PNG encoding takes next to the generator, measured here on
    one thread on a batch of `config.batch_size` (`actor_resources` splits the cores by it); None in the other modes,
    whose inputs are decoded inside the actor."""
    from restoration.cluster import measure_share

    if config.mode != "sample":
        return None
    actor = GeneratorActor(config, run_id="share")
    items = pa.table({"start": [0], "stop": [config.batch_size]}, schema=RUN_SCHEMA)
    pixels = actor(items)  # the generator's warm-up
    encode_images(pixels)  # the encoder's
    return measure_share(lambda: actor(items), lambda: encode_images(pixels))


# ----------------------------------------------------------------------------------------------------------- runs
@dataclass
class SynthesizeReport:
    run_id: str
    output: str
    mode: str
    requested: int
    rows_out: int
    errors: int
    errors_by_stage: dict[str, int]
    skipped_resumed: int
    duplicates: int
    seconds: float
    images_per_s: float
    model: str = ""
    model_sha256: str = ""
    complete: bool = False
    phase_seconds: dict = field(default_factory=dict)  # setup / write / commit / summary, as in RestoreReport
    config: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"synthesized {self.rows_out - self.errors} images ({self.errors} errors) of {self.requested} "
            f"in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s) -> {self.output}"
        )


def _items(config: SynthesizeConfig) -> tuple[list[dict], int]:
    """Input items for interpolate/reconstruct (small: pairs or inputs, with their encoded bytes) and output count."""
    import pyarrow.parquet as pq

    from restoration.data import input_files

    kind, files = input_files(config.inputs)
    fs, root = storage.resolve(config.inputs)
    if kind == "parquet":
        table = pa.concat_tables(pq.read_table(f, filesystem=fs, columns=["key", "image"]) for f in files)
        by_key = dict(zip(table.column("key").to_pylist(), table.column("image").to_pylist(), strict=True))
    else:
        by_key = {}
        for path in files:
            with fs.open_input_stream(path) as f:
                by_key[path[len(root) + 1 :]] = f.read()
    keys = sorted(by_key)
    if config.mode == "reconstruct":
        return [{"index": i, "source_keys": [k], "sources": [by_key[k]]} for i, k in enumerate(keys)], len(keys)
    pairs = list(config.pairs)
    missing = [k for pair in pairs for k in pair if k not in by_key]
    if missing:
        raise ValueError(f"--pairs names keys not in {config.inputs}: {', '.join(missing[:5])}")
    if config.random_pairs:
        if len(keys) < 2:
            raise ValueError(f"--random-pairs needs at least 2 input images, {config.inputs} has {len(keys)}")
        rng = np.random.default_rng(config.seed)
        pairs += [tuple(keys[j] for j in rng.choice(len(keys), 2, replace=False)) for _ in range(config.random_pairs)]
    items = [
        {"index": p * config.steps, "source_keys": list(pair), "sources": [by_key[pair[0]], by_key[pair[1]]]}
        for p, pair in enumerate(pairs)
    ]
    return items, len(pairs) * config.steps


def scheduled_config(config: SynthesizeConfig) -> SynthesizeConfig:
    """The config of a scheduled run: run id = today's UTC date unless given, always resumable, so a rerun of a
    finished run changes nothing and a rerun of an interrupted one completes it."""
    run_id = config.run_id or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return dataclasses.replace(config, run_id=run_id, resume=True)


def run_synthesize(config: SynthesizeConfig) -> SynthesizeReport:
    """Run a synthesis job on the current Ray cluster (a local one when none is configured).

    Returns:
        The report, also written as OUT/run_id=<id>/_manifest.json after every Parquet file and the preview.
    """
    import ray

    from restoration.checkpoint import model_label
    from restoration.cluster import actor_resources, init_ray

    t0 = time.perf_counter()
    loaded = load_generator(config.model, config.mode)  # fail fast, before Ray starts
    run_id = config.run_id or default_run_id()
    out_uri = run_dir(config.output, run_id)
    rows_uri = rows_dir(out_uri, config.format)
    storage.ensure_bucket(config.output)
    if config.resume and storage.exists(storage.join(out_uri, "_manifest.json")):
        manifest = json.loads(storage.read_bytes(storage.join(out_uri, "_manifest.json")))
        wanted = json.loads(json.dumps(asdict(config)))
        same_work = manifest["model_sha256"] == loaded.sha256 and all(
            manifest["config"].get(k) == wanted[k] for k in _WORK_FIELDS
        )
        if manifest.get("complete") and same_work:  # a finished run: change nothing
            return SynthesizeReport(**{k: v for k, v in manifest.items() if k in SynthesizeReport.__dataclass_fields__})
    # As in restore (see run_restore): an attempt writes under OUT/_staging/run_id=<id>/<attempt>/ and its files move
    # into the run folder only once all of them are written; what failed attempts left in staging is discarded.
    staging = staging_dir(config.output, run_id)
    done: set[int] = set()
    if config.resume:
        done = set(read_output(rows_uri, ["index"], OUTPUT_SCHEMA).column("index").to_pylist())
    elif storage.exists(out_uri):
        raise ValueError(f"{out_uri} already exists: pass --resume to finish that run, or choose another --run-id")
    remove_tree(staging)

    init_ray()
    workers, use_gpu, threads, actor_cpus, _, data_tasks = actor_resources(
        config.workers, config.gpu, lambda: data_share(config)
    )
    if config.mode == "sample":
        requested = config.count
        runs = index_runs(config.count, done, task_rows(config, loaded.config.image_size, workers))
        # Blocks built on the driver (`from_arrow` would start a metadata task per block), up to 1,000: Ray Data
        # hands an actor a block at a time, so every actor needs blocks of its own.
        blocks = min(runs.num_rows, 1000)
        ds = ray.data.from_items(runs.to_pylist(), override_num_blocks=blocks) if blocks else None
    else:
        items, requested = _items(config)
        items = [it for it in items if it["index"] not in done]
        ds = ray.data.from_arrow(pa.Table.from_pylist(items, schema=ITEM_SCHEMA)) if items else None
    t_write = t_commit = time.perf_counter()  # stay so when a resumed run has nothing left to write
    if ds is not None:
        # On CPUs the actors encode their own PNGs: the cores are shared by every stage anyway, and a separate encode
        # task costs more than the encoding (the hand-off of every image through the object store, a worker process
        # and Ray Data's handling of each task). A GPU actor hands its samples to PNG tasks on the CPUs instead, so
        # the GPU never waits on them.
        ds = ds.map_batches(
            GeneratorActor,
            fn_constructor_kwargs={"config": config, "run_id": run_id, "threads": threads, "encode": not use_gpu},
            compute=ray.data.ActorPoolStrategy(size=workers),
            batch_size=1 if config.mode == "sample" else max(1, config.batch_size // config.steps),
            batch_format="pyarrow",
            num_cpus=actor_cpus,
            num_gpus=1 if use_gpu else 0,
        )
        if use_gpu:
            # Encoding reserves less than an actor, so Ray Data keeps it out of the actor (it fuses operators only
            # when their reservations match).
            ds = ds.map_batches(encode_images, batch_format="pyarrow", num_cpus=DATA_TASK_CPUS)
        if config.format != "parquet":
            ds = ds.map_batches(
                write_files,
                fn_kwargs={
                    "run_uri": out_uri,
                    "image_format": config.image_format,
                    "quality": config.quality,
                    "keep_image": config.format == "both",
                },
                batch_format="pyarrow",
                num_cpus=DATA_TASK_CPUS,
                concurrency=data_tasks,
            )
        t_write, t_commit = write_attempt(
            ds, staging, rows_uri, "synthesis", run_id, min_rows_per_file=4096, concurrency=data_tasks
        )
    t_summary = time.perf_counter()

    written = read_output(rows_uri, ["index", "error", "file"], OUTPUT_SCHEMA)
    indices = written.column("index").to_numpy()
    errors = [e for e in written.column("error").to_pylist() if e is not None]
    if config.format == "files":
        failed = written.filter(pc.invert(pc.is_null(written.column("error"))))
        failed = pa.table({"key": pc.cast(failed.column("index"), pa.string()), "error": failed.column("error")})
        storage.write_bytes(storage.join(out_uri, "_errors.parquet"), data.table_to_parquet(failed))
    _write_preview(out_uri, rows_uri)
    seconds = time.perf_counter() - t0
    phases = phase_seconds(t0, t_write, t_commit, t_summary, t0 + seconds)
    report = SynthesizeReport(
        run_id=run_id,
        output=out_uri,
        mode=config.mode,
        requested=requested,
        rows_out=written.num_rows,
        errors=len(errors),
        errors_by_stage=dict(Counter(e.split(":", 1)[0] for e in errors)),
        skipped_resumed=len(done),
        duplicates=int(written.num_rows - len(np.unique(indices))),
        seconds=seconds,
        images_per_s=(requested - len(done)) / seconds if seconds else 0.0,
        model=model_label(config.model),
        model_sha256=loaded.sha256,
        complete=written.num_rows == requested,
        phase_seconds=phases,
        config=asdict(config) | {"run_id": run_id, "workers": workers, "gpu": use_gpu, "data_tasks": data_tasks},
    )
    manifest = asdict(report) | {"written_at": datetime.now(timezone.utc).isoformat()}
    storage.write_bytes(storage.join(out_uri, "_manifest.json"), json.dumps(manifest, indent=2).encode())
    return report


def write_files(batch: pa.Table, run_uri: str, image_format: str, quality: int, keep_image: bool) -> pa.Table:
    """Ray Data stage of `--format files|both`: each ok row's image as the file `<index, 12 digits>.<ext>` under the
    run folder (`files.write_rows`). Returns the rows (OUTPUT_SCHEMA) with `file` set, `image` kept with `keep_image`."""
    rows = batch.to_pylist()
    keys = [row["key"] for row in rows]
    for row in rows:
        row["key"] = f"{row['index']:012d}"  # the file's name; the row keeps its own key
    rows = files.write_rows(rows, run_uri, image_format, quality, {}, keep_image)
    for row, key in zip(rows, keys, strict=True):
        row["key"] = key
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def _write_preview(out_uri: str, rows_uri: str | None = None, n: int = 64) -> None:
    """`_preview.png`: the first n images of the run by index, in a grid (read from the rows' `image`, or from the
    files the rows name when the run wrote files only)."""
    import torch

    from restoration.metrics import image_grid

    rows_uri = rows_uri or out_uri
    fs, root = storage.resolve(rows_uri)
    parts = [
        i.path for i in storage.list_files(rows_uri) if i.path.endswith(".parquet") and "/_" not in i.path[len(root) :]
    ]
    if not parts:
        return
    dataset = pads.dataset(parts, filesystem=fs, format="parquet")
    wanted = pc.field("index") < n
    table = dataset.to_table(columns=["index", "image", "file"], filter=wanted & pc.field("error").is_null())
    if table.num_rows == 0:
        return
    table = table.sort_by("index")
    blobs = [
        image if image is not None else storage.read_bytes(storage.join(out_uri, file))
        for image, file in zip(table.column("image").to_pylist(), table.column("file").to_pylist(), strict=True)
    ]
    images = [codec.decode(b).pixels for b in blobs]
    channels = max(im.shape[2] for im in images)
    tensor = torch.stack(
        [torch.from_numpy(np.repeat(im, channels // im.shape[2], axis=2)).permute(2, 0, 1) for im in images]
    )
    buf = io.BytesIO()
    Image.fromarray(image_grid(tensor, nrow=8)).save(buf, format="PNG")
    storage.write_bytes(storage.join(out_uri, "_preview.png"), buf.getvalue())
