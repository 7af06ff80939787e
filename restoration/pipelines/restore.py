"""The restore pipeline: input shards (or raw image objects) → decode → [degrade] → restorer actors → encode → Parquet.

    resolve the input once → read → [drop rows a resumed run has] → map_batches(decode_batch)
        → map_batches(RestoreActor, batched by shape) → map_batches(encode_batch) → [write_files]
        → write_parquet(staging) → commit into OUT/run_id=<id>/ → _manifest.json

Every stage takes and returns Arrow tables with an explicit schema (`restoration.schemas`), so a row that fails
anywhere becomes a row with `error = "<stage>: <reason>"` and flows on: rows out = rows in. The stages are pure
functions over tables (tested without Ray) and import no torch, so the data tasks never load it; the model actors
are in `restoration.inference` (which model restores which image: see there), the run folder protocol (staging,
commit, resume) in `restoration.runs`. Only `run_restore` knows about Ray.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from restoration import cluster, codec, data, degrade, files, masks, metrics, runs, schemas
from restoration.cluster import DATA_TASK_CPUS
from restoration.errors import UserError
from restoration.pipelines.batching import (  # noqa: F401
    AUTO_BATCH_PIXELS,
    MAX_AUTO_BATCH,
    auto_batch_size,
    spread_batch_size,
)

STAGE_SCHEMA = schemas.STAGE_SCHEMA
OUTPUT_SCHEMA = schemas.RESTORE_OUTPUT_SCHEMA
PRECISIONS = ("auto", "fp32", "bf16")
UPSCALE_FACTORS = (
    2,
    3,
    4,
)  # --scale: the factors of the bundled upscalers (inference.SCALES)  # "auto": bf16 where the device has bf16 units (`device.use_bf16`)

# Largest block the pipeline's operators build (Ray Data's default is 128 MiB). Every operator holds a block in and
# one being built out, so the block size, not the number of images, sets how much memory each worker needs: 128 MiB
# blocks doubled the actor's peak between a 256-image run (whose whole output fits in one block) and a 2,560-image
# one. 16 MiB is 64 restored 256 x 256 gray images (float32) and keeps the actor's peak within about a quarter.
BLOCK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class RestoreConfig:
    """Everything a restore run depends on; written into its manifest."""

    input: str
    output: str
    model: str = "denoise"  # a family (denoise, restore, upscale: per-image choice), or a bundled name, file or URI
    scale: int | None = None  # `--model upscale`: the factor, 2, 3 or 4 (default 2); an explicit upscaler has its own
    degrade: str | None = None  # spec applied before restoring (evaluation): the clean image becomes the reference
    seed: int = 0  # run seed; an image's degradation seed is derived from (seed, key)
    run_id: str | None = None
    resume: bool = False
    workers: int | None = None  # restorer actors; default: one per GPU, else one per 2 CPUs
    batch_size: int | None = None  # images per batch; None: from the first image's size (`auto_batch_size`)
    tile: int = 512
    overlap: int = 32
    gpu: bool | None = None  # None: use GPUs when the cluster has them
    max_pixels: int = codec.DEFAULT_MAX_PIXELS
    precision: str = "auto"  # "auto": bf16 on GPUs and on CPUs with bf16 units (AMX, AVX512-BF16), else fp32
    compile: bool = False  # torch.compile the model in each actor (see ModelRunner)
    ensemble: bool = False  # average the 8 flips/rotations of each image (see ModelRunner): 8x the model's cost
    format: str = "parquet"  # "parquet", "files" (images under the run folder, keeping the keys' tree) or "both"
    image_format: str = "png"  # the files' format: png, jpeg or webp (see restoration.files)
    quality: int = 95  # JPEG/WebP quality of the files
    emit_mask: bool = False  # a repair model's found mask as the rows' `mask` column (PNG, 255 = repaired)

    def __post_init__(self) -> None:
        if self.degrade:
            degrade.parse_spec(self.degrade)  # fail before any work on a bad spec
        files.check_options(self.format, self.image_format, self.quality)
        if self.scale is not None and self.scale not in UPSCALE_FACTORS:
            raise UserError(f"--scale must be one of {', '.join(map(str, UPSCALE_FACTORS))}, got {self.scale!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("batch_size", "tile"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.workers is not None and self.workers <= 0:
            raise UserError(f"--workers must be > 0, got {self.workers}")
        if self.overlap < 0:
            raise UserError(f"--overlap must be >= 0, got {self.overlap}")
        if self.tile <= 2 * self.overlap:
            raise UserError(f"--tile must be > 2 × --overlap, got tile {self.tile} and overlap {self.overlap}")
        if self.run_id is not None and (not self.run_id or "/" in self.run_id or self.run_id.startswith(".")):
            raise UserError(f"--run-id must be a plain name (no '/', not starting with '.'), got {self.run_id!r}")


# ----------------------------------------------------------------------------------------------------------- stages
def _samples(pixels: np.ndarray, bit_depth: int) -> bytes:
    """Float pixels in [0, 1] as the bytes of their integer samples at `bit_depth` (`codec.to_uint`'s rounding)."""
    return codec.to_uint(pixels, bit_depth).tobytes()


def _error_row(key: str, error: str, elapsed_ms: float = 0.0) -> dict:
    return {"key": key, "error": error, "elapsed_ms": elapsed_ms}


def decode_batch(
    batch: pa.Table,
    degradation: str | None = None,
    seed: int = 0,
    max_pixels: int = codec.DEFAULT_MAX_PIXELS,
    scale: int = 1,
) -> pa.Table:
    """Decode (and, for evaluation, degrade) a batch of input rows.

    Args:
        batch: rows with `key`, `image` (encoded bytes) and optionally `reference` (encoded clean image, `scale`
            times the image's size) and `mask` (encoded, nonzero = missing, the image's size: `masks.decode`).
        degradation: spec applied to each decoded image, seeded by (seed, key); the clean image becomes the reference
            (cropped to a multiple of the spec's `lr:F` factor, which shrinks the image F times) and what its damage
            steps replaced joins the row's mask.
        max_pixels: the most pixels an image, and the model's output (`scale`^2 times more), may have.
        scale: the model's output is this many times larger than its input (an upscaler); 1 for the restorers.

    Returns:
        A STAGE_SCHEMA table, one row per input row (failures carry `error = "decode: ..."`). `input_psnr` is that of
        the input itself or, when the model upscales, of its bicubic upscale: the baseline the model has to beat.
    """
    steps = degrade.parse_spec(degradation) if degradation else ()
    spec_text = degrade.format_spec(steps) if steps else None
    shrink = degrade.lr_factor(steps) if steps else 1
    keys = batch.column("key").to_pylist()
    images = batch.column("image").to_pylist()
    refs = batch.column("reference").to_pylist() if "reference" in batch.column_names else [None] * len(keys)
    given_masks = batch.column("mask").to_pylist() if "mask" in batch.column_names else [None] * len(keys)
    rows = []
    for key, encoded, ref, given in zip(keys, images, refs, given_masks, strict=True):
        t0 = time.perf_counter()
        try:
            decoded = codec.decode(encoded or b"", max_pixels=max_pixels)
        except codec.DecodeError as e:
            why = masks.ORPHAN if encoded is None and given is not None else f"decode: {e}"
            rows.append(_error_row(key, why, 1e3 * (time.perf_counter() - t0)))
            continue
        pixels, reference, alpha = decoded.pixels, None, decoded.alpha
        h, w, c = pixels.shape
        try:
            mask = masks.decode(given, (h, w), max_pixels) if given is not None else None  # True = missing
        except codec.DecodeError as e:
            rows.append(_error_row(key, f"mask: {e}", 1e3 * (time.perf_counter() - t0)))
            continue
        try:
            if ref is not None:
                reference = codec.decode(ref, max_pixels=max_pixels * scale * scale).pixels
                if reference.shape != (scale * h, scale * w, c):
                    shape = "" if scale == 1 else f" x {scale}"
                    raise codec.DecodeError(
                        f"reference shape {reference.shape} differs from image {pixels.shape}{shape}"
                    )
            if steps:
                reference = degrade.modcrop(pixels, shrink)
                alpha = degrade.modcrop(alpha, shrink) if alpha is not None else None  # the output's size
                pixels, damaged = degrade.apply_masked(pixels, steps, degrade.rng_for(seed, key))  # float32
                mask = masks.union(masks.block_any(mask, shrink), damaged)
                h, w, c = pixels.shape
        except (codec.DecodeError, ValueError) as e:
            rows.append(_error_row(key, f"reference: {e}" if not steps else f"degrade: {e}"))
            continue
        if scale * scale * h * w > max_pixels:
            too_large = f"the {scale}x output ({scale * w} x {scale * h}) would exceed --max-pixels {max_pixels}"
            rows.append(_error_row(key, f"decode: {too_large}", 1e3 * (time.perf_counter() - t0)))
            continue
        depth = decoded.bit_depth
        baseline = None
        if reference is not None:
            upscaled = pixels if scale == 1 else codec.resize(codec.as_float(pixels), scale * w, scale * h)
            baseline = metrics.psnr(upscaled, reference) if upscaled.shape == reference.shape else None
        rows.append(
            {
                "key": key,
                "pixels": pixels.astype(np.float32, copy=False).tobytes() if steps else _samples(pixels, depth),
                "height": h,
                "width": w,
                "channels": c,
                "alpha": alpha.tobytes() if alpha is not None else None,
                "bit_depth": decoded.bit_depth,
                "source_mode": decoded.mode,
                "reference": _samples(reference, depth) if reference is not None else None,
                "degradation": spec_text,
                "input_psnr": baseline,
                "elapsed_ms": 1e3 * (time.perf_counter() - t0),
                "error": None,
                "icc_profile": decoded.icc_profile,
                "input_height": h,
                "input_width": w,
                "mask": mask.astype(np.uint8).tobytes() if mask is not None else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=schemas.STAGE_SCHEMA)


def _png_mode(channels: int, has_alpha: bool, bit_depth: int) -> str:
    if channels == 1:
        return "LA" if has_alpha else ("I;16" if bit_depth == 16 else "L")
    return "RGBA" if has_alpha else "RGB"


def _unit(samples: np.ndarray) -> np.ndarray:
    """Integer samples as float64 in [0, 1] (exactly the file's values, for the metrics)."""
    return samples / np.iinfo(samples.dtype).max


def _alpha(raw: bytes | None, size: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray | None:
    """A row's alpha plane at the output's size (H, W): as it is, or upscaled bicubic from the input's size when the
    model upscaled the image (alpha is kept away from the model)."""
    if raw is None:
        return None
    for h, w in (size, input_size):
        if len(raw) in (h * w, 2 * h * w):
            plane = np.frombuffer(raw, dtype=np.uint16 if len(raw) == 2 * h * w else np.uint8).reshape(h, w)
            if (h, w) == size:
                return plane
            top = np.iinfo(plane.dtype).max
            resized = codec.resize(plane.astype(np.float32), size[1], size[0])
            return np.clip(np.rint(resized), 0, top).astype(plane.dtype)
    raise ValueError(f"alpha of {len(raw)} bytes fits neither {size} nor {input_size}")


def encode_batch(
    batch: pa.Table, model: str, model_sha256: str | None, run_id: str, emit_mask: bool = False
) -> pa.Table:
    """Encode restored rows as PNG (alpha re-attached, 16-bit kept, the colour profile embedded), with PSNR/SSIM
    against the reference.

    Args:
        model, model_sha256: the run's model, for rows no model saw (they failed before restoring); restored rows
            carry the model that restored them.
        emit_mask: write the mask a repair model found (`found_mask`) as the row's `mask`, a PNG (255 = repaired).

    Returns:
        An OUTPUT_SCHEMA table, one row per input row.
    """
    out = []
    for row in batch.to_pylist():
        t0 = time.perf_counter()
        result = {
            "key": row["key"],
            "model": row.get("model") or model,
            "model_sha256": row.get("model_sha256") or model_sha256,
            "model_applied": row.get("model_applied"),
            "degradation": row["degradation"],
            "input_psnr": row["input_psnr"],
            "run_id": run_id,
            "error": row["error"],
            "input_width": row.get("input_width"),
            "input_height": row.get("input_height"),
        }
        if row["error"] is None:
            try:
                h, w, c = row["height"], row["width"], row["channels"]  # the model's output size
                restored = codec.to_uint(codec.from_raw(row["pixels"], h, w, c), row["bit_depth"])  # the PNG's samples
                alpha = _alpha(row["alpha"], (h, w), (row["input_height"], row["input_width"]))
                png = codec.encode_png(
                    restored, alpha=alpha, bit_depth=row["bit_depth"], icc_profile=row.get("icc_profile")
                )
                result.update(image=png, width=w, height=h, mode=_png_mode(c, alpha is not None, row["bit_depth"]))
                if emit_mask and row.get("found_mask") is not None:
                    found = np.frombuffer(row["found_mask"], np.uint8).reshape(h, w, 1).astype(np.float32)
                    result["mask"] = codec.encode_png(found)  # 1 -> 255
                if row["reference"] is not None:
                    reference = _unit(codec.from_raw(row["reference"], h, w, c))
                    # SSIM's 11×11 window needs an image at least that large; smaller ones get PSNR only.
                    small = min(h, w) < 11
                    delivered = _unit(restored)  # the metrics describe the file written, not the float output
                    result.update(
                        psnr=metrics.psnr(delivered, reference),
                        ssim=None if small else metrics.ssim(delivered, reference),
                        hole_psnr=masks.psnr_inside(delivered, reference, row.get("mask")),
                    )
            except Exception as e:  # noqa: BLE001 - becomes the row's error
                result.update(image=None, error=f"encode: {type(e).__name__}: {str(e)[:200]}")
        result["elapsed_ms"] = (row["elapsed_ms"] or 0.0) + 1e3 * (time.perf_counter() - t0)
        result["restored_at"] = row.get("restored_at") or time.time()
        out.append(result)
    return pa.Table.from_pylist(out, schema=schemas.RESTORE_OUTPUT_SCHEMA)


def write_files(batch: pa.Table, run_uri: str, image_format: str, quality: int, clashes, keep_image: bool) -> pa.Table:
    """Ray Data stage of `--format files|both`: write each ok row's image as a file (`files.write_rows`).

    Args:
        clashes: `files.collisions` of the run's keys, or an object ref to it (shared by every task).
    Returns:
        The rows (OUTPUT_SCHEMA) with `file` set, `image` dropped unless `keep_image`, failures as error rows.
    """
    if not isinstance(clashes, dict):
        import ray

        clashes = ray.get(clashes)
    rows = files.write_rows(batch.to_pylist(), run_uri, image_format, quality, clashes, keep_image)
    return pa.Table.from_pylist(rows, schema=schemas.RESTORE_OUTPUT_SCHEMA)


def drop_done(batch: pa.Table, done) -> pa.Table:
    """The rows of `batch` whose key is not in `done` (a string array of the keys a resumed run already holds, or an
    object ref to it, fetched once per batch)."""
    if not isinstance(done, pa.Array):
        import ray

        done = ray.get(done)
    return batch.filter(pc.invert(pc.is_in(batch.column("key"), value_set=done)))


# Side of the crop of the first input image on which `data_share` times the stages.
SHARE_SAMPLE_SIDE = 256


def data_share(config: RestoreConfig, sample: dict | None, loaded: dict | None = None, scale: int = 1) -> float | None:
    """The fraction of an image's CPU time the data operators (decode, degrade, encode, metrics) take next to the
    model, measured here on one thread with the run's own stage functions: `actor_resources` splits the cores by it.

    Args:
        loaded: the run's model files already read (model name -> LoadedModel), so the driver reads them once.
        scale: the models' upscaling factor (1 for the restorers).
        sample: an input row ({"key", "image"} and optionally "reference"), e.g. `data.first_row(config.input)`. A
            central crop of at most SHARE_SAMPLE_SIDE px a side is re-encoded as PNG and timed, so a large photo costs
            no more than a crop.

    Returns:
        The share in [0, 1], or None without a sample or when it does not decode (the run reports it as an error row).
    """
    from restoration.inference import RestoreActor  # the driver's only torch: the model's cost is measured here

    if sample is None:
        return None
    try:
        image = codec.decode(sample["image"], max_pixels=config.max_pixels)
        reference = sample.get("reference")
        reference = codec.decode(reference, max_pixels=config.max_pixels) if reference is not None else None
    except codec.DecodeError:
        return None
    h, w = image.height, image.width
    top, left = max(0, (h - SHARE_SAMPLE_SIDE) // 2), max(0, (w - SHARE_SAMPLE_SIDE) // 2)
    window = np.s_[top : top + SHARE_SAMPLE_SIDE, left : left + SHARE_SAMPLE_SIDE]

    def crop(decoded: codec.Decoded) -> bytes:
        alpha = decoded.alpha[window] if decoded.alpha is not None else None
        return codec.encode_png(decoded.pixels[window], alpha=alpha, bit_depth=decoded.bit_depth)

    columns = {"key": [str(sample["key"])], "image": [crop(image)]}
    if reference is not None and reference.pixels.shape == image.pixels.shape:
        columns["reference"] = [crop(reference)]
    batch = pa.table({k: pa.array(v, pa.string() if k == "key" else pa.binary()) for k, v in columns.items()})

    def decode() -> pa.Table:
        return decode_batch(batch, config.degrade, config.seed, config.max_pixels, scale)

    actor = RestoreActor(
        config.model,
        config.tile,
        config.overlap,
        precision=config.precision,
        ensemble=config.ensemble,
        loaded=loaded,
        scale=config.scale,
    )
    decoded = decode()
    restored = actor(decoded)
    if restored.column("error")[0].as_py() is not None:
        return None

    def decode_and_encode() -> None:
        decode()
        encode_batch(restored, config.model, None, "share")

    decode_and_encode()  # warm-up, as building `decoded` and `restored` was for the model
    return cluster.measure_share(lambda: actor(decoded), decode_and_encode)


@dataclass
class RestoreReport:
    run_id: str
    output: str
    rows_in: int
    rows_out: int
    ok: int
    errors: int
    errors_by_stage: dict[str, int]
    skipped_resumed: int
    seconds: float
    images_per_s: float
    megapixels_per_s: float
    mean_psnr: float | None = None
    mean_ssim: float | None = None
    mean_input_psnr: float | None = None
    mean_hole_psnr: float | None = None  # inside the rows' masks (inpainting; damage made by --degrade)
    model: str = ""
    model_sha256: str = ""  # "" when --model is a family: `models` names each model used
    models: dict = field(default_factory=dict)  # model label -> {"sha256", "rows"} over the restored rows
    model_applied: dict = field(default_factory=dict)  # "native" / "per-channel" / ... / "no-mask" (unchanged) -> rows
    duplicates: int = 0  # output rows whose key another output row already has (0 unless something is wrong)
    # Where `seconds` went: "setup" (models, Ray, input listing), "write" (the streaming pipeline, from the first
    # read to the last Parquet file), "commit" (staging -> run folder), "summary" (reading the output back for this
    # report). `seconds` is their sum; the manifest is written after it.
    phase_seconds: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def summary(self) -> str:
        text = (
            f"restored {self.ok} ok, {self.errors} errors of {self.rows_in} rows in {self.seconds:.1f} s "
            f"({self.images_per_s:.2f} images/s, {self.megapixels_per_s:.3f} MP/s) -> {self.output}"
        )
        if self.mean_psnr is not None and self.mean_input_psnr is not None:
            gain = self.mean_psnr - self.mean_input_psnr
            text += f"; PSNR {self.mean_input_psnr:.2f} -> {self.mean_psnr:.2f} dB ({gain:+.2f} dB)"
        return text


def _models_used(written: pa.Table) -> dict:
    used: dict[str, dict] = {}
    for name, sha, applied in zip(
        *(written.column(c).to_pylist() for c in ("model", "model_sha256", "model_applied")), strict=True
    ):
        if applied not in (None, "no-mask"):  # restored by that model (not failed before it, nor left as it was)
            entry = used.setdefault(name, {"sha256": sha, "rows": 0})
            entry["rows"] += 1
    return used


# ----------------------------------------------------------------------------------------------------------- runs
def run_restore(config: RestoreConfig) -> RestoreReport:
    """Run a restore job on the current Ray cluster (a local one when none is configured). The run folder, its staging
    and `--resume` work as `restoration.runs` describes: each key is written once, and an attempt that fails for good
    commits nothing.

    Returns:
        The report also written as `OUT/run_id=<id>/_manifest.json` (written last, after every Parquet file).
    Raises:
        storage.StorageError: the store failed for good during the run (one line; `--resume` finishes the run).
        ClusterError: a task failed for good for another reason (one line naming it).
    """
    import ray

    from restoration import inference  # torch: the driver reads the models once, to fail fast and to size the pool
    from restoration.checkpoint import model_label
    from restoration.cluster import actor_resources, init_ray

    t_start = time.perf_counter()
    # Fail fast on a bad model or input, before Ray starts; a family needs both of its variants.
    names = dict.fromkeys(inference.models_by_channels(config.model, config.scale).values())
    loaded = {name: inference.load_restorer(name) for name in names}
    scale = check_scale(config, {name: inference.model_scale(m) for name, m in loaded.items()})
    if config.emit_mask and any(m.kind != "repairer" for m in loaded.values()):
        raise UserError(f"--emit-mask needs a repair model (--model repair, or a repairer file): {config.model} is not")
    run_sha256 = next(iter(loaded.values())).sha256 if len(loaded) == 1 else None  # rows name their own model
    model_name = config.model if config.model in inference.MODEL_FAMILIES else model_label(config.model)
    source = data.resolve_input(config.input)  # the input's one listing
    run = runs.open_run(config.output, config.run_id, config.format, config.resume, "key", OUTPUT_SCHEMA)
    # Files: keys that would share a file name are known before the run, so every one of them is an error row.
    clashes = files.collisions(data.input_keys(source), config.image_format) if config.format != "parquet" else {}
    rows_in = data.count_rows(source)  # from the Parquet footers: ds.count() would run the read once more

    init_ray()
    sample = data.first_row(source, ("reference",))
    shrink = degrade.lr_factor(degrade.parse_spec(config.degrade)) if config.degrade else 1
    batch_size = config.batch_size or auto_batch_size(sample, scale, shrink, config.max_pixels)
    workers, use_gpu, threads, actor_cpus, _, _ = actor_resources(
        config.workers, config.gpu, lambda: data_share(config, sample, loaded, scale)
    )
    if config.batch_size is None:
        batch_size = spread_batch_size(batch_size, rows_in - len(run.done), workers)
    stage = {"batch_format": "pyarrow", "batch_size": batch_size, "num_cpus": DATA_TASK_CPUS}
    ds = data.read_images(source, extra_columns=("reference", "mask"), num_cpus=DATA_TASK_CPUS)
    ds.context.target_max_block_size = BLOCK_BYTES  # this run's own copy of the context
    if run.done:
        done = ray.put(pa.array(sorted(run.done), pa.string()))
        ds = ds.map_batches(drop_done, fn_kwargs={"done": done}, batch_format="pyarrow", num_cpus=DATA_TASK_CPUS)
    # The data tasks reserve less than an actor, so Ray Data does not fuse decode or encode into the actor.
    decode_args = {"degradation": config.degrade, "seed": config.seed, "max_pixels": config.max_pixels, "scale": scale}
    ds = ds.map_batches(decode_batch, fn_kwargs=decode_args, **stage)
    # One model batch per block: an actor task takes a whole block, and blocks of BLOCK_BYTES hold hundreds of small
    # images, so a few blocks would leave all but one or two actors of the pool idle.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    actor_args = {"model": config.model, "tile": config.tile, "overlap": config.overlap, "threads": threads}
    actor_args |= {"precision": config.precision, "compile": config.compile, "ensemble": config.ensemble}
    actor_args |= {"scale": config.scale}
    ds = ds.map_batches(
        inference.RestoreActor,
        fn_constructor_kwargs=actor_args,
        # On CPUs an actor takes its next batch only when it is free: Ray Data's default of two in flight queued a
        # small run's second batch behind the first on the actor that came up first while the other sat idle
        # (measured: the demo's 10 photos, both batches on one actor, 16 s of model time one after the other). A GPU
        # actor keeps the default, so that its next batch is already there when it finishes one.
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=None if use_gpu else 1),
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=actor_cpus,
        num_gpus=1 if use_gpu else 0,
    )
    encode_args = {"model": model_name, "model_sha256": run_sha256, "run_id": run.run_id, "emit_mask": config.emit_mask}
    ds = ds.map_batches(encode_batch, fn_kwargs=encode_args, **stage)
    if config.format != "parquet":
        files_args = {"run_uri": run.out_uri, "image_format": config.image_format, "quality": config.quality}
        files_args |= {"clashes": ray.put(clashes), "keep_image": config.format == "both"}
        ds = ds.map_batches(write_files, fn_kwargs=files_args, **stage)
    t_write, t_commit = runs.write_attempt(ds, run.staging, run.rows_uri, "restore", run.run_id, min_rows_per_file=256)

    t_summary = time.perf_counter()
    phases = (t_start, t_write, t_commit, t_summary)
    sizing = {"workers": workers, "gpu": use_gpu, "batch_size": batch_size}
    report = _report(config, run, rows_in, model_name, run_sha256, phases, sizing)
    runs.write_manifest(run.out_uri, asdict(report))
    return report


def check_scale(config: RestoreConfig, scales: dict[str, int]) -> int:
    """The run's upscaling factor from its models' (`scales`: name -> factor), checked against `--scale` and against
    the `lr:F` shrink of `--degrade`, which the model has to undo for the reference to fit.

    Raises:
        UserError: naming the values that disagree.
    """
    if len(set(scales.values())) > 1:
        raise UserError(f"the models of {config.model!r} upscale by different factors: {scales}")
    scale = next(iter(scales.values()))
    if config.scale is not None and config.scale != scale:
        raise UserError(f"--scale {config.scale}, but {config.model} upscales {scale}x: drop --scale or pick its model")
    shrink = degrade.lr_factor(degrade.parse_spec(config.degrade)) if config.degrade else 1
    if shrink != 1 and shrink != scale:
        raise UserError(
            f"--degrade {config.degrade} shrinks images {shrink}x but {config.model} upscales {scale}x: "
            f"expected lr:{scale} (or --scale {shrink} with --model upscale)"
        )
    return scale


def _report(
    config: RestoreConfig, run: runs.Run, rows_in: int, model: str, sha256: str | None, phases: tuple, extra: dict
) -> RestoreReport:
    """The report of a run from what is really in its output (earlier attempts of a resumed run included); with
    `--format files`, `_errors.parquet` beside the files.

    Args:
        phases: the `time.perf_counter()` readings at which the run, its write, its commit and this summary began.
        extra: added to the report's config (the pool's size and kind).
    """
    columns = ["key", "width", "height", "psnr", "ssim", "input_psnr", "hole_psnr", "error", "model", "model_sha256"]
    written = runs.read_output(run.rows_uri, [*columns, "model_applied"], OUTPUT_SCHEMA)
    if config.format == "files":
        runs.write_errors(run.out_uri, written.filter(pc.is_valid(written.column("error"))).select(["key", "error"]))
    errors = [e for e in written.column("error").to_pylist() if e is not None]
    ok_mask = pc.is_null(written.column("error"))
    width, height = (pc.filter(written[c], ok_mask).cast(pa.int64()) for c in ("width", "height"))
    pixels = pc.sum(pc.multiply(width, height)).as_py() or 0

    def mean(column: str) -> float | None:
        values = [v for v in written.column(column).to_pylist() if v is not None and math.isfinite(v)]
        return float(np.mean(values)) if values else None

    processed = rows_in - len(run.done)
    end = time.perf_counter()
    seconds = end - phases[0]
    return RestoreReport(
        run_id=run.run_id,
        output=run.out_uri,
        rows_in=rows_in,
        rows_out=written.num_rows,
        ok=written.num_rows - len(errors),
        errors=len(errors),
        errors_by_stage=dict(Counter(e.split(":", 1)[0] for e in errors)),
        skipped_resumed=len(run.done),
        seconds=seconds,
        images_per_s=processed / seconds if seconds else 0.0,
        megapixels_per_s=pixels / 1e6 / seconds * (processed / max(written.num_rows, 1)) if seconds else 0.0,
        mean_psnr=mean("psnr"),
        mean_ssim=mean("ssim"),
        mean_input_psnr=mean("input_psnr"),
        mean_hole_psnr=mean("hole_psnr"),
        model=model,
        model_sha256=sha256 or "",
        models=_models_used(written),
        model_applied=dict(Counter(v for v in written.column("model_applied").to_pylist() if v is not None)),
        duplicates=written.num_rows - len(set(written.column("key").to_pylist())),
        phase_seconds=runs.phase_seconds(*phases, end),
        config=asdict(config) | {"run_id": run.run_id} | extra,
    )
