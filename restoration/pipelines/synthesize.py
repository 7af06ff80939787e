"""The synthesis pipeline: items → generator actors (GAN / VAE) → PNG → Parquet under OUT/run_id=<id>/.

    sample:       range(N) → z_i from a generator seeded by (seed, i) alone → G(z_i), or decode(z_i) with z_i
                  mapped to the VAE's sampling prior (its fitted mixture, or N(0, I)); a class-conditional model
                  makes G(z_i, y_i), with the classes asked for (`--labels sneaker:10000,bag:5000`) laid out in
                  index order: rows [0, 10000) sneakers, [10000, 15000) bags
    interpolate:  pairs of input images → VAE encode (μ) → lerp/slerp at T alphas → decode; or, for a conditional
                  VAE, between two classes (`--labels sneaker,bag --count K`): sequence p keeps one z_p from
                  (seed, p) and moves the decoder's condition from one class's one-hot vector to the other's
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

from restoration import cluster, codec, files, runs, schemas, storage
from restoration.cluster import DATA_TASK_CPUS
from restoration.errors import UserError
from restoration.metrics import image_grid

MODES = ("sample", "interpolate", "reconstruct")
OUTPUT_SCHEMA = schemas.SYNTH_OUTPUT_SCHEMA
PIXELS_SCHEMA = schemas.SYNTH_PIXELS_SCHEMA
RUN_SCHEMA = schemas.SYNTH_RUN_SCHEMA
ITEM_SCHEMA = schemas.SYNTH_ITEM_SCHEMA

# The fields that decide which images a run holds (not how it was scheduled): a finished run with the same ones is
# left untouched by a rerun.
_WORK_FIELDS = (
    *("mode", "count", "labels", "seed", "truncation", "inputs", "pairs", "random_pairs", "steps", "slerp"),
    "precision",
    *("format", "image_format", "quality"),
)


@dataclass(frozen=True)
class SynthesizeConfig:
    model: str
    output: str
    count: int = 0  # sample mode: number of images (with `labels`: their total, or 0 for it); interpolate between
    # labels: number of sequences (0: one)
    labels: tuple[tuple[str, int | None], ...] = ()  # conditional models: sample mode (class name or id, count) in
    # order; interpolate mode two (class, None): the classes to move between
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
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        labels = tuple((str(name), count) for name, count in self.labels)  # a JSON round trip gives lists
        object.__setattr__(self, "labels", labels)
        if labels and self.mode == "interpolate":
            check_label_pair(labels, self)
            object.__setattr__(self, "count", self.count or 1)
        elif labels:
            check_label_counts(labels)
            total = sum(count for _, count in labels)
            if self.mode != "sample":
                raise UserError(f"--labels/--label need --mode sample or interpolate, got --mode {self.mode}")
            if self.count not in (0, total):
                raise UserError(f"--count {self.count} disagrees with the --labels counts, which add up to {total}")
            object.__setattr__(self, "count", total)
        if self.mode == "sample" and self.count < 1:
            raise UserError(f"--count must be >= 1, got {self.count}")
        if self.mode != "sample" and not self.inputs and not labels:
            hint = " or, for a conditional VAE, --labels A,B" if self.mode == "interpolate" else ""
            raise UserError(f"--mode {self.mode} needs --inputs (input shards or a folder of images){hint}")
        if self.mode == "interpolate" and not labels and not self.pairs and self.random_pairs < 1:
            raise UserError("--mode interpolate needs --pairs A:B,... or --random-pairs K (K >= 1)")
        if self.steps < 2:
            raise UserError(f"--steps must be >= 2 (alpha 0 and 1 at least), got {self.steps}")
        if self.truncation is not None and not (self.truncation > 0 and math.isfinite(self.truncation)):
            raise UserError(f"--truncation must be a number > 0, got {self.truncation}")
        if self.batch_size < 1 or (self.workers is not None and self.workers < 1):
            raise UserError("--batch-size and --workers must be >= 1")
        if self.precision not in ("float64", "float32", "bf16"):
            raise UserError(f"--precision must be float64, float32 or bf16, got {self.precision!r}")
        files.check_options(self.format, self.image_format, self.quality)


def check_label_counts(labels: tuple[tuple[str, int | None], ...]) -> None:
    """Refuse a `--labels` list with a count missing or below 1, or a class named twice."""
    for name, count in labels:
        if count is None:
            raise UserError(f"--labels {name}: --mode sample needs NAME:COUNT (how many images of the class)")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise UserError(f"--labels {name}:{count}: the count must be an integer >= 1")
    names = [name for name, _ in labels]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"--labels names {', '.join(twice)} more than once")


def check_label_pair(labels: tuple[tuple[str, int | None], ...], config: SynthesizeConfig) -> None:
    """Refuse an interpolation between labels that is not two distinct classes without counts, or that also names
    input images."""
    spelled = ",".join(name if count is None else f"{name}:{count}" for name, count in labels)
    if len(labels) != 2 or any(count is not None for _, count in labels) or labels[0][0] == labels[1][0]:
        raise UserError(f"--mode interpolate --labels {spelled}: expected two different classes without counts (A,B)")
    if config.inputs or config.pairs or config.random_pairs:
        raise UserError(
            "--mode interpolate moves between two classes (--labels A,B) or between input images "
            "(--inputs with --pairs/--random-pairs), not both"
        )


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
    one thread on a batch of `config.batch_size` rows, or the run's count if smaller (`actor_resources` splits the
    cores by it); None in the other modes, whose inputs are decoded inside the actor."""
    from restoration.inference import GeneratorActor  # the driver's only torch: the model's cost is measured here

    if config.mode != "sample":
        return None
    actor = GeneratorActor(config, run_id="share")
    # A run smaller than a batch is measured on its own rows: a conditional run lays its classes over them alone.
    items = pa.table({"start": [0], "stop": [min(config.batch_size, config.count)]}, schema=RUN_SCHEMA)
    pixels = actor(items)  # the generator's warm-up
    encode_images(pixels)  # the encoder's
    return cluster.measure_share(lambda: actor(items), lambda: encode_images(pixels))


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
    # Conditional runs: class name -> {"id", "requested", "rows" written (errors included), "errors"}.
    rows_by_label: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"synthesized {self.rows_out - self.errors} images ({self.errors} errors) of {self.requested} "
            f"in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s) -> {self.output}"
        )


def _items(config: SynthesizeConfig) -> tuple[list[dict], int]:
    """Input items for interpolate/reconstruct (small: pairs or inputs, with their encoded bytes; between labels: one
    item per sequence, naming the two classes) and output count."""
    import pyarrow.parquet as pq

    if config.labels:  # interpolate between two classes: K sequences of `steps` images
        names = [name for name, _ in config.labels]
        items = [{"index": p * config.steps, "source_keys": names, "sources": []} for p in range(config.count)]
        return items, config.count * config.steps

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
        raise UserError(f"--pairs names keys not in {config.inputs}: {', '.join(missing[:5])}")
    if config.random_pairs:
        if len(keys) < 2:
            raise UserError(f"--random-pairs needs at least 2 input images, {config.inputs} has {len(keys)}")
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

    from restoration import inference  # torch: the driver reads the model once, to fail fast and to size the pool
    from restoration.checkpoint import model_label
    from restoration.cluster import actor_resources, init_ray

    t0 = time.perf_counter()
    loaded = inference.load_generator(config.model, config.mode)  # fail fast, before Ray starts
    known = tuple(getattr(loaded.config, "labels", ()))
    ids = inference.check_labels(config, known, model_label(config.model))
    run_id = config.run_id or runs.default_run_id()
    manifest_uri = storage.join(runs.run_dir(config.output, run_id), "_manifest.json")
    if config.resume and storage.exists(manifest_uri):
        manifest = json.loads(storage.read_bytes(manifest_uri))
        wanted = json.loads(json.dumps(asdict(config)))
        same_work = manifest["model_sha256"] == loaded.sha256 and all(
            manifest["config"].get(k) == wanted[k] for k in _WORK_FIELDS
        )
        if manifest.get("complete") and same_work:  # a finished run: change nothing
            return SynthesizeReport(**{k: v for k, v in manifest.items() if k in SynthesizeReport.__dataclass_fields__})
    # The run folder protocol of `restoration.runs`: attempts write under staging and commit whole; resume skips the
    # indices already written.
    run = runs.open_run(config.output, run_id, config.format, config.resume, "index", OUTPUT_SCHEMA)
    out_uri, done = run.out_uri, run.done

    init_ray()
    workers, use_gpu, threads, actor_cpus, _, data_tasks = actor_resources(
        config.workers, config.gpu, lambda: data_share(config)
    )
    if config.mode == "sample":
        requested = config.count
        spans = index_runs(config.count, done, task_rows(config, loaded.config.image_size, workers))
        # Blocks built on the driver (`from_arrow` would start a metadata task per block), up to 1,000: Ray Data
        # hands an actor a block at a time, so every actor needs blocks of its own.
        blocks = min(spans.num_rows, 1000)
        ds = ray.data.from_items(spans.to_pylist(), override_num_blocks=blocks) if blocks else None
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
            inference.GeneratorActor,
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
        t_write, t_commit = runs.write_attempt(
            ds, run.staging, run.rows_uri, "synthesis", run_id, min_rows_per_file=4096, concurrency=data_tasks
        )
    t_summary = time.perf_counter()

    written = runs.read_output(run.rows_uri, ["index", "error", "file", "label"], OUTPUT_SCHEMA)
    indices = written.column("index").to_numpy()
    errors = [e for e in written.column("error").to_pylist() if e is not None]
    if config.format == "files":
        failed = written.filter(pc.invert(pc.is_null(written.column("error"))))
        runs.write_errors(out_uri, pa.table({"key": pc.cast(failed["index"], pa.string()), "error": failed["error"]}))
    _write_preview(out_uri, run.rows_uri)
    seconds = time.perf_counter() - t0
    phases = runs.phase_seconds(t0, t_write, t_commit, t_summary, t0 + seconds)
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
        rows_by_label=_rows_by_label(written, known, ids if config.mode == "sample" else []),
    )
    runs.write_manifest(out_uri, asdict(report) | {"written_at": datetime.now(timezone.utc).isoformat()})
    return report


def _rows_by_label(written: pa.Table, known: tuple[str, ...], ids: list[tuple[int, int]]) -> dict:
    """The manifest's per-class counts of a conditional run (empty for an unconditional one)."""
    if not ids:
        return {}
    labels = written.column("label").to_numpy(zero_copy_only=False)
    failed = np.array([e is not None for e in written.column("error").to_pylist()], bool)
    return {
        known[i]: {
            "id": i,
            "requested": count,
            "rows": int((labels == i).sum()),
            "errors": int(((labels == i) & failed).sum()),
        }
        for i, count in ids
    }


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
    stack = np.stack(
        [np.repeat(im, channels // im.shape[2], axis=2).transpose(2, 0, 1) for im in images]
    )  # (B, C, H, W)
    buf = io.BytesIO()
    Image.fromarray(image_grid(stack, nrow=8)).save(buf, format="PNG")
    storage.write_bytes(storage.join(out_uri, "_preview.png"), buf.getvalue())
