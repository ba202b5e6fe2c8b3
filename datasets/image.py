"""Reading images and masks from disk and turning them into network inputs.

Every reader returns plain numpy arrays: RGB images as uint8 ``(H, W, 3)``, masks as bool
``(H, W)``. :class:`Preprocess` maps them to the model's input: a float32 ``(3, S, S)`` tensor
normalised with the ImageNet statistics, and a uint8 ``(S, S)`` 0/1 mask aligned with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import ConfigError, InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def _reason(exc: BaseException) -> str:
    """One-line, path-free description of why a file could not be read."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file PIL can decode"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path``; any failure becomes an :class:`InputError`."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # every decoder failure is the user's file to fix
        raise InputError(
            f"{path}: cannot read {what} ({_reason(exc)}); replace or remove the file"
        ) from exc
    if im.width == 0 or im.height == 0:
        raise InputError(f"{path}: {what} is empty (0 pixels); replace or remove the file")
    return im


def _to_uint8(values: np.ndarray, integer: bool) -> np.ndarray:
    """Map one 32-bit integer (``integer``) or float channel (H, W) to uint8 (H, W)."""
    values = np.nan_to_num(values.astype(np.float64))
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 255:
        return np.rint(values).astype(np.uint8)
    if integer and low >= 0 and high <= 65535:
        return np.rint(values / 257.0).astype(np.uint8)
    if high == low:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB.

    Grayscale, palette, alpha, CMYK and 1-bit images are converted to RGB (alpha is dropped).
    16-bit images are scaled to 8 bit by ``value / 257`` rounded; 32-bit integer and float
    images are cast (rounded) when their values lie in 0..255, integer images in 0..65535 are
    scaled like 16 bit, and anything else is min-max stretched to 0..255.

    Returns:
        uint8 array of shape (H, W, 3).

    Raises:
        InputError: the file is missing, not an image, truncated, corrupt or empty.
    """
    path = Path(path)
    im = _open(path, "image")
    if im.mode in _SIXTEEN_BIT_MODES:
        gray = np.rint(np.asarray(im).astype(np.float64) / 257.0).astype(np.uint8)
    elif im.mode in ("I", "F"):
        gray = _to_uint8(np.asarray(im), integer=im.mode == "I")
    else:
        try:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except (ValueError, OSError) as exc:
            raise InputError(
                f"{path}: cannot read image (unsupported mode {im.mode}); "
                "convert it to 8-bit RGB or grayscale"
            ) from exc
    return np.repeat(gray[:, :, None], 3, axis=2)


def read_mask_values(path: str | Path) -> np.ndarray:
    """Read a mask's values: the largest colour channel of each pixel (alpha ignored; for palette
    images the stored palette index). MVTec LOCO's masks store a defect type's grey value.

    Returns:
        non-negative integer array (H, W) (uint8, or wider for 16/32-bit masks).

    Raises:
        InputError: naming the mask file when it cannot be read.
    """
    im = _open(Path(path), "mask")
    values = np.asarray(im)
    if im.mode in _ALPHA_MODES:
        values = values[:, :, :-1]
    if values.ndim == 3:
        values = values.max(axis=2)
    return values.astype(np.uint8) if values.dtype == bool else values


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask of any mode: True where any colour channel is > 0.

    A folder (MVTec LOCO: one PNG per defect of an image) gives the union of the ``*.png``
    masks in it, which must share one size.

    Returns:
        bool array of shape (H, W).

    Raises:
        InputError: naming the mask file when it cannot be read, a folder without PNG masks, or
            masks of different sizes in one folder.
    """
    path = Path(path)
    if not path.is_dir():
        return read_mask_values(path) > 0
    files = sorted(p for p in path.glob("*.png") if not p.name.startswith("."))
    if not files:
        raise InputError(f"{path}: mask folder holds no .png masks; put the image's defect masks "
                         "there or remove the folder")
    union = read_mask(files[0])
    for file in files[1:]:
        mask = read_mask(file)
        if mask.shape != union.shape:
            raise InputError(f"{file}: mask is {mask.shape[1]}x{mask.shape[0]} but {files[0].name} "
                             f"beside it is {union.shape[1]}x{union.shape[0]}; give every mask of "
                             "an image the image's size")
        union |= mask
    return union


_NORMALISED = (
    (np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
     - np.asarray(IMAGENET_MEAN, np.float32)[:, None])
    / np.asarray(IMAGENET_STD, np.float32)[:, None]
)  # (3, 256) float32: the normalised value of every 8-bit level per channel


@dataclass
class Preprocess:
    """Resize to ``resize`` x ``resize`` (aspect not kept), centre-crop ``crop_size``, normalise.

    ``crop_size=None`` means no crop (``crop_size = resize``). The crop offset is
    ``(resize - crop_size) // 2`` on both axes.
    """

    resize: int = 256
    crop_size: int | None = None

    def __post_init__(self) -> None:
        if self.resize < 1 or self.size < 1:
            raise ConfigError(
                f"resize={self.resize}, crop_size={self.crop_size}: sizes must be positive"
            )
        if self.size > self.resize:
            raise ConfigError(
                f"crop_size={self.size} is larger than resize={self.resize}; "
                "pass a crop size <= the resize size"
            )

    @property
    def size(self) -> int:
        """Side length S of the output: ``crop_size``, or ``resize`` when that is None."""
        return self.resize if self.crop_size is None else self.crop_size

    def _crop(self, array: np.ndarray) -> np.ndarray:
        start = (self.resize - self.size) // 2
        return array[start : start + self.size, start : start + self.size]

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Map uint8 (H, W, 3) RGB to the normalised float32 (3, S, S) network input."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
        size = (self.resize, self.resize)
        crop = self._crop(np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR)))
        out = np.empty((3, self.size, self.size), dtype=np.float32)
        for channel in range(3):  # a 256-entry table per channel: (v / 255 - mean) / std
            np.take(_NORMALISED[channel], crop[:, :, channel], out=out[channel])
        return out

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """Map a bool (H, W) mask to uint8 (S, S) 0/1, nearest-neighbour, aligned with images."""
        if mask.ndim != 2:
            raise ValueError(f"expected a (H, W) mask, got shape {mask.shape}")
        small = Image.fromarray((mask > 0).astype(np.uint8))
        resized = np.asarray(small.resize((self.resize, self.resize), Image.Resampling.NEAREST))
        return np.ascontiguousarray(self._crop(resized))


def denormalize(chw: np.ndarray) -> np.ndarray:
    """Invert the normalisation of :class:`Preprocess` for display.

    Args:
        chw: float32 (3, H, W) normalised image.

    Returns:
        uint8 (H, W, 3) RGB, clipped to 0..255.
    """
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    unit = np.asarray(chw, np.float32).transpose(1, 2, 0) * std + mean
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
