"""CutPaste's augmentations (models.cutpaste.augment): geometry, colour jitter, seeded randomness."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest

from models.cutpaste import augment
from models.cutpaste.augment import (
    color_jitter,
    cutpaste,
    patch_box,
    rotate_patch,
    scar,
    shift_hue,
    training_batch,
)


@pytest.fixture
def no_jitter(monkeypatch):
    """Patches pasted as cut (colour jitter off), so the geometry can be read from the pixels."""
    monkeypatch.setattr(augment, "color_jitter", lambda image, rng, strength=0.1: image)


def distinct_image(size: int = 64) -> np.ndarray:
    """(3, size, size) with a different value at every pixel of channel 0."""
    values = np.arange(size * size, dtype=np.float32).reshape(size, size) / (size * size)
    return np.stack([values, values[::-1], values.T])


def test_patch_box_area_and_aspect_ratio_ranges():
    rng = np.random.default_rng(0)
    boxes = np.array([patch_box(rng, 256, 256) for _ in range(3000)], dtype=np.float64)
    area = boxes[:, 0] * boxes[:, 1] / 256**2
    log_aspect = np.log(boxes[:, 1] / boxes[:, 0])
    assert area.min() >= 0.019 and area.max() <= 0.152  # 2-15 % up to rounding to whole pixels
    assert area.min() < 0.025 and area.max() > 0.145
    assert log_aspect.min() >= math.log(0.3) - 0.03 and log_aspect.max() <= math.log(1 / 0.3) + 0.03
    # log-uniform: the log aspect ratio is uniform on [log 0.3, -log 0.3], so its mean is 0, its
    # quartiles at +-log(1/0.3) / 2
    assert abs(log_aspect.mean()) < 0.05
    np.testing.assert_allclose(np.quantile(log_aspect, [0.25, 0.75]), [-0.602, 0.602], atol=0.06)


def test_cutpaste_pastes_a_rectangle_of_the_same_image(no_jitter):
    image = distinct_image()
    for seed in range(20):
        out = cutpaste(image, np.random.default_rng(seed))
        changed = np.argwhere((out != image).any(axis=0))
        if not len(changed):
            continue  # pasted where it was cut
        (top, left), (bottom, right) = changed.min(axis=0), changed.max(axis=0) + 1
        window = out[:, top:bottom, left:right]
        # the changed pixels are a rectangle (or part of one, where the copy overlaps itself) whose
        # content is a window of the original: channel 0 encodes each source pixel's position
        rows, cols = np.divmod(np.rint(window[0] * 64 * 64).astype(int), 64)
        assert (np.diff(rows, axis=0) == 1).all() and (np.diff(cols, axis=1) == 1).all()
        assert (bottom - top) * (right - left) <= 0.15 * 64 * 64 + 64


def test_scar_is_a_thin_rotated_strip(no_jitter):
    image = distinct_image()
    areas = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        out = scar(image, rng)
        areas.append(int((out != image).any(axis=0).sum()))
    # width 2-16 x length 10-25 px: at most 16 * 25 pixels change (nearest-neighbour rotation keeps
    # about the strip's area), at least some
    assert 0 < min(areas) and max(areas) <= 16 * 25 + 40


def test_rotation_by_quarter_turns_and_area():
    patch = np.random.default_rng(1).random((3, 10, 4), dtype=np.float32)
    same, mask = rotate_patch(patch, 0.0)
    np.testing.assert_array_equal(same, patch)
    assert mask.all()
    quarter, mask = rotate_patch(patch, 90.0)  # counter-clockwise, as PIL's Image.rotate
    np.testing.assert_array_equal(quarter, np.rot90(patch, 1, axes=(1, 2)))
    assert mask.shape == (4, 10) and mask.all()
    tilted, mask = rotate_patch(np.ones((3, 20, 8), np.float32), 45.0)
    assert mask.shape == (20, 20)  # ceil((20 + 8) / sqrt 2)
    assert abs(int(mask.sum()) - 160) <= 12  # the strip's area survives the rotation


def test_hue_shift_matches_colorsys():
    rng = np.random.default_rng(2)
    image = rng.random((3, 5, 5)).astype(np.float32)
    shifted = shift_hue(image, 0.07)
    for y, x in [(0, 0), (2, 3), (4, 1)]:
        h, s, v = colorsys.rgb_to_hsv(*image[:, y, x])
        np.testing.assert_allclose(shifted[:, y, x], colorsys.hsv_to_rgb((h + 0.07) % 1, s, v), atol=1e-5)
    np.testing.assert_allclose(shift_hue(image, 0.0), image, atol=1e-6)
    red = np.zeros((3, 1, 1), np.float32)
    red[0] = 1
    np.testing.assert_allclose(shift_hue(red, 1 / 3)[:, 0, 0], [0, 1, 0], atol=1e-6)


def test_color_jitter_strength_zero_is_identity_and_stays_in_range():
    image = np.random.default_rng(3).random((3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(color_jitter(image, np.random.default_rng(0), 0.0), image, atol=1e-6)
    out = color_jitter(image, np.random.default_rng(0))
    assert out.min() >= 0 and out.max() <= 1 and not np.allclose(out, image)
    assert np.abs(out - image).max() < 0.5  # +-10 % factors and hue


@pytest.mark.parametrize("variant, groups", [("normal", 2), ("scar", 2), ("union", 2), ("3way", 3)])
def test_training_batch_shapes_labels_and_seed(variant, groups):
    images = np.random.default_rng(4).random((3, 3, 48, 48)).astype(np.float32)
    samples, labels = training_batch(images, variant, np.random.default_rng([0, 5]))
    assert samples.shape == (3 * groups, 3, 48, 48) and samples.dtype == np.float32
    np.testing.assert_array_equal(labels, np.repeat(np.arange(groups), 3))
    again, _ = training_batch(images, variant, np.random.default_rng([0, 5]))
    np.testing.assert_array_equal(again, samples)  # the same (seed, step): the same batch
    other, _ = training_batch(images, variant, np.random.default_rng([0, 6]))
    assert not np.array_equal(other, samples)
    for index in range(3, 3 * groups):  # every augmented copy differs from its original
        assert not np.array_equal(samples[index], samples[index % 3])
    cropped, _ = training_batch(images, variant, np.random.default_rng(0), patch_size=16)
    assert cropped.shape == (3 * groups, 3, 16, 16)


def test_3way_holds_one_cutpaste_and_one_scar_per_image(no_jitter):
    image = distinct_image(48)[None]
    samples, _ = training_batch(image, "3way", np.random.default_rng(9))
    rng = np.random.default_rng(9)
    original = augment.color_jitter(image[0], rng)
    np.testing.assert_array_equal(samples[0], original)
    np.testing.assert_array_equal(samples[1], cutpaste(original, rng))
    np.testing.assert_array_equal(samples[2], scar(original, rng))
