"""The damage degradations record their masks: holes:F covers about F and is seeded by (seed, key), spots:N draws
spots, and every mask says exactly which pixels its step replaced."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data as skdata

from restoration import degrade, masks
from restoration.errors import UserError


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return (skdata.camera()[:256, :256, None] / 255.0).astype(np.float32)  # (256, 256, 1)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4])
@pytest.mark.parametrize("size", [(256, 256), (180, 180), (96, 300)])
def test_holes_cover_about_the_fraction_asked(fraction, size):
    covered = [masks.coverage(masks.free_form(*size, fraction, degrade.rng_for(seed, "k"))) for seed in range(5)]
    # Segments are added until the coverage is reached: at most one more segment with its round joint.
    segment = (masks.SEGMENT_LENGTH[1] + masks.BRUSH_WIDTH[1]) * masks.BRUSH_WIDTH[1] / (size[0] * size[1])
    assert all(fraction <= c <= fraction + segment for c in covered), covered


def test_holes_are_seeded_by_seed_and_key(photo):
    a = degrade.apply_masked(photo, "holes:0.25", degrade.rng_for(7, "a.png"))
    b = degrade.apply_masked(photo, "holes:0.25", degrade.rng_for(7, "a.png"))
    c = degrade.apply_masked(photo, "holes:0.25", degrade.rng_for(7, "b.png"))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert (a[1] != c[1]).mean() > 0.1


@pytest.mark.parametrize("spec", ["holes:0.3", "spots:40", "missing:0.2", "scratch:6", "holes:0.1,spots:10"])
def test_the_mask_is_exactly_what_the_damage_replaced(photo, spec):
    image = np.clip(photo, 1 / 255, 254 / 255)  # no pixel already holds a fill value (0 or 1)
    out, mask = degrade.apply_masked(image, spec, degrade.rng_for(0, spec))
    assert mask.shape == image.shape[:2] and mask.dtype == bool and mask.any()
    np.testing.assert_array_equal(out[~mask], image[~mask])  # untouched outside, bit for bit
    assert (out[mask] != image[mask]).all()  # replaced inside
    np.testing.assert_array_equal(degrade.apply(image, spec, degrade.rng_for(0, spec)), out)  # same draws as apply


def test_holes_are_zero_and_spots_are_white_or_black(photo):
    out, mask = degrade.apply_masked(photo, "holes:0.2", degrade.rng_for(1, "x"))
    assert (out[mask] == 0).all()
    out, mask = degrade.apply_masked(photo, "spots:30", degrade.rng_for(1, "x"))
    assert set(np.unique(out[mask]).tolist()) <= {0.0, 1.0}
    assert 30 <= mask.sum() <= 30 * np.pi * 4.5**2


def test_no_damage_step_no_mask_and_lr_shrinks_the_mask(photo):
    assert degrade.apply_masked(photo, "noise:5", degrade.rng_for(0, "k"))[1] is None
    full = degrade.apply_masked(photo, "holes:0.2", degrade.rng_for(0, "k"))[1]
    out, small = degrade.apply_masked(photo, "holes:0.2,lr:2", degrade.rng_for(0, "k"))
    assert out.shape[:2] == small.shape == (128, 128)
    np.testing.assert_array_equal(small, full.reshape(128, 2, 128, 2).any(axis=(1, 3)))


@pytest.mark.parametrize(
    ("spec", "expected"), [("holes:1", r"expected a number in \[0, 1\)"), ("spots:2.5", "integer")]
)
def test_bad_damage_specs_are_refused(spec, expected):
    with pytest.raises(UserError, match=expected):
        degrade.parse_spec(spec)
