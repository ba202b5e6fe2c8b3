"""Colour adjustments of RGB pixels in [0, 1], and the way between network inputs and pixels.

Networks take ImageNet-normalised images (core.normalization); the trained methods augment in
[0, 1] RGB (CutPaste's colour jitter, EfficientAD's autoencoder jitter), so they convert with
:func:`to_pixels` and back with :func:`to_inputs`. Brightness, contrast and saturation are each a
blend of the image with a base (black, the mean grey level, the grey image), clipped to [0, 1],
as torchvision's ``adjust_*`` functions define them.
"""

from __future__ import annotations

import numpy as np

from core.normalization import IMAGENET_MEAN, IMAGENET_STD

BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_MEAN = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
_STD = np.asarray(IMAGENET_STD, np.float32)[:, None, None]


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Normalised network inputs (..., 3, H, W) -> RGB pixels in [0, 1] (not clipped)."""
    return images * _STD + _MEAN


def to_inputs(pixels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_pixels`, float32."""
    return ((pixels - _MEAN) / _STD).astype(np.float32)


def grey(image: np.ndarray) -> np.ndarray:
    """Luma (1, H, W) of an RGB image (3, H, W)."""
    return np.tensordot(_GREY, image, axes=1)[None]


def adjust(image: np.ndarray, kind: int, factor: float) -> np.ndarray:
    """``image`` (3, H, W) in [0, 1] with its brightness, contrast or saturation (``kind``) scaled
    by ``factor``: factor * image + (1 - factor) * base, clipped to [0, 1]; float32."""
    if kind == BRIGHTNESS:
        base = np.zeros_like(image)
    elif kind == CONTRAST:
        base = np.full_like(image, grey(image).mean())
    elif kind == SATURATION:
        base = grey(image)
    else:
        raise ValueError(f"adjustment kind {kind}: use 0 (brightness), 1 (contrast) or 2 (saturation)")
    factor = np.float32(factor)
    return np.clip(factor * image + (1 - factor) * base, 0.0, 1.0).astype(np.float32)
