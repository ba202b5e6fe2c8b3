"""CutPaste's augmentations in numpy, on RGB images in [0, 1] of shape (3, H, W) float32.

As in Li et al. (CVPR 2021) and the PyTorch re-implementation:

- :func:`color_jitter`: brightness, contrast and saturation factors in [1 - s, 1 + s] and a hue
  shift in [-s, s] (fractions of the hue circle), applied in a random order (torchvision's
  ``ColorJitter(s, s, s, s)``), s = 0.1. Every training image gets it first; each patch again.
- :func:`cutpaste`: a rectangle of 2-15 % of the image's area, aspect ratio log-uniform in
  [0.3, 1/0.3], cut at a uniform position, colour-jittered and pasted at another uniform position
  of the same image.
- :func:`scar`: a thin rectangle, width 2-16 px and length 10-25 px, colour-jittered, rotated by
  -45..45 degrees (nearest neighbour, canvas grown to hold it) and pasted at a uniform position
  through its mask.

Every draw comes from the ``numpy.random.Generator`` passed in, so a batch is a function of the
seed and the step (:func:`training_batch`).
"""

from __future__ import annotations

import math

import numpy as np

from models.components.color import adjust

VARIANTS = ("normal", "scar", "3way", "union")
CLASSES = {"normal": 2, "scar": 2, "3way": 3, "union": 2}
"""Classes the classifier tells apart: original vs augmented (3way: original, cutpaste, scar)."""
JITTER = 0.1
AREA = (0.02, 0.15)
ASPECT = 0.3
SCAR_WIDTH = (2.0, 16.0)
SCAR_LENGTH = (10.0, 25.0)
SCAR_ROTATION = (-45.0, 45.0)


def _rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """(3, H, W) RGB in [0, 1] -> (3, H, W) HSV, hue in [0, 1)."""
    r, g, b = image
    high, low = image.max(axis=0), image.min(axis=0)
    span = high - low
    safe = np.where(span > 0, span, 1.0)
    hue = np.where(high == r, (g - b) / safe, np.where(high == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.where(span > 0, (hue / 6.0) % 1.0, 0.0)
    saturation = np.where(high > 0, span / np.where(high > 0, high, 1.0), 0.0)
    return np.stack([hue, saturation, high])


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_rgb_to_hsv`."""
    hue, saturation, value = hsv
    sector = np.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    p, q, t = value * (1 - saturation), value * (1 - saturation * frac), value * (1 - saturation * (1 - frac))
    sector = sector.astype(np.int64) % 6
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    return np.stack([np.choose(sector, [c[channel] for c in choices]) for channel in range(3)])


def shift_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """``image`` (3, H, W) with its hue turned by ``shift`` (a fraction of the circle)."""
    hsv = _rgb_to_hsv(image)
    hsv[0] = (hsv[0] + shift) % 1.0
    return _hsv_to_rgb(hsv).astype(np.float32)


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = JITTER) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter of ``image`` (3, H, W) in a random order."""
    out = np.asarray(image, dtype=np.float32)
    for step in rng.permutation(4):
        if step == 3:
            out = shift_hue(out, rng.uniform(-strength, strength))
            continue
        out = adjust(out, int(step), rng.uniform(1 - strength, 1 + strength))
    return out.astype(np.float32)


def _uniform_corner(rng: np.random.Generator, room: int) -> int:
    """A position in [0, room] (``int(uniform(0, room))``, as the re-implementation draws it)."""
    return int(rng.uniform(0, max(room, 0)))


def patch_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int]:
    """(patch height, patch width) of a CutPaste rectangle in an image of height x width."""
    area = rng.uniform(*AREA) * height * width
    aspect = math.exp(rng.uniform(math.log(ASPECT), math.log(1 / ASPECT)))
    cut_w = min(width, max(1, round(math.sqrt(area * aspect))))
    cut_h = min(height, max(1, round(math.sqrt(area / aspect))))
    return cut_h, cut_w


def cutpaste(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``image`` (3, H, W) with a jittered rectangle of itself pasted elsewhere."""
    _, height, width = image.shape
    cut_h, cut_w = patch_box(rng, height, width)
    top, left = _uniform_corner(rng, height - cut_h), _uniform_corner(rng, width - cut_w)
    patch = color_jitter(image[:, top:top + cut_h, left:left + cut_w], rng)
    to_top, to_left = _uniform_corner(rng, height - cut_h), _uniform_corner(rng, width - cut_w)
    out = image.copy()
    out[:, to_top:to_top + cut_h, to_left:to_left + cut_w] = patch
    return out


def rotate_patch(patch: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """``patch`` (3, h, w) rotated counter-clockwise about its centre by ``degrees``, on a canvas
    grown to hold it (nearest neighbour): the rotated pixels (3, H, W) and their mask (H, W) bool."""
    _, h, w = patch.shape
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    out_w = math.ceil(abs(w * cos) + abs(h * sin) - 1e-9)
    out_h = math.ceil(abs(w * sin) + abs(h * cos) - 1e-9)
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
    dy, dx = ys + 0.5 - out_h / 2, xs + 0.5 - out_w / 2  # pixel centres about the canvas centre
    src_x = cos * dx - sin * dy + w / 2  # inverse rotation (image y points down)
    src_y = sin * dx + cos * dy + h / 2
    col, row = np.floor(src_x).astype(np.int64), np.floor(src_y).astype(np.int64)
    mask = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    out = np.zeros((3, out_h, out_w), dtype=np.float32)
    out[:, mask] = patch[:, row[mask], col[mask]]
    return out, mask


def scar(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``image`` (3, H, W) with a thin jittered, rotated strip of itself pasted elsewhere."""
    _, height, width = image.shape
    cut_w = min(width, max(1, int(rng.uniform(*SCAR_WIDTH))))
    cut_h = min(height, max(1, int(rng.uniform(*SCAR_LENGTH))))
    top, left = _uniform_corner(rng, height - cut_h), _uniform_corner(rng, width - cut_w)
    patch = color_jitter(image[:, top:top + cut_h, left:left + cut_w], rng)
    patch, mask = rotate_patch(patch, rng.uniform(*SCAR_ROTATION))
    patch, mask = patch[:, :height, :width], mask[:height, :width]  # a canvas larger than the image
    _, rot_h, rot_w = patch.shape
    to_top, to_left = _uniform_corner(rng, height - rot_h), _uniform_corner(rng, width - rot_w)
    out = image.copy()
    region = out[:, to_top:to_top + rot_h, to_left:to_left + rot_w]
    region[:, mask] = patch[:, mask]
    return out


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size window of ``image`` (3, H, W) at a uniform position (the patch-level model)."""
    _, height, width = image.shape
    top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    return image[:, top:top + size, left:left + size]


def training_batch(images: np.ndarray, variant: str, rng: np.random.Generator,
                   patch_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's batch from B images (B, 3, S, S) in [0, 1].

    Each image is colour-jittered (and, with ``patch_size``, cropped to a random window), then
    gives the originals and their augmented copies: ``normal`` and ``scar`` (2B samples: labels
    0 and 1), ``union`` (2B: the copy is a cutpaste or a scar with probability 1/2 each), ``3way``
    (3B: labels 0 original, 1 cutpaste, 2 scar). Returns samples (M, 3, s, s) float32 (originals
    first, then each augmentation in turn) and labels (M,) int64.
    """
    originals = []
    for image in images:
        image = color_jitter(image, rng)
        originals.append(random_crop(image, patch_size, rng) if patch_size else image)
    groups = [originals]
    if variant in ("normal", "3way"):
        groups.append([cutpaste(image, rng) for image in originals])
    if variant in ("scar", "3way"):
        groups.append([scar(image, rng) for image in originals])
    if variant == "union":
        groups.append([cutpaste(image, rng) if rng.uniform() < 0.5 else scar(image, rng)
                       for image in originals])
    labels = np.repeat(np.arange(len(groups), dtype=np.int64), len(originals))
    return np.stack([sample for group in groups for sample in group]).astype(np.float32), labels
