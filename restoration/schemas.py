"""The Arrow schemas rows have between the pipelines' stages and in their output: the data contracts.

No torch and no Ray here: the data tasks, the model actors (`restoration.inference`) and the drivers
(`restoration.pipelines`) all build and read these tables.
"""

from __future__ import annotations

import pyarrow as pa

# ----------------------------------------------------------------------------------------------------------- restore
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
        ("model_applied", pa.string()),  # ... and how (inference.ModelRunner.applied)
        ("restored_at", pa.float64()),  # set by RestoreActor: Unix seconds when the model finished the row
        ("icc_profile", pa.binary()),  # the source's colour profile, embedded in the output (codec.icc_for)
        ("input_height", pa.int32()),  # the model's input size; `height`/`width` become the output's (upscalers)
        ("input_width", pa.int32()),
        ("mask", pa.binary()),  # raw uint8 (H, W) of the model's input, 1 = missing (inpainting), null when none
        ("found_mask", pa.binary()),  # raw uint8 (H, W), 1 = repaired: the mask a repair model found, else null
    ]
)
RESTORE_OUTPUT_SCHEMA = pa.schema(
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
        ("model_applied", pa.string()),  # "native", "per-channel", "luma", "ycbcr", "replicated" (ModelRunner.applied)
        ("file", pa.string()),  # with --format files/both: the image file written, relative to the run folder
        ("input_width", pa.int32()),  # the size of the image the model saw: `width`/`height` times less for an
        ("input_height", pa.int32()),  # upscaler, the same otherwise
        ("hole_psnr", pa.float64()),  # PSNR inside the row's mask (given or made by --degrade), with a reference
        ("mask", pa.binary()),  # with --emit-mask: PNG of the mask a repair model found (255 = repaired), else null
    ]
)

# ----------------------------------------------------------------------------------------------------------- synthesize
SYNTH_OUTPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("index", pa.int64()),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("model_sha256", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("label", pa.int32()),  # class id asked of a class-conditional model (its name: the manifest), else null
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
# What the generator runs give: SYNTH_OUTPUT_SCHEMA with the image as raw uint8 samples (height, width, channels), which
# `encode_images` turns into PNG, inside the actor on CPUs and in tasks of its own beside a GPU actor.
SYNTH_PIXELS_SCHEMA = pa.schema(
    [f for f in SYNTH_OUTPUT_SCHEMA if f.name != "image"]
    + [pa.field("pixels", pa.binary()), pa.field("channels", pa.int32())]
)
# What the actors receive in sample mode: runs of consecutive output indices [start, stop), one actor task's worth
# each (see `task_rows`), made on the driver, so no read tasks (and no worker processes for them) stand between the
# start of a run and its first generator batch.
SYNTH_RUN_SCHEMA = pa.schema([("start", pa.int64()), ("stop", pa.int64())])
# What they receive in the other modes: one row per input item.
SYNTH_ITEM_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),  # first output index of the item
        ("source_keys", pa.list_(pa.string())),
        ("sources", pa.list_(pa.binary())),  # encoded input images (interpolate: 2, reconstruct: 1)
    ]
)
