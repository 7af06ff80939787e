"""The bundled models: every file matches its JSON record, loads by short name, and does its job on a real photo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from restoration import codec, degrade, masks, metrics, samples, sources
from restoration.checkpoint import WEIGHTS_DIR, load_named
from restoration.inference import RestoreActor

RECORDS = sorted(WEIGHTS_DIR.glob("*.json"))


@pytest.mark.parametrize("record", RECORDS, ids=[r.stem for r in RECORDS])
def test_each_bundled_file_matches_its_record(record):
    meta = json.loads(record.read_text())
    loaded = load_named(record.stem)
    assert meta["name"] == record.stem and meta["file"] == f"{record.stem}.pt"
    assert loaded.sha256 == meta["sha256"]
    assert loaded.kind == meta["model"]["kind"]


@pytest.fixture(scope="module")
def camera_crop() -> np.ndarray:
    return skimage.data.camera()[96:224, 160:288].astype(np.float32)[..., None] / 255.0  # (128, 128, 1)


@pytest.mark.parametrize("name", ["denoise-gray", "restore-gray"])
def test_bundled_restorers_remove_noise(name, camera_crop):
    torch.set_num_threads(1)
    noisy = camera_crop + np.random.default_rng(0).normal(0, 25 / 255, camera_crop.shape).astype(np.float32)
    restored = RestoreActor(name, precision="fp32").restore_array(noisy[None])[0]
    assert restored.shape == camera_crop.shape
    assert metrics.psnr(restored, camera_crop) > metrics.psnr(noisy, camera_crop) + 5.0


def test_restore_gray_reduces_jpeg_artifacts(camera_crop):
    torch.set_num_threads(1)
    compressed = degrade.jpeg(camera_crop, 10)
    restored = RestoreActor("restore-gray", precision="fp32").restore_array(compressed[None])[0]
    assert metrics.psnr(restored, camera_crop) > metrics.psnr(compressed, camera_crop) + 0.2


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bundled_upscalers_beat_bicubic_on_a_photo_and_colour_goes_through_its_luma(scale):
    """`--model upscale --scale S` on a photo it never saw (scikit-image's astronaut), at the literature's protocol:
    modcrop, bicubic down by S, Y-channel PSNR with S border pixels cropped."""
    torch.set_num_threads(1)
    photo = skimage.data.astronaut()[100:292, 150:342].astype(np.float32) / 255.0  # (192, 192, 3)
    small = degrade.apply(photo, f"lr:{scale}", np.random.default_rng(0))
    actor = RestoreActor("upscale", precision="fp32", scale=scale)
    restored = actor.restore_array(small[None])[0]
    assert restored.shape == photo.shape and actor.runner(3).applied(3) == "luma"
    bicubic = np.clip(codec.resize(small, 192, 192), 0, 1)
    gain = metrics.psnr_y(restored, photo, scale) - metrics.psnr_y(bicubic, photo, scale)
    assert gain > 0.5, gain


@pytest.mark.parametrize("name", ["repair-gray", "repair-color"])
def test_bundled_repairers_fill_scratches_and_spots_and_leave_a_clean_photo_alone(name, camera_crop):
    torch.set_num_threads(1)
    photo = camera_crop if name == "repair-gray" else skimage.data.astronaut()[:160, 100:260].astype(np.float32) / 255
    damaged, mask = degrade.apply_masked(photo, "scratch:10,spots:20", np.random.default_rng(0))
    actor = RestoreActor(name, precision="fp32")
    repaired, found = actor.runner(photo.shape[-1]).repair_array(damaged[None])
    assert metrics.psnr(repaired[0], photo) > metrics.psnr(damaged, photo) + 4.0
    assert (found[0] & mask).sum() > 0.5 * mask.sum()  # it found most of the damage by itself
    untouched = actor.restore_array(photo[None])[0]
    # Its detection threshold was chosen so that undamaged images stay within 40 dB of themselves.
    assert metrics.psnr(untouched, photo) >= 40.0 and (untouched != photo).any(-1).mean() < 0.01


def hole_gain_over_biharmonic(actor: RestoreActor, photo: np.ndarray, seed: int) -> float:
    """Cut 25 % free-form holes (seeded) into `photo` (H, W, C), fill them with `actor`, check that every known pixel
    comes out as it went in, and return the PSNR inside the holes minus the biharmonic fill's there (the benchmark's
    baseline, as it calls it: all channels at once)."""
    from restoration.bench.quality.inpaint import biharmonic

    hole = masks.free_form(*photo.shape[:2], 0.25, np.random.default_rng(seed))
    damaged = np.where(hole[..., None], np.float32(0), photo)
    filled = actor.restore_array(damaged[None], hole[None])[0]
    np.testing.assert_array_equal(filled[~hole], photo[~hole])
    classical = biharmonic(damaged, hole)
    return metrics.psnr(filled[hole], photo[hole]) - metrics.psnr(classical[hole], photo[hole])


@pytest.mark.parametrize("name, margin", [("inpaint-gray", 0.4), ("inpaint-gray-large", 0.9)])
def test_bundled_gray_inpainters_beat_biharmonic_on_photos_they_never_saw_and_keep_every_known_pixel(name, margin):
    """Each gray inpainter on scikit-image's full-size gray photos, 25 % free-form holes (the benchmark's masks): inside
    the holes it beats the biharmonic fill, the benchmark's best classical method, on their mean (measured: 0.60 dB
    for `inpaint-gray`, 1.29 for `inpaint-gray-large`); every known pixel comes out exactly as it went in."""
    torch.set_num_threads(1)
    actor = RestoreActor(name, precision="fp32")
    photos = {n: getattr(skimage.data, n)().astype(np.float32)[..., None] / 255.0 for n in ("camera", "coins", "moon")}
    gains = {n: hole_gain_over_biharmonic(actor, photo, seed=0) for n, photo in photos.items()}
    assert np.mean(list(gains.values())) > margin, gains


def test_inpaint_fills_colour_photos_in_ycbcr_better_than_biharmonic():
    """`--model inpaint` on colour photos runs `inpaint-gray` on the luma, and on the chroma at half resolution, with
    the image's mask; inside 25 % holes (other masks than the benchmark's) it beats the biharmonic fill, all channels
    at once as the benchmark calls it, on the mean over the 7 colour sample photos (measured: 0.57 dB; it loses on the
    two with fur and petals, -0.88 and -1.25; with Cb and Cr swapped: -7.6), and every known pixel is kept."""
    torch.set_num_threads(1)
    actor = RestoreActor("inpaint", precision="fp32")
    assert actor.runner(3).label == "inpaint-gray" and actor.runner(3).applied(3) == "ycbcr"
    gains = {
        n: hole_gain_over_biharmonic(actor, sources.image_to_float(Image.open(samples.sample_photo(n)), 3), seed=1)
        for n in samples.COLOR_PHOTOS
    }
    assert np.mean(list(gains.values())) > 0.3, gains


@pytest.mark.parametrize("name", ["dcgan-fmnist-cond", "vae-fmnist-cond"])
def test_bundled_conditional_generators_make_the_class_asked_for(name):
    """500 samples, 50 of each class: the bundled classifier puts most of them in the class they were made for (its
    records say 91 % and 90 % on 10,000; a model that ignored the class would score about 10 %)."""
    from restoration import fid

    extractor, _ = fid.load_extractor()
    asked = torch.arange(10).repeat_interleave(50)
    images = fid.sample_images(load_named(name), len(asked), 0, extractor.batch_size, name, asked)
    accuracy = float((fid.classify(images, extractor) == asked).float().mean())
    assert accuracy > 0.85, accuracy
