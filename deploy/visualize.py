"""Four-panel pictures of an anomaly map (image, heat map, mask, boundary) and atomic PNG output."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from core.io import temp_path

PANEL_GAP = 4
"""White columns between two panels, in pixels."""
CAPTION_HEIGHT = 16
"""Height of a caption row (and of the title line), in pixels."""
CAPTIONS = ("image", "heat map", "mask", "boundary")
GROUND_TRUTH_CAPTION = "ground truth"
BOUNDARY_RGB = (255, 0, 0)

_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def colormap_jet(values: np.ndarray) -> np.ndarray:
    """Classic jet colours: dark blue -> blue -> cyan -> yellow -> red -> dark red.

    values: float, any shape (...), clipped to [0, 1]; NaN is drawn as 0. Returns uint8 (..., 3).
    Each channel is the tent ``clip(1.5 - |4 v - c|, 0, 1)`` centred at c = 3 (red), 2 (green)
    and 1 (blue).
    """
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])
    rgb = np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)
    return np.floor(rgb * 255.0 + 0.5).astype(np.uint8)


def normalize_map(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map ``amap`` (H, W) linearly so vmin -> 0 and vmax -> 1, clipped; float64 (H, W).

    When ``vmax <= vmin`` there is no scale to apply and the result is all zeros.
    """
    amap = np.asarray(amap, dtype=np.float64)
    if vmax <= vmin:
        return np.zeros(amap.shape)
    return np.clip((amap - vmin) / (vmax - vmin), 0.0, 1.0)


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` (bool (H, W)) with a 4-neighbour outside it; bool (H, W).

    Pixels beyond the image border count as outside the mask.
    """
    mask = np.asarray(mask, dtype=bool)
    inner = ndimage.binary_erosion(mask, structure=_FOUR_CONNECTED, border_value=0)
    return mask & ~inner


def heat_overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Jet colours of ``normalize_map(amap, vmin, vmax)`` blended 50/50 over ``image``.

    image: uint8 (H, W, 3); amap: float (H, W). Returns uint8 (H, W, 3), rounded half up.
    """
    heat = colormap_jet(normalize_map(amap, vmin, vmax)).astype(np.uint16) + image
    return ((heat + 1) // 2).astype(np.uint8)


def outline_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` uint8 (H, W, 3) with the boundary of ``mask`` bool (H, W), dilated by one pixel,
    drawn in BOUNDARY_RGB; uint8 (H, W, 3)."""
    outline = ndimage.binary_dilation(mask_boundary(mask), structure=_EIGHT_CONNECTED)
    drawn = image.copy()
    drawn[outline] = BOUNDARY_RGB
    return drawn


def _white_on_black(mask: np.ndarray) -> np.ndarray:
    """bool (H, W) -> uint8 (H, W, 3): 255 where ``mask``, 0 elsewhere."""
    return np.repeat(np.where(mask, 255, 0).astype(np.uint8)[..., None], 3, axis=2)


def _panel(rgb: np.ndarray, caption: str) -> Image.Image:
    """One panel: ``rgb`` (H, W, 3) under a caption row, the caption clipped to the panel width."""
    height, width = rgb.shape[:2]
    canvas = Image.new("RGB", (width, CAPTION_HEIGHT + height), "white")
    canvas.paste(Image.fromarray(rgb), (0, CAPTION_HEIGHT))
    ImageDraw.Draw(canvas).text((2, 2), caption, fill="black", font=ImageFont.load_default())
    return canvas


def four_panel(
    image: np.ndarray,
    amap: np.ndarray,
    threshold: float,
    vmin: float,
    vmax: float,
    title: str = "",
    ground_truth: np.ndarray | None = None,
) -> np.ndarray:
    """Side-by-side image, heat map, predicted mask and mask boundary; uint8 (h, w, 3).

    image: uint8 (H, W, 3); amap: float (H, W) anomaly map. The heat map is the jet colour of
    ``normalize_map(amap, vmin, vmax)`` blended 50/50 over the image; the mask is
    ``amap > threshold`` in white on black; the last panel draws the mask boundary, dilated by one
    pixel, in red over the image. Each panel has a caption row above it and ``title``, if given,
    gets a line of its own on top, so h = H + CAPTION_HEIGHT (+ CAPTION_HEIGHT with a title) and
    w = 4 W + 3 PANEL_GAP with white gaps. ``ground_truth`` (bool or 0/1 (H, W)), if given, adds a
    "ground truth" panel (white on black) after the image: w = 5 W + 4 PANEL_GAP.
    """
    image = np.asarray(image)
    amap = np.asarray(amap, dtype=np.float64)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if amap.shape != image.shape[:2]:
        raise ValueError(f"amap has shape {amap.shape} but the image is {image.shape[:2]}")
    heat = heat_overlay(image, amap, vmin, vmax)
    predicted = amap > threshold
    mask_rgb = _white_on_black(predicted)
    boundary = outline_overlay(image, predicted)

    panels = [image, heat, mask_rgb, boundary]
    captions = list(CAPTIONS)
    if ground_truth is not None:
        if np.shape(ground_truth) != amap.shape:
            raise ValueError(f"ground_truth has shape {np.shape(ground_truth)} but amap is {amap.shape}")
        panels.insert(1, _white_on_black(np.asarray(ground_truth) > 0))
        captions.insert(1, GROUND_TRUTH_CAPTION)

    height, width = amap.shape
    top = CAPTION_HEIGHT if title else 0
    count = len(panels)
    sheet = Image.new("RGB", (count * width + (count - 1) * PANEL_GAP, top + CAPTION_HEIGHT + height),
                      "white")
    for index, (rgb, caption) in enumerate(zip(panels, captions, strict=True)):
        sheet.paste(_panel(rgb, caption), (index * (width + PANEL_GAP), top))
    if title:
        ImageDraw.Draw(sheet).text((2, 2), title, fill="black", font=ImageFont.load_default())
    return np.asarray(sheet)


def save_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write ``rgb`` (uint8 (H, W, 3) or (H, W)) to ``path`` as PNG, atomically.

    The picture goes to a temporary name in the same folder first (``core.io.temp_path``) and
    then replaces ``path``, so readers never see a half-written file; missing parent folders are
    created.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim not in (2, 3):
        raise ValueError(f"rgb must be uint8 (H, W, 3) or (H, W), got {rgb.dtype} {rgb.shape}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = temp_path(path)
    try:
        Image.fromarray(rgb).save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
