"""The restore pipeline's default batch size, worked out from the run's first image (no torch, no Ray)."""

from __future__ import annotations

from restoration import codec

# The default batch: as many images as make this many output pixels (at least 1, at most MAX_AUTO_BATCH), sized from
# the run's first image. One batch is one actor task and one block between the operators, so small images in batches
# of a fixed count pay the per-task costs (scheduling in the driver, the decode/encode tasks' start, Arrow and the
# object store) many times per megapixel, and large ones make blocks of hundreds of megabytes. 2 MP is 32 images of
# 256 x 256, 8 of 512 x 512, 1 of 2048 x 1024 and larger.
AUTO_BATCH_PIXELS = 2 * 1024 * 1024
MAX_AUTO_BATCH = 32


def auto_batch_size(
    sample: dict | None, scale: int = 1, shrink: int = 1, max_pixels: int = codec.DEFAULT_MAX_PIXELS
) -> int:
    """The default batch: images of the sample's size that make AUTO_BATCH_PIXELS output pixels, 1 to MAX_AUTO_BATCH.

    Args:
        sample: the run's first input row ({"key", "image", ...}), or None (an empty input).
        scale: the model's upscaling factor (its output has `scale`^2 times the pixels it is given).
        shrink: the factor `--degrade lr:F` shrinks the images by before the model (1 without).
    """
    if sample is None:
        return MAX_AUTO_BATCH
    try:
        width, height = codec.image_size(sample.get("image") or b"", max_pixels)
    except codec.DecodeError:  # the run reports the image as an error row; the batch size does not matter for it
        return MAX_AUTO_BATCH
    output_pixels = (width // shrink) * (height // shrink) * scale * scale
    return max(1, min(MAX_AUTO_BATCH, AUTO_BATCH_PIXELS // max(1, output_pixels)))


def spread_batch_size(batch_size: int, rows: int, actors: int) -> int:
    """The default batch cut so that a small run gives every model actor work: at most `rows / actors` (rounded up).

    A batch is one actor task, so the demo's 10 photos in the default batches of 8 went to one actor as 8 and to the
    other as 2, and the run took as long as the 8 on one core; as 5 and 5 both cores share the work. Runs of many
    batches are unchanged.

    Args:
        batch_size: the default batch (`auto_batch_size`).
        rows: the rows the run has left to restore.
        actors: the model actors of the pool.
    """
    return max(1, min(batch_size, -(-rows // max(1, actors))))
