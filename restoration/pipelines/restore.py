"""The restore pipeline: input shards (or raw image objects) → decode → [degrade] → restorer actors → encode → Parquet.

    read → map_batches(decode_batch) → map_batches(Restorer actors, batched by shape) → map_batches(encode_batch)
         → write_parquet(OUT/run_id=<id>/) → _manifest.json

Every stage takes and returns Arrow tables with an explicit schema, so a row that fails anywhere becomes a row with
`error = "<stage>: <reason>"` and flows on: rows out = rows in. The stages are pure functions over tables (tested
without Ray); only `run_restore` knows about Ray.

Which model restores an image: `--model denoise` or `--model restore` (a model family) picks, per image, the gray
variant (`denoise-gray`) for gray images (L, LA, I;16, 1) and the colour variant (`denoise-color`) for colour ones
(RGB, RGBA, P, CMYK, ...: everything codec.decode turns into 3 channels); alpha is kept aside and re-attached
untouched. Any other name, path or URI is used for every image as given, adapting channels: a gray model on colour
input restores each channel as a gray image (noise and JPEG damage are per channel, so this keeps most of the model's
gain; the correlation between channels is what a colour model adds); a colour model on gray input sees the gray
channel replicated three times and its output is averaged back to one channel. Every output row names the model
that restored it (`model`, `model_sha256`) and how (`model_applied`: "native", "per-channel" or "replicated"), and
the manifest counts rows per model and per way applied.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from restoration import codec, data, degrade, files, metrics, storage
from restoration.cluster import DATA_TASK_CPUS

# Between stages a row carries its pixels as raw bytes (H, W, C) — Arrow binary, no pickling, no copies beyond the one
# into the numpy view: integer samples at the image's bit depth (uint8, or uint16 for 16-bit images) for a decoded
# input and a clean reference (exact for integer files; float and 32-bit sources keep the 16 bits their PNG is
# written at), float32 for a degraded input, whose noise is not quantised, and
# for the model's output, which the encode tasks quantise (work kept off the model's core). The length tells which
# (`stage_pixels`). For 8-bit inputs that moves a quarter of the bytes float32 would from decode to the model.
STAGE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("pixels", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("alpha", pa.binary()),  # raw uint8/uint16 (H, W), null when the image has none
        ("bit_depth", pa.int32()),
        ("source_mode", pa.string()),
        ("reference", pa.binary()),  # (H, W, C) clean image as `pixels`, null when there is none
        ("degradation", pa.string()),
        ("input_psnr", pa.float64()),
        ("elapsed_ms", pa.float64()),
        ("error", pa.string()),
        ("model", pa.string()),  # set by RestoreActor: the model that restored the row ...
        ("model_sha256", pa.string()),
        ("model_applied", pa.string()),  # ... and how: "native", "per-channel" or "replicated"
        ("restored_at", pa.float64()),  # set by RestoreActor: Unix seconds when the model finished the row
        ("icc_profile", pa.binary()),  # the source's colour profile, embedded in the output (codec.icc_for)
    ]
)
OUTPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", pa.string()),
        ("model", pa.string()),
        ("model_sha256", pa.string()),
        ("degradation", pa.string()),
        ("psnr", pa.float64()),
        ("ssim", pa.float64()),
        ("input_psnr", pa.float64()),
        ("elapsed_ms", pa.float64()),
        ("run_id", pa.string()),
        ("error", pa.string()),
        # Unix seconds when the model finished the row (when encode_batch did, for rows that never reached a model):
        # the pipeline's timeline, unblurred by the write, which encodes min_rows_per_file rows at a time.
        ("restored_at", pa.float64()),
        ("model_applied", pa.string()),  # "native", "per-channel" (gray model, colour image), "replicated" (converse)
        ("file", pa.string()),  # with --format files/both: the image file written, relative to the run folder
    ]
)

# Largest block the pipeline's operators build (Ray Data's default is 128 MiB). Every operator holds a block in and
# one being built out, so the block size, not the number of images, sets how much memory each worker needs: 128 MiB
# blocks doubled the actor's peak between a 256-image run (whose whole output fits in one block) and a 2,560-image
# one. 16 MiB is 64 restored 256 x 256 gray images (float32) and keeps the actor's peak within about a quarter.
BLOCK_BYTES = 16 * 1024 * 1024

# `--model FAMILY` resolves per image: the gray variant for 1-channel images, the colour variant for 3-channel ones.
MODEL_FAMILIES = {"denoise": ("denoise-gray", "denoise-color"), "restore": ("restore-gray", "restore-color")}


def models_by_channels(model: str) -> dict[int, str]:
    """The model that restores images of each channel count (1, 3): a family's variants, else `model` for both."""
    if model in MODEL_FAMILIES:
        gray, color = MODEL_FAMILIES[model]
        return {1: gray, 3: color}
    return {1: model, 3: model}


@dataclass(frozen=True)
class RestoreConfig:
    """Everything a restore run depends on; written into its manifest."""

    input: str
    output: str
    model: str = "denoise"  # a family of MODEL_FAMILIES (per-image choice), or a bundled name, file or URI
    degrade: str | None = None  # spec applied before restoring (evaluation): the clean image becomes the reference
    seed: int = 0  # run seed; an image's degradation seed is derived from (seed, key)
    run_id: str | None = None
    resume: bool = False
    workers: int | None = None  # restorer actors; default: one per GPU, else one per 2 CPUs
    batch_size: int = 8
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

    def __post_init__(self) -> None:
        if self.degrade:
            degrade.parse_spec(self.degrade)  # fail before any work on a bad spec
        from restoration.device import PRECISIONS

        files.check_options(self.format, self.image_format, self.quality)
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("batch_size", "tile"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.workers is not None and self.workers <= 0:
            raise ValueError(f"--workers must be > 0, got {self.workers}")
        if self.overlap < 0:
            raise ValueError(f"--overlap must be >= 0, got {self.overlap}")
        if self.tile <= 2 * self.overlap:
            raise ValueError(f"--tile must be > 2 × --overlap, got tile {self.tile} and overlap {self.overlap}")
        if self.run_id is not None and (not self.run_id or "/" in self.run_id or self.run_id.startswith(".")):
            raise ValueError(f"--run-id must be a plain name (no '/', not starting with '.'), got {self.run_id!r}")


# ----------------------------------------------------------------------------------------------------------- models
def load_restorer(name_or_path: str):
    """Load a restorer model file by bundled name, path or URI (never executing pickled code)."""
    from restoration.checkpoint import load_named

    return load_named(name_or_path, expected_kind="restorer")


# ----------------------------------------------------------------------------------------------------------- stages
def stage_pixels(buf: bytes, h: int, w: int, c: int) -> np.ndarray:
    """A row's raw pixel bytes as an (H, W, C) array: uint8, uint16 or float32, as the length says."""
    dtype = {1: np.uint8, 2: np.uint16, 4: np.float32}[len(buf) // (h * w * c)]
    return np.frombuffer(buf, dtype=dtype).reshape(h, w, c)


def _as_float(pixels: np.ndarray) -> np.ndarray:
    """Stage pixels as float32 in [0, 1] (integer samples scaled by their maximum)."""
    return pixels if pixels.dtype == np.float32 else _into_float(pixels, np.empty(pixels.shape, np.float32))


def _into_float(pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Write stage pixels into the float32 array `out` as values in [0, 1]; returns `out`."""
    if pixels.dtype == np.float32:
        out[...] = pixels
    else:
        np.multiply(pixels, np.float32(1 / np.iinfo(pixels.dtype).max), out=out)
    return out


def _samples(pixels: np.ndarray, bit_depth: int) -> bytes:
    """Float pixels in [0, 1] as the bytes of their integer samples at `bit_depth` (`codec.to_uint`'s rounding)."""
    return codec.to_uint(pixels, bit_depth).tobytes()


def _error_row(key: str, error: str, elapsed_ms: float = 0.0) -> dict:
    return {"key": key, "error": error, "elapsed_ms": elapsed_ms}


def decode_batch(
    batch: pa.Table, degradation: str | None = None, seed: int = 0, max_pixels: int = codec.DEFAULT_MAX_PIXELS
) -> pa.Table:
    """Decode (and, for evaluation, degrade) a batch of input rows.

    Args:
        batch: rows with `key`, `image` (encoded bytes) and optionally `reference` (encoded clean image).
        degradation: spec applied to each decoded image, seeded by (seed, key); the clean image becomes the reference.

    Returns:
        A STAGE_SCHEMA table, one row per input row (failures carry `error = "decode: ..."`).
    """
    steps = degrade.parse_spec(degradation) if degradation else ()
    spec_text = degrade.format_spec(steps) if steps else None
    keys = batch.column("key").to_pylist()
    images = batch.column("image").to_pylist()
    refs = batch.column("reference").to_pylist() if "reference" in batch.column_names else [None] * len(keys)
    rows = []
    for key, encoded, ref in zip(keys, images, refs, strict=True):
        t0 = time.perf_counter()
        try:
            decoded = codec.decode(encoded or b"", max_pixels=max_pixels)
        except codec.DecodeError as e:
            rows.append(_error_row(key, f"decode: {e}", 1e3 * (time.perf_counter() - t0)))
            continue
        pixels, reference = decoded.pixels, None
        try:
            if ref is not None:
                reference = codec.decode(ref, max_pixels=max_pixels).pixels
                if reference.shape != pixels.shape:
                    raise codec.DecodeError(f"reference shape {reference.shape} differs from image {pixels.shape}")
            if steps:
                reference = pixels
                pixels = degrade.apply(pixels, steps, degrade.rng_for(seed, key)).astype(np.float32, copy=False)
        except (codec.DecodeError, ValueError) as e:
            rows.append(_error_row(key, f"reference: {e}" if not steps else f"degrade: {e}"))
            continue
        h, w, c = pixels.shape
        depth = decoded.bit_depth
        rows.append(
            {
                "key": key,
                "pixels": pixels.astype(np.float32, copy=False).tobytes() if steps else _samples(pixels, depth),
                "height": h,
                "width": w,
                "channels": c,
                "alpha": decoded.alpha.tobytes() if decoded.alpha is not None else None,
                "bit_depth": decoded.bit_depth,
                "source_mode": decoded.mode,
                "reference": _samples(reference, depth) if reference is not None else None,
                "degradation": spec_text,
                "input_psnr": metrics.psnr(pixels, reference) if reference is not None else None,
                "elapsed_ms": 1e3 * (time.perf_counter() - t0),
                "error": None,
                "icc_profile": decoded.icc_profile,
            }
        )
    return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


# Most pixels one forward pass takes on a CPU; a batch holding more is run in slices. Per pixel, a pass over several
# hundred thousand pixels is up to twice as slow as one over a 256 x 256 image, because the activations outgrow the
# caches: on an AVX2 CPU, fp32 `denoise-gray` restored 8 x 256^2 at 0.21 MP/s on one thread and 0.40 on two, against
# 0.41 and 0.79 for the same images one per pass (and 0.33 / 0.53 for 1 x 512^2). A GPU takes the whole batch.
CPU_FORWARD_PIXELS = 256 * 256


class ModelRunner:
    """One restorer on its device, run the way the pipeline runs it: batch norm folded, bf16 autocast and channels-last
    where they pay, images larger than the tile restored tile by tile, channels adapted to the model's.

    With `compile`, the forward pass is `torch.compile`d (TorchInductor): fused, generated kernels instead of one
    library call per layer. The first batch of each input shape pays for the compilation (tens of seconds on a CPU,
    a few for every later shape, until shapes are treated as dynamic), so it pays off on long runs. Should the
    compiler fail (no C++ compiler on the node, say), the model runs as it is.

    With `ensemble`, each image is restored in its 8 dihedral orientations (4 rotations, each mirrored or not) and
    the 8 results, turned back, are averaged: the self-ensemble of Lim et al. 2017 (EDSR+) and Timofte et al. 2016.
    The nets are not equivariant to these transforms, so their errors partly cancel; it costs 8 forward passes.
    """

    def __init__(
        self,
        model: str,
        tile: int = 512,
        overlap: int = 32,
        precision: str = "auto",
        compile: bool = False,
        ensemble: bool = False,
    ) -> None:
        import torch

        from restoration.checkpoint import model_label
        from restoration.device import default_device, use_bf16

        self.loaded = load_restorer(model)
        self.label = model_label(model)
        self.device = default_device()
        net = self.loaded.module
        if hasattr(net, "fold_batch_norm"):
            net.fold_batch_norm()
        # bf16 autocast changes PSNR by under 0.01 dB for these models and is several times faster where the hardware
        # has bf16 units; channels-last is the layout oneDNN's and cuDNN's fastest convolutions use.
        self.bf16 = use_bf16(precision, self.device)
        self.memory_format = torch.channels_last if self.bf16 else torch.contiguous_format
        self.net = net.to(self.device, memory_format=self.memory_format).eval()
        self.compiled = compile
        self.ensemble = ensemble
        if compile:
            import torch._dynamo

            torch._dynamo.config.suppress_errors = True  # a compiler failure falls back to eager, not an error row
            self.net = torch.compile(self.net)
        self.channels = self.loaded.config.channels
        # The overlap is the context each tile sees beyond the part it keeps: at least the receptive radius makes
        # tiled output equal to whole-image output; tiles align to the model's internal downscale.
        self.tile = tile
        self.overlap = max(overlap, getattr(net, "receptive_radius", 0))
        self.align = getattr(net, "downscale", 1)
        if self.tile <= 2 * self.overlap + self.align:
            self.tile = 2 * self.overlap + max(self.overlap, 64)

    def applied(self, channels: int) -> str:
        """How this model treats `channels`-channel images: "native", "per-channel" or "replicated"."""
        if channels == self.channels:
            return "native"
        return "per-channel" if self.channels == 1 else "replicated"

    def restore_array(self, images: np.ndarray) -> np.ndarray:
        """Restore (N, H, W, C) float images with the model, adapting channels (see the module docstring)."""
        import torch

        n, h, w, c = images.shape
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # (N, C, H, W)
        if self.channels == 1 and c == 3:
            x = x.reshape(n * 3, 1, h, w)  # every channel as a gray image
        elif self.channels == 3 and c == 1:
            x = x.expand(n, 3, h, w)
        x = x.to(self.device, memory_format=self.memory_format, non_blocking=True)
        with torch.inference_mode():
            y = self.forward(x)
            if self.channels == 1 and c == 3:
                y = y.reshape(n, 3, h, w)
            elif self.channels == 3 and c == 1:
                y = y.mean(dim=1, keepdim=True)
            return y.float().clamp_(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def forward(self, x):
        """The model on a (B, C, H, W) batch on its device, in its memory format: tiled when larger than the tile, and
        on CPUs in slices of at most CPU_FORWARD_PIXELS pixels; averaged over the 8 orientations with `ensemble`.
        Call it under `torch.inference_mode()`."""
        if not self.ensemble:
            return self._sliced(x)
        import torch

        total = None
        for mirrored in (False, True):
            xm = x.flip(-1) if mirrored else x
            for quarter_turns in range(4):
                xt = torch.rot90(xm, quarter_turns, (-2, -1)).contiguous(memory_format=self.memory_format)
                y = torch.rot90(self._sliced(xt).float(), -quarter_turns, (-2, -1))  # back to the input's orientation
                y = y.flip(-1) if mirrored else y
                total = y if total is None else total.add_(y)
        return total.div_(8)

    def _sliced(self, x):
        import torch

        b, _, h, w = x.shape
        per_pass = max(1, CPU_FORWARD_PIXELS // (h * w)) if self.device.type == "cpu" else b
        if per_pass >= b:
            return self._tiled(x)
        return torch.cat([self._tiled(x[i : i + per_pass]) for i in range(0, b, per_pass)])

    def _tiled(self, x):
        import torch

        from restoration.tiling import tiled_apply

        tile = self.tile
        while True:
            try:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    return tiled_apply(self.net, x, tile=tile, overlap=self.overlap, align=self.align)
            except torch.cuda.OutOfMemoryError:
                # On a GPU, retry with smaller tiles rather than failing the image.
                torch.cuda.empty_cache()
                if tile // 2 <= 2 * self.overlap + self.align:
                    raise
                tile //= 2


class RestoreActor:
    """Restores batches of decoded rows with the model each image calls for (`models_by_channels`): same-shape images
    run as one tensor batch. Loads its model(s) once, in `__init__`."""

    def __init__(
        self,
        model: str,
        tile: int = 512,
        overlap: int = 32,
        threads: int | None = None,
        precision: str = "auto",
        compile: bool = False,
        ensemble: bool = False,
    ) -> None:
        import torch

        from restoration.cluster import prioritise_model_actor

        prioritise_model_actor()
        if threads:
            torch.set_num_threads(threads)
        names = models_by_channels(model)
        runners = {
            name: ModelRunner(name, tile, overlap, precision, compile, ensemble)
            for name in dict.fromkeys(names.values())
        }
        self.runners = {c: runners[name] for c, name in names.items()}

    def runner(self, channels: int) -> ModelRunner:
        return self.runners[channels]

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        rows = batch.to_pylist()
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, row in enumerate(rows):
            if row["error"] is None:
                groups.setdefault((row["height"], row["width"], row["channels"]), []).append(i)
        for (h, w, c), idx in groups.items():
            t0 = time.perf_counter()
            runner = self.runner(c)
            used = {"model": runner.label, "model_sha256": runner.loaded.sha256, "model_applied": runner.applied(c)}
            try:
                stack = np.empty((len(idx), h, w, c), np.float32)  # (N, H, W, C), filled without temporaries
                for j, i in enumerate(idx):
                    _into_float(stage_pixels(rows[i]["pixels"], h, w, c), stack[j])
                with torch.inference_mode():
                    out = runner.restore_array(stack)  # (N, H, W, C) float
                per_row_ms = 1e3 * (time.perf_counter() - t0) / len(idx)
                done_at = time.time()
                for j, i in enumerate(idx):  # float32: quantising is the encode tasks' work, off the model's core
                    rows[i].update(used, pixels=np.ascontiguousarray(out[j], dtype=np.float32).tobytes())
                    rows[i]["restored_at"] = done_at
                    rows[i]["elapsed_ms"] += per_row_ms
            except Exception as e:  # one bad group must not take the batch down: its rows become error rows
                for i in idx:
                    rows[i].update(used, pixels=None, error=f"restore: {type(e).__name__}: {str(e)[:200]}")
        return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)

    def restore_array(self, images: np.ndarray) -> np.ndarray:
        """Restore (N, H, W, C) float images with the model for C channels (see `ModelRunner.restore_array`)."""
        return self.runner(images.shape[3]).restore_array(images)


def _png_mode(channels: int, has_alpha: bool, bit_depth: int) -> str:
    if channels == 1:
        return "LA" if has_alpha else ("I;16" if bit_depth == 16 else "L")
    return "RGBA" if has_alpha else "RGB"


def encode_batch(batch: pa.Table, model: str, model_sha256: str | None, run_id: str) -> pa.Table:
    """Encode restored rows as PNG (alpha re-attached, 16-bit kept, the colour profile embedded), with PSNR/SSIM
    against the reference.

    Args:
        model, model_sha256: the run's model, for rows no model saw (they failed before restoring); restored rows
            carry the model that restored them.

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
        }
        if row["error"] is None:
            try:
                h, w, c = row["height"], row["width"], row["channels"]
                restored = codec.to_uint(stage_pixels(row["pixels"], h, w, c), row["bit_depth"])  # the PNG's samples
                alpha = None
                if row["alpha"] is not None:
                    dtype = np.uint16 if len(row["alpha"]) == 2 * h * w else np.uint8
                    alpha = np.frombuffer(row["alpha"], dtype=dtype).reshape(h, w)
                png = codec.encode_png(
                    restored, alpha=alpha, bit_depth=row["bit_depth"], icc_profile=row.get("icc_profile")
                )
                result.update(image=png, width=w, height=h, mode=_png_mode(c, alpha is not None, row["bit_depth"]))
                if row["reference"] is not None:
                    reference = _as_float(stage_pixels(row["reference"], h, w, c))
                    # SSIM's 11×11 window needs an image at least that large; smaller ones get PSNR only.
                    small = min(h, w) < 11
                    delivered = _as_float(restored)  # the metrics describe the file written, not the float output
                    result.update(
                        psnr=metrics.psnr(delivered, reference),
                        ssim=None if small else metrics.ssim(delivered, reference),
                    )
            except Exception as e:  # noqa: BLE001 - becomes the row's error
                result.update(image=None, error=f"encode: {type(e).__name__}: {str(e)[:200]}")
        result["elapsed_ms"] = (row["elapsed_ms"] or 0.0) + 1e3 * (time.perf_counter() - t0)
        result["restored_at"] = row.get("restored_at") or time.time()
        out.append(result)
    return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)


# ----------------------------------------------------------------------------------------------------------- runs
# Side of the crop of the first input image on which `data_share` times the stages.
SHARE_SAMPLE_SIDE = 256


def data_share(config: RestoreConfig, sample: dict | None) -> float | None:
    """The fraction of an image's CPU time the data operators (decode, degrade, encode, metrics) take next to the
    model, measured here on one thread with the run's own stage functions: `actor_resources` splits the cores by it.

    Args:
        sample: an input row ({"key", "image"} and optionally "reference"), e.g. `data.first_row(config.input)`. A
            central crop of at most SHARE_SAMPLE_SIDE px a side is re-encoded as PNG and timed, so a large photo costs
            no more than a crop.

    Returns:
        The share in [0, 1], or None without a sample or when it does not decode (the run reports it as an error row).
    """
    from restoration.cluster import measure_share

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
        return decode_batch(batch, config.degrade, config.seed, config.max_pixels)

    actor = RestoreActor(
        config.model, config.tile, config.overlap, precision=config.precision, ensemble=config.ensemble
    )
    decoded = decode()
    restored = actor(decoded)
    if restored.column("error")[0].as_py() is not None:
        return None

    def decode_and_encode() -> None:
        decode()
        encode_batch(restored, config.model, None, "share")

    decode_and_encode()  # warm-up, as building `decoded` and `restored` was for the model
    return measure_share(lambda: actor(decoded), decode_and_encode)


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
    model: str = ""
    model_sha256: str = ""  # "" when --model is a family: `models` names each model used
    models: dict = field(default_factory=dict)  # model label -> {"sha256", "rows"} over the restored rows
    model_applied: dict = field(default_factory=dict)  # "native" / "per-channel" / "replicated" -> rows
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


def run_dir(output: str, run_id: str) -> str:
    return storage.join(output, f"run_id={run_id}")


def default_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def read_output(uri: str, columns: list[str], schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Table:
    """Read columns of a run's Parquet files (all files of the run folder; markers and anything under a name starting
    with '_' or '.' excluded); an empty table with the columns of `schema` when the run has written nothing yet."""
    fs, root = storage.resolve(uri)
    files = []
    if storage.file_info(uri).type.name != "NotFound":
        files = [
            i.path
            for i in storage.list_files(uri)
            if i.path.endswith(".parquet")
            and not any(part.startswith(("_", ".")) for part in posixpath.relpath(i.path, root).split("/"))
        ]
    tables = [pq.read_table(f, filesystem=fs, columns=columns) for f in files]
    if not tables:
        return pa.table({c: pa.array([], schema.field(c).type) for c in columns})
    return pa.concat_tables(tables)


def _models_used(written: pa.Table) -> dict:
    used: dict[str, dict] = {}
    for name, sha, applied in zip(
        *(written.column(c).to_pylist() for c in ("model", "model_sha256", "model_applied")), strict=True
    ):
        if applied is not None:  # restored by that model (rows that failed before restoring name the run's model)
            entry = used.setdefault(name, {"sha256": sha, "rows": 0})
            entry["rows"] += 1
    return used


def run_restore(config: RestoreConfig) -> RestoreReport:
    """Run a restore job on the current Ray cluster (a local one when none is configured).

    What readers see: Ray Data writes an attempt's Parquet files under a staging prefix,
    `OUT/_staging/run_id=<id>/<attempt>/`, outside the run folder (and hidden from Hive-style readers of OUT by its
    leading '_'). Only when the whole write has succeeded are the files moved into `OUT/run_id=<id>/` (a rename on
    local disks; copy-then-delete of whole objects on S3, which readers never see half-written), then the manifest
    is written. So the run folder holds only complete files of finished attempts: a crashed restore actor's batch is
    retried by Ray and written once (write tasks name their files by task, so a retried write replaces its own file),
    and an attempt that fails for good (the store gone for longer than the retries last) commits nothing. `--resume`
    first discards what failed attempts left in staging, then skips the keys already in the run folder, so each key is
    written once; the manifest counts `duplicates` (output rows whose key is already taken) to prove it.

    Returns:
        The report also written as `OUT/run_id=<id>/_manifest.json` (written last, after every Parquet file).
    Raises:
        storage.StorageError: the store failed for good during the run (one line; `--resume` finishes the run).
        ClusterError: a task failed for good for another reason (one line naming it).
    """
    import ray

    from restoration.cluster import actor_resources, init_ray

    t_start = time.perf_counter()
    # Fail fast on a bad model, before Ray starts; a family needs both of its variants.
    loaded = {name: load_restorer(name) for name in dict.fromkeys(models_by_channels(config.model).values())}
    run_sha256 = next(iter(loaded.values())).sha256 if len(loaded) == 1 else None  # rows name their own model
    run_id = config.run_id or default_run_id()
    out_uri = run_dir(config.output, run_id)
    rows_uri = rows_dir(out_uri, config.format)
    data.input_files(config.input)  # fail fast on a missing or empty input, before Ray starts
    storage.ensure_bucket(config.output)
    # Files: keys that would share a file name are known before the run, so every one of them is an error row.
    clashes = files.collisions(data.input_keys(config.input), config.image_format) if config.format != "parquet" else {}

    init_ray()
    ds = data.read_images(config.input, extra_columns=("reference",), num_cpus=DATA_TASK_CPUS)
    ds.context.target_max_block_size = BLOCK_BYTES  # this run's own copy of the context
    rows_in = data.count_rows(config.input)  # from the Parquet footers: ds.count() would run the read once more

    # Resume: keys already written by earlier attempts of this run are skipped; what failed attempts left in staging
    # never reached the run folder and is discarded (its keys are restored again).
    staging = staging_dir(config.output, run_id)
    done = set()
    if config.resume:
        done = set(read_output(rows_uri, ["key"]).column("key").to_pylist())
    elif storage.exists(out_uri):
        raise ValueError(f"{out_uri} already exists: pass --resume to finish that run, or choose another --run-id")
    remove_tree(staging)
    if done:
        done_ref = ray.put(done)
        ds = ds.filter(lambda row, d=done_ref: row["key"] not in ray.get(d))  # noqa: B008
    workers, use_gpu, threads, actor_cpus, _, _ = actor_resources(
        config.workers, config.gpu, lambda: data_share(config, data.first_row(config.input, ("reference",)))
    )
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"degradation": config.degrade, "seed": config.seed, "max_pixels": config.max_pixels},
        batch_format="pyarrow",
        batch_size=config.batch_size,
        num_cpus=DATA_TASK_CPUS,  # unlike the actors' reservation, so Ray Data does not fuse decode into the actor
    )
    # One model batch per block: an actor task takes a whole block, and blocks of BLOCK_BYTES hold hundreds of small
    # images, so a few blocks would leave all but one or two actors of the pool idle.
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    ds = ds.map_batches(
        RestoreActor,
        fn_constructor_kwargs={
            "model": config.model,
            "tile": config.tile,
            "overlap": config.overlap,
            "threads": threads,
            "precision": config.precision,
            "compile": config.compile,
            "ensemble": config.ensemble,
        },
        compute=ray.data.ActorPoolStrategy(size=workers),
        batch_format="pyarrow",
        batch_size=config.batch_size,
        num_cpus=actor_cpus,
        num_gpus=1 if use_gpu else 0,
    )
    from restoration.checkpoint import model_label

    model_name = config.model if config.model in MODEL_FAMILIES else model_label(config.model)
    ds = ds.map_batches(
        encode_batch,
        fn_kwargs={"model": model_name, "model_sha256": run_sha256, "run_id": run_id},
        batch_format="pyarrow",
        batch_size=config.batch_size,
        num_cpus=DATA_TASK_CPUS,
    )
    if config.format != "parquet":
        ds = ds.map_batches(
            write_files,
            fn_kwargs={
                "run_uri": out_uri,
                "image_format": config.image_format,
                "quality": config.quality,
                "clashes": ray.put(clashes),
                "keep_image": config.format == "both",
            },
            batch_format="pyarrow",
            batch_size=config.batch_size,
            num_cpus=DATA_TASK_CPUS,
        )
    t_write, t_commit = write_attempt(ds, staging, rows_uri, "restore", run_id, min_rows_per_file=256)
    t_summary = time.perf_counter()

    # The manifest counts what is really in the output (earlier attempts of a resumed run included).
    written = read_output(
        rows_uri,
        ["key", "width", "height", "psnr", "ssim", "input_psnr", "error", "model", "model_sha256", "model_applied"],
    )
    if config.format == "files":  # the error rows beside the files, where a person looks for them
        failed = written.filter(pc.invert(pc.is_null(written.column("error")))).select(["key", "error"])
        storage.write_bytes(storage.join(out_uri, "_errors.parquet"), data.table_to_parquet(failed))
    errors = [e for e in written.column("error").to_pylist() if e is not None]
    stages = Counter(e.split(":", 1)[0] for e in errors)
    ok_mask = pc.is_null(written.column("error"))
    pixels = (
        pc.sum(
            pc.multiply(
                pc.filter(written["width"], ok_mask).cast(pa.int64()),
                pc.filter(written["height"], ok_mask).cast(pa.int64()),
            )
        ).as_py()
        or 0
    )
    processed = rows_in - len(done)
    seconds = time.perf_counter() - t_start
    phases = phase_seconds(t_start, t_write, t_commit, t_summary, t_start + seconds)

    def mean(column: str) -> float | None:
        values = [v for v in written.column(column).to_pylist() if v is not None and math.isfinite(v)]
        return float(np.mean(values)) if values else None

    report = RestoreReport(
        run_id=run_id,
        output=out_uri,
        rows_in=rows_in,
        rows_out=written.num_rows,
        ok=written.num_rows - len(errors),
        errors=len(errors),
        errors_by_stage=dict(stages),
        skipped_resumed=len(done),
        seconds=seconds,
        images_per_s=processed / seconds if seconds else 0.0,
        megapixels_per_s=pixels / 1e6 / seconds * (processed / max(written.num_rows, 1)) if seconds else 0.0,
        mean_psnr=mean("psnr"),
        mean_ssim=mean("ssim"),
        mean_input_psnr=mean("input_psnr"),
        model=model_name,
        model_sha256=run_sha256 or "",
        models=_models_used(written),
        model_applied=dict(Counter(v for v in written.column("model_applied").to_pylist() if v is not None)),
        duplicates=written.num_rows - len(set(written.column("key").to_pylist())),
        phase_seconds=phases,
        config=asdict(config) | {"run_id": run_id, "workers": workers, "gpu": use_gpu},
    )
    storage.write_bytes(storage.join(out_uri, "_manifest.json"), json.dumps(asdict(report), indent=2).encode())
    return report


def rows_dir(out_uri: str, output_format: str) -> str:
    """Where a run's Parquet rows live: the run folder itself, or with `--format files` its `_rows/` (so that the
    run folder holds the images, `_errors.parquet` and `_manifest.json`, and the rows stay for resume and reports)."""
    return storage.join(out_uri, "_rows") if output_format == "files" else out_uri


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
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def phase_seconds(start: float, write: float, commit: float, summary: float, end: float) -> dict[str, float]:
    """A run's `phase_seconds` from the `time.perf_counter()` readings at which each phase began, and the end."""
    return {"setup": write - start, "write": commit - write, "commit": summary - commit, "summary": end - summary}


def staging_dir(output: str, run_id: str) -> str:
    """Where the attempts of run `run_id` write before they commit: OUT/_staging/run_id=<id>/ (see `run_restore`)."""
    return storage.join(output, "_staging", f"run_id={run_id}")


def write_attempt(
    ds, staging: str, out_uri: str, kind: str, run_id: str, min_rows_per_file: int, concurrency: int | None = None
) -> tuple[float, float]:
    """Write `ds` as one attempt under `staging`, then commit its files into the run folder `out_uri`.

    The write reserves DATA_TASK_CPUS, at most `concurrency` tasks at once (`cluster.data_task_cap`), like the
    encoding operator before it, so the two fuse into one task (Ray Data fuses only equal reservations and caps).

    Returns:
        The `time.perf_counter()` readings at which the write and the commit began.
    Raises:
        storage.StorageError, ClusterError: the write failed for good (`run_failure`); nothing was committed.
    """
    attempt_uri = storage.join(staging, uuid.uuid4().hex[:12])
    attempt_fs, attempt_path = storage.resolve(attempt_uri)
    t_write = time.perf_counter()
    try:
        ds.write_parquet(
            attempt_path,
            filesystem=attempt_fs,
            min_rows_per_file=min_rows_per_file,
            ray_remote_args={"num_cpus": DATA_TASK_CPUS},
            concurrency=concurrency,
        )
    except Exception as e:  # a task failed for good: nothing of this attempt reaches the run folder
        raise run_failure(kind, run_id, e) from None
    t_commit = time.perf_counter()
    commit_staged(attempt_uri, out_uri)
    return t_write, t_commit


def commit_staged(attempt_uri: str, out_uri: str) -> None:
    """Move an attempt's finished Parquet files from `OUT/_staging/run_id=<id>/<attempt>/` into the run folder, then
    drop the run's staging folder (and, on a local disk, `OUT/_staging` once empty)."""
    fs, out_path = storage.resolve(out_uri)
    files = [i.path for i in storage.list_files(attempt_uri) if i.path.endswith(".parquet")]
    if not storage.is_s3(out_uri):
        fs.create_dir(out_path, recursive=True)
    for path in files:
        try:
            fs.move(path, posixpath.join(out_path, posixpath.basename(path)))
        except OSError as e:
            raise storage.StorageError(
                f"cannot commit {path} to {out_uri}: {storage.redact(str(e))}; rerun with --resume to finish the run"
            ) from None
    run_staging = attempt_uri.rstrip("/").rsplit("/", 1)[0]
    remove_tree(run_staging)
    if not storage.is_s3(out_uri):
        staging_root = Path(storage.resolve(run_staging)[1]).parent
        if staging_root.is_dir() and not any(staging_root.iterdir()):
            staging_root.rmdir()


def remove_tree(uri: str) -> None:
    """Delete a folder or prefix and everything under it (nothing when it does not exist)."""
    if storage.exists(uri):
        fs, path = storage.resolve(uri)
        fs.delete_dir(path)


def run_failure(kind: str, run_id: str, error: BaseException) -> Exception:
    """One line for a `kind` run ("restore", "synthesis") that stopped: the innermost cause (Ray wraps a task's
    exception in its own), redacted."""
    from restoration.cluster import ClusterError

    cause, seen = error, set()
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException):
            break
        cause = inner
    # The task's own exception leads with its message (Ray Data appends retry advice on further lines); an exception
    # of Ray's own carries the task's name and traceback first and the wrapped "SomeError: message" line last.
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    if type(cause).__module__.startswith("ray."):
        named = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b[^:]*: ", line)]
        reason = named[-1] if named else f"{type(cause).__name__}: {lines[-1] if lines else ''}"
    else:
        reason = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    reason = storage.redact(reason)[:300]
    hint = "nothing of this attempt was committed; rerun with --resume to finish the run"
    if isinstance(cause, OSError):
        return storage.StorageError(f"{kind} run {run_id!r} stopped: the store failed: {reason}; {hint}")
    return ClusterError(f"{kind} run {run_id!r} stopped: a task failed for good: {reason}; {hint}")
