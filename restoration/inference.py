"""The model actors: the one Ray-side file that imports torch.

`RestoreActor` and `GeneratorActor` follow Ray's batch-inference pattern: a class that loads its model(s) once in
`__init__` and maps an Arrow batch in `__call__` under `torch.inference_mode()`. The pipelines
(`restoration.pipelines`) hand these classes to `map_batches`; their data tasks (decode, degrade, encode, write) never
import this module, so those worker processes never load torch.

Which model restores an image: `--model denoise` or `--model restore` (a model family) picks, per image, the gray
variant (`denoise-gray`) for gray images (L, LA, I;16, 1) and the colour variant (`denoise-color`) for colour ones
(RGB, RGBA, P, CMYK, ...: everything codec.decode turns into 3 channels); alpha is kept aside and re-attached
untouched. Any other name, path or URI is used for every image as given, adapting channels: a gray model on colour
input restores each channel as a gray image (noise and JPEG damage are per channel, so this keeps most of the model's
gain; the correlation between channels is what a colour model adds); a colour model on gray input sees the gray
channel replicated three times and its output is averaged back to one channel; gray upscalers and inpainters work on
colour in YCbCr (`ModelRunner.applied`). Every output row names the model that restored it (`model`, `model_sha256`)
and how (`model_applied`: "native", "per-channel", "replicated", "luma", "ycbcr").

Synthesis is reproducible by construction: row i's latent depends only on (seed, i) (`latent_for`), and the
generator runs in float64 on the CPU (bf16/float32 on GPUs is opt-in), so the same model, seed and index give
byte-identical PNGs whatever the batch size, the number of workers or retries.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from restoration import codec, degrade, schemas, sources
from restoration.checkpoint import LoadedModel, ModelFileError, load_named, model_label
from restoration.cluster import prioritise_model_actor
from restoration.device import default_device, use_bf16
from restoration.labels import check_labels, label_ids, row_labels  # noqa: F401 (inference.label_ids re-exported)
from restoration.models.dcgan import sample_latent
from restoration.tiling import tiled_apply

# `--model FAMILY` resolves per image: the gray variant for 1-channel images, the colour variant for 3-channel ones.
# The upscalers are gray models for every image: a colour image is upscaled on its luma (see ModelRunner).
MODEL_FAMILIES = {
    "denoise": ("denoise-gray", "denoise-color"),
    "restore": ("restore-gray", "restore-color"),
    "upscale": ("upscale-gray-x{scale}", "upscale-gray-x{scale}"),
    "inpaint": ("inpaint-gray", "inpaint-gray"),  # colour images: luma, and chroma at half resolution
    "repair": ("repair-gray", "repair-color"),
}
SCALES = (2, 3, 4)  # the bundled upscalers' factors
RESTORING_KINDS = ("restorer", "upscaler", "inpainter", "repairer")  # model kinds that map an image to a restored one


def models_by_channels(model: str, scale: int | None = None) -> dict[int, str]:
    """The model that restores images of each channel count (1, 3): a family's variants (the upscalers' for
    `scale`, 2 by default), else `model` for both."""
    if model in MODEL_FAMILIES:
        gray, color = (name.format(scale=scale or SCALES[0]) for name in MODEL_FAMILIES[model])
        return {1: gray, 3: color}
    return {1: model, 3: model}


def load_restorer(name_or_path: str) -> LoadedModel:
    """Load a restorer or upscaler model file by bundled name, path or URI (never executing pickled code)."""
    loaded = load_named(name_or_path)
    if loaded.kind not in RESTORING_KINDS:
        raise ModelFileError(
            f"{name_or_path} holds a {loaded.kind} model, expected one of {', '.join(RESTORING_KINDS)}"
        )
    return loaded


def model_scale(loaded: LoadedModel) -> int:
    """How many times larger than its input a model's output is (1 for the restorers)."""
    return int(getattr(loaded.config, "scale", 1))


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> full-range ITU-R 601 YCbCr (JPEG's), chroma centred on 0.5."""
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return torch.stack([y, 0.5 + (b - y) * 0.564, 0.5 + (r - y) * 0.713], 1)


def nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) float images -> a contiguous (N, C, H, W) tensor on the CPU."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `rgb_to_ycbcr`."""
    y, cb, cr = x.unbind(1)
    r = y + (cr - 0.5) / 0.713
    b = y + (cb - 0.5) / 0.564
    return torch.stack([r, (y - 0.299 * r - 0.114 * b) / 0.587, b], 1)


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
        loaded: LoadedModel | None = None,
    ) -> None:
        self.loaded = loaded or load_restorer(model)  # `loaded`: the model file already read, e.g. on the driver
        self.label = model_label(model)
        self.device = default_device()
        net = self.loaded.module
        if hasattr(net, "fold_batch_norm"):
            net.fold_batch_norm()
        # bf16 autocast changes PSNR by under 0.01 dB for these models and is several times faster where the hardware
        # has bf16 units. Channels-last is the layout oneDNN's and cuDNN's fastest convolutions use: on CPUs in fp32
        # too, where it restores 1.3-2x faster than the default layout (the colour restorers: the same speed).
        self.bf16 = use_bf16(precision, self.device)
        cpu = self.device.type == "cpu"
        self.memory_format = torch.channels_last if self.bf16 or cpu else torch.contiguous_format
        self.net = net.to(self.device, memory_format=self.memory_format).eval()
        self.compiled = compile
        self.ensemble = ensemble
        if compile:
            import torch._dynamo as dynamo  # only here: importing the compiler costs every actor seconds of CPU

            dynamo.config.suppress_errors = True  # a compiler failure falls back to eager, not an error row
            self.net = torch.compile(self.net)
        self.channels = self.loaded.config.channels
        self.masked = self.loaded.kind == "inpainter"  # takes the row's mask as one more input channel
        self.repairing = self.loaded.kind == "repairer"  # finds its own mask: gives it back beside the image
        # The overlap is the context each tile sees beyond the part it keeps: at least the receptive radius makes
        # tiled output equal to whole-image output; tiles align to the model's internal downscale.
        self.tile = tile
        self.overlap = max(overlap, getattr(net, "receptive_radius", 0))
        self.align = getattr(net, "downscale", 1)
        self.scale = model_scale(self.loaded)
        if self.tile <= 2 * self.overlap + self.align:
            self.tile = 2 * self.overlap + max(self.overlap, 64)

    def applied(self, channels: int) -> str:
        """How this model treats `channels`-channel images: "native", "per-channel", "replicated", "luma" (a gray
        upscaler on colour: the luma through the model, the chroma upscaled bicubic, as the super-resolution literature
        does) or "ycbcr" (a gray inpainter on colour: `_inpaint_ycbcr`)."""
        if channels == self.channels:
            return "native"
        if self.channels == 1:
            return "luma" if self.scale > 1 else "ycbcr" if self.masked else "per-channel"
        return "replicated"

    def restore_array(self, images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """Restore (N, H, W, C) float images with the model, adapting channels (see the module docstring).

        Args:
            masks: an inpainter's bool (N, H, W), True = missing; the output keeps every other pixel of `images` as
                it is, bit for bit (whatever tiling, bf16 or the ensemble did to the model's own composite).
        Returns:
            (N, s H, s W, C) float32 in [0, 1], s the model's scale (1 for the restorers).
        """
        if self.masked:
            return self._inpaint(images, masks)
        if self.repairing:
            return self.repair_array(images)[0]
        n, c = images.shape[0], images.shape[3]
        with torch.inference_mode():
            if self.applied(c) == "luma":
                ycc = rgb_to_ycbcr(nchw(images).to(self.device))  # (N, 3, H, W)
                luma = self.forward(ycc[:, :1].contiguous(memory_format=self.memory_format)).float()  # (N, 1, sH, sW)
                chroma = F.interpolate(ycc[:, 1:], scale_factor=self.scale, mode="bicubic", align_corners=False)
                y = ycbcr_to_rgb(torch.cat([luma, chroma], 1))  # (N, 3, sH, sW)
                return y.clamp_(0, 1).permute(0, 2, 3, 1).cpu().numpy()
            x = self._model_channels(images).to(self.device, memory_format=self.memory_format, non_blocking=True)
            return self._image_channels(self.forward(x).float(), n, c)

    def _inpaint(self, images: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        n, h, w, c = images.shape
        if masks is None or masks.shape != (n, h, w):
            raise ValueError(f"an inpainter needs a (N, H, W) = {(n, h, w)} mask, got {getattr(masks, 'shape', None)}")
        m = torch.from_numpy(masks[:, None].astype(np.float32))  # (N, 1, H, W)
        with torch.inference_mode():
            if self.applied(c) == "ycbcr":
                y = self._inpaint_ycbcr(images, m)
            else:
                y = self._image_channels(self._fill(self._model_channels(images), m), n, c)
        return np.where(masks[..., None], y, images)  # (N, H, W, C): the known pixels are the input's own values

    def _inpaint_ycbcr(self, images: np.ndarray, m: torch.Tensor) -> np.ndarray:
        """A gray inpainter on (N, H, W, 3) RGB with (N, 1, H, W) float holes: the luma filled at full resolution, Cb
        and Cr, which hold little detail, at half (2 x 2 means, a block missing where any of its pixels is), upsampled
        bilinearly. 1.5 passes of the model instead of 3 for R, G and B: on the benchmark's colour photos 2.5x faster,
        for 0.2-0.3 dB less."""
        h, w = images.shape[1:3]
        ycc = rgb_to_ycbcr(nchw(images))  # (N, 3, H, W)
        luma = self._fill(ycc[:, :1], m)  # (N, 1, H, W)
        chroma = F.avg_pool2d(ycc[:, 1:], 2, ceil_mode=True)  # (N, 2, H/2, W/2), edge blocks averaged over what is in
        half = F.max_pool2d(m, 2, ceil_mode=True)  # (N, 1, H/2, W/2)
        filled = self._fill(chroma.reshape(-1, 1, *chroma.shape[-2:]), half).reshape(chroma.shape)
        chroma = F.interpolate(filled, size=(h, w), mode="bilinear", align_corners=False)  # (N, 2, H, W)
        return ycbcr_to_rgb(torch.cat([luma, chroma], 1)).clamp_(0, 1).permute(0, 2, 3, 1).numpy()

    def _fill(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The inpainter's float32 composite of (B, C, H, W) images with (N, 1, H, W) holes, B a multiple of N: each
        image's C channels the model's, or gray channels of images that share the mask."""
        m = m.repeat_interleave(x.shape[0] // m.shape[0], 0)  # (B, 1, H, W)
        x = torch.cat([x, m], 1).to(self.device, memory_format=self.memory_format)
        return self.forward(x).float().cpu()

    def repair_array(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A repairer on (N, H, W, C) float images: (repaired (N, H, W, C) float32, bool (N, H, W) found mask, True =
        repaired; for a gray model on colour images, found in any channel). Every pixel outside the mask is the
        input's own, bit for bit, as an inpainter keeps its known pixels."""
        n, h, w, c = images.shape
        x = self._model_channels(images).to(self.device, memory_format=self.memory_format)
        with torch.inference_mode():
            y = self.forward(x).float()  # (B, C' + 1, H, W): the image, then the found mask
            found = (y[:, -1] > 0.5).reshape(n, -1, h, w).any(1).cpu().numpy()  # (N, H, W)
            y = self._image_channels(y[:, :-1], n, c)
        return np.where(found[..., None], y, images), found

    def _model_channels(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, C) float images -> the model's (B, C', H, W) input: each channel a gray image for a gray model
        on colour, the gray channel three times for a colour model on gray."""
        n, h, w, c = images.shape
        x = nchw(images)
        if self.channels == 1 and c == 3:
            return x.reshape(n * 3, 1, h, w)
        return x.expand(n, 3, h, w) if self.channels == 3 and c == 1 else x

    def _image_channels(self, y: torch.Tensor, n: int, c: int) -> np.ndarray:
        """The model's (B, C', H, W) output -> (N, H, W, C) float32 in [0, 1] (`_model_channels` undone)."""
        y = y.reshape(n, c, *y.shape[-2:]) if self.channels == 1 else y.mean(1, keepdim=True) if c == 1 else y
        return y.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def forward(self, x):
        """The model on a (B, C, H, W) batch on its device, in its memory format: tiled when larger than the tile, and
        on CPUs in slices of at most CPU_FORWARD_PIXELS pixels; averaged over the 8 orientations with `ensemble`.
        Call it under `torch.inference_mode()`."""
        if not self.ensemble:
            return self._sliced(x)

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
        b, _, h, w = x.shape
        per_pass = max(1, CPU_FORWARD_PIXELS // (h * w)) if self.device.type == "cpu" else b
        if per_pass >= b:
            return self._tiled(x)
        return torch.cat([self._tiled(x[i : i + per_pass]) for i in range(0, b, per_pass)])

    def _tiled(self, x):
        tile = self.tile
        while True:
            try:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    return tiled_apply(self.net, x, tile=tile, overlap=self.overlap, align=self.align, scale=self.scale)
            except torch.cuda.OutOfMemoryError:
                # On a GPU, retry with smaller tiles rather than failing the image.
                torch.cuda.empty_cache()
                if tile // 2 <= 2 * self.overlap + self.align:
                    raise
                tile //= 2


class RestoreActor:
    """Restores batches of decoded rows with the model each image calls for (`models_by_channels`): same-shape images
    run as one tensor batch. Loads its model(s) once, in `__init__` (or takes them already read, as `loaded`: model
    name -> LoadedModel)."""

    def __init__(
        self,
        model: str,
        tile: int = 512,
        overlap: int = 32,
        threads: int | None = None,
        precision: str = "auto",
        compile: bool = False,
        ensemble: bool = False,
        loaded: dict[str, LoadedModel] | None = None,
        scale: int | None = None,
    ) -> None:
        prioritise_model_actor()
        if threads:
            torch.set_num_threads(threads)
        names = models_by_channels(model, scale)  # `scale`: which upscalers `--model upscale` means
        loaded = loaded or {}
        runners = {
            name: ModelRunner(name, tile, overlap, precision, compile, ensemble, loaded.get(name))
            for name in dict.fromkeys(names.values())
        }
        self.runners = {c: runners[name] for c, name in names.items()}

    def runner(self, channels: int) -> ModelRunner:
        return self.runners[channels]

    def __call__(self, batch: pa.Table) -> pa.Table:

        rows = batch.to_pylist()
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, row in enumerate(rows):
            if row["error"] is None:
                groups.setdefault((row["height"], row["width"], row["channels"]), []).append(i)
        for (h, w, c), idx in groups.items():
            t0 = time.perf_counter()
            runner = self.runner(c)
            used = {"model": runner.label, "model_sha256": runner.loaded.sha256, "model_applied": runner.applied(c)}
            if runner.masked:  # an inpainter leaves an image without a mask as it is, and says so
                unmasked = [i for i in idx if rows[i]["mask"] is None]
                for i in unmasked:
                    pixels = codec.as_float(codec.from_raw(rows[i]["pixels"], h, w, c))
                    rows[i].update(used, model_applied="no-mask", pixels=pixels.tobytes(), restored_at=time.time())
                idx = [i for i in idx if rows[i]["mask"] is not None]
                if not idx:
                    continue
            try:
                stack = np.empty((len(idx), h, w, c), np.float32)  # (N, H, W, C), filled without temporaries
                for j, i in enumerate(idx):
                    codec.into_float(codec.from_raw(rows[i]["pixels"], h, w, c), stack[j])
                holes, found = None, None
                if runner.masked:  # (N, H, W) bool, True = missing
                    holes = np.stack([np.frombuffer(rows[i]["mask"], np.uint8).reshape(h, w) for i in idx]) > 0
                with torch.inference_mode():  # (N, H, W, C) float [and the (N, H, W) mask a repairer found]
                    if runner.repairing:
                        out, found = runner.repair_array(stack)
                    else:
                        out = runner.restore_array(stack, holes)
                per_row_ms = 1e3 * (time.perf_counter() - t0) / len(idx)
                done_at = time.time()
                for j, i in enumerate(idx):  # float32: quantising is the encode tasks' work, off the model's core
                    rows[i].update(used, pixels=np.ascontiguousarray(out[j], dtype=np.float32).tobytes())
                    rows[i].update(height=out.shape[1], width=out.shape[2])  # an upscaler's output is larger
                    rows[i]["found_mask"] = found[j].astype(np.uint8).tobytes() if found is not None else None
                    rows[i]["restored_at"] = done_at
                    rows[i]["elapsed_ms"] += per_row_ms
            except Exception as e:  # one bad group must not take the batch down: its rows become error rows
                for i in idx:
                    rows[i].update(used, pixels=None, error=f"restore: {type(e).__name__}: {str(e)[:200]}")
        return pa.Table.from_pylist(rows, schema=schemas.STAGE_SCHEMA)

    def restore_array(self, images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """Restore (N, H, W, C) float images with the model for C channels (see `ModelRunner.restore_array`)."""
        return self.runner(images.shape[3]).restore_array(images, masks)


def load_generator(name_or_path: str, mode: str):
    """Load a dcgan or vae model file; interpolate/reconstruct need a VAE."""
    loaded = load_named(name_or_path)
    if loaded.kind not in ("dcgan", "vae"):
        raise ModelFileError(f"{name_or_path} holds a {loaded.kind} model, expected a dcgan or vae for synthesis")
    if mode != "sample" and loaded.kind != "vae":
        raise ModelFileError(f"--mode {mode} needs a vae model; {name_or_path} holds a {loaded.kind}")
    return loaded


def latent_for(seed: int, index: int, latent_dim: int, truncation: float | None = None):
    """Row `index`'s latent: drawn from a generator seeded by (seed, index) alone. Returns a (latent_dim,) tensor."""

    rng = torch.Generator().manual_seed(degrade.seed_for(seed, f"latent/{index}"))
    return sample_latent(1, latent_dim, generator=rng, truncation=truncation)[0]


def uniforms_for(seed: int, indices: list[int]):
    """One U[0, 1) draw per row, seeded by (seed, index) alone: picks the component of a VAE's mixture prior.
    Returns a (len(indices),) float64 tensor."""
    draws = [np.random.default_rng(degrade.seed_for(seed, f"component/{i}")).random() for i in indices]
    return torch.tensor(draws, dtype=torch.float64)


def slerp(a, b, alpha: float):
    """Spherical interpolation between latents (Shoemake 1985); falls back to lerp for nearly parallel vectors."""
    omega = torch.arccos(torch.clamp(torch.dot(a / a.norm(), b / b.norm()), -1.0, 1.0))
    if omega.abs() < 1e-6:
        return (1 - alpha) * a + alpha * b
    return (torch.sin((1 - alpha) * omega) * a + torch.sin(alpha * omega) * b) / torch.sin(omega)


class GeneratorActor:
    """Holds one generator on its device; maps a batch of items (RUN_SCHEMA in sample mode, ITEM_SCHEMA otherwise)
    to PIXELS_SCHEMA rows (quantised, not yet encoded), or with `encode` to OUTPUT_SCHEMA rows (PNG)."""

    def __init__(self, config, run_id: str, threads: int | None = None, encode: bool = False) -> None:
        """`config`: the run's `SynthesizeConfig` (model, mode, seed, precision, batch size, ...)."""

        prioritise_model_actor()
        if threads:
            torch.set_num_threads(threads)
        self.config, self.run_id, self.encode = config, run_id, encode
        self.loaded = load_generator(config.model, config.mode)
        known = tuple(getattr(self.loaded.config, "labels", ()))
        name = model_label(config.model)
        self.label_ids = check_labels(config, known, name)
        self.device = default_device()
        self.dtype = {"float64": torch.float64, "float32": torch.float32, "bf16": torch.float32}[config.precision]
        self.module = self.loaded.module.to(self.device, self.dtype).eval()
        self.name = model_label(config.model)

    def __call__(self, items: pa.Table) -> pa.Table:

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
        latent_dim = self.loaded.config.latent_dim
        for start in range(0, len(indices), self.config.batch_size):
            chunk = indices[start : start + self.config.batch_size]
            z = torch.stack([latent_for(self.config.seed, i, latent_dim, self.config.truncation) for i in chunk])
            labels = row_labels(self.label_ids, chunk)  # the classes laid out in index order (None: unconditional)
            if self.loaded.kind == "vae":  # N(0, I) draws -> the VAE's sampling prior (unchanged for N(0, I) itself);
                # a conditional VAE's mixture of each row's class
                y = None if labels is None else torch.tensor(labels, dtype=torch.long)  # (B,)
                z = self.module.prior_latents(z.to(self.device, self.dtype), uniforms_for(self.config.seed, chunk), y)
            images = self._decode(z, labels)  # (B, S, S, C) uint8
            rows.add(chunk, images, time.time(), labels=labels)

    def _between_labels(self, item: dict, rows: _Rows) -> None:
        """One sequence of an interpolation between classes a and b: z from (seed, p) alone (p = the sequence's
        number) mapped to the sampling prior of both classes mixed 1:1, decoded with the condition
        (1 - alpha) onehot(a) + alpha onehot(b) at `steps` alphas from 0 to 1. Rows carry the class where the
        condition is one class (alpha 0 or 1) and the class names as `source_keys`."""
        (a, _), (b, _) = self.label_ids
        steps, index = self.config.steps, item["index"]
        p = index // steps
        classes = self.loaded.config.num_classes
        eps = latent_for(self.config.seed, p, self.loaded.config.latent_dim)[None]  # (1, D)
        both = torch.zeros(1, classes, dtype=torch.float64)
        both[0, [a, b]] = 0.5  # (1, classes): z typical of both classes
        z = self.module.prior_latents(eps.to(self.device, self.dtype), uniforms_for(self.config.seed, [p]), both)
        alphas = torch.linspace(0, 1, steps, dtype=torch.float64)  # (T,)
        condition = torch.zeros(steps, classes, dtype=torch.float64)
        condition[:, a], condition[:, b] = 1 - alphas, alphas  # (T, classes)
        images = self._decode(z.expand(steps, -1), condition)  # one z, the condition moving
        labels = [a] + [None] * (steps - 2) + [b]
        alpha_list = alphas.tolist()
        rows.add(list(range(index, index + steps)), images, time.time(), item["source_keys"], alpha_list, labels=labels)

    def _from_inputs(self, item: dict, rows: _Rows) -> None:
        if self.config.labels:  # interpolate between classes: no input images
            self._between_labels(item, rows)
            return

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
    def _decode(self, z, labels=None) -> np.ndarray:
        """Latents (B, D) [and the classes of a conditional model: a list of B ids, or (B, classes) class weights
        for a VAE] -> images (B, S, S, C) uint8, quantised as a
        whole batch with `codec.to_uint`'s arithmetic (float32: clip to [0, 1], times 255, round half to even), here
        in torch, in place and on the model's device: on CPUs that is a third of the cost of NumPy on the permuted
        copy, and a GPU sends back bytes, not floats."""
        z = z.to(self.device, self.dtype)
        if labels is None or torch.is_tensor(labels):
            y = None if labels is None else labels.to(self.device, self.dtype)  # (B, classes) class weights
        else:
            y = torch.tensor(labels, dtype=torch.long, device=self.device)  # (B,)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
            if self.loaded.kind == "dcgan":
                images = self.module.generator(z, y).float().add_(1).div_(2)
            else:
                images = self.module.decode(z, y).float() if y is not None else self.module.decode(z).float()
        if torch.isnan(images).any():  # as `codec.to_uint` refuses them
            raise ValueError(f"{self.name} generated {int(torch.isnan(images).sum())} NaN samples")
        images = images.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def _to_tensor(self, pixels: np.ndarray):
        """(H, W, C) float in [0, 1] -> (C, S, S) at the VAE's size and channels."""
        cfg = self.loaded.config
        if pixels.shape[2] == 3 and cfg.channels == 1:
            pixels = sources.luma(pixels)
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (C, H, W)
        if x.shape[0] != cfg.channels:
            x = x.expand(3, -1, -1)
        if x.shape[1:] != (cfg.image_size, cfg.image_size):
            x = F.interpolate(x[None], size=(cfg.image_size, cfg.image_size), mode="area")[0]
        return x


class _Rows:
    """One actor call's output, gathered a generator batch at a time as columns and made into one table at the end:
    a dict per row and `Table.from_pylist` cost more than the PNG of a 28x28 image."""

    def __init__(self) -> None:
        self.index: list[int] = []
        self.source_keys: list[list[str] | None] = []
        self.label: list[int | None] = []
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
        labels: list[int] | None = None,
    ) -> None:
        """Rows `indices` with their `images` (B, S, S, C) uint8, or with `error` and no image; `done_at` is the Unix
        time the generator finished them (or they failed); `labels`: their class ids (conditional models)."""
        n = len(indices)
        self.index += indices
        self.source_keys += [source_keys] * n
        self.label += labels if labels is not None else [None] * n
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
            "label": pa.array(self.label, pa.int32()),
            "source_keys": pa.array(self.source_keys, pa.list_(pa.string())),
            "alpha": pa.array(self.alpha, pa.float64()),
            "run_id": pa.array([actor.run_id] * n, pa.string()),
            "error": pa.array(self.error, pa.string()),
            "generated_at": pa.array(self.generated_at, pa.float64()),
            "channels": where_ok(channels),
            "file": pa.nulls(n, pa.string()),  # set by `write_files` when the run writes files
        }
        schema = schemas.SYNTH_OUTPUT_SCHEMA if encode else schemas.SYNTH_PIXELS_SCHEMA
        return pa.table([columns[name] for name in schema.names], schema=schema)
