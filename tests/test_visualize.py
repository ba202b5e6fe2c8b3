"""Tests of deploy.visualize: colours, boundaries, the four-panel layout and PNG output."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deploy.visualize import (
    BOUNDARY_RGB,
    CAPTION_HEIGHT,
    PANEL_GAP,
    colormap_jet,
    four_panel,
    mask_boundary,
    normalize_map,
    save_png,
)


@pytest.mark.parametrize(
    ("value", "rgb"),
    [
        (0.0, (0, 0, 128)),  # dark blue
        (0.125, (0, 0, 255)),  # blue
        (0.375, (0, 255, 255)),  # cyan
        (0.5, (128, 255, 128)),
        (0.625, (255, 255, 0)),  # yellow
        (0.875, (255, 0, 0)),  # red
        (1.0, (128, 0, 0)),  # dark red
        (-3.0, (0, 0, 128)),  # clipped
        (7.0, (128, 0, 0)),  # clipped
    ],
)
def test_colormap_jet_key_colours(value, rgb):
    assert tuple(colormap_jet(np.array(value)).tolist()) == rgb


def test_colormap_jet_shape_and_dtype():
    out = colormap_jet(np.linspace(0, 1, 12).reshape(3, 4))
    assert out.shape == (3, 4, 3)
    assert out.dtype == np.uint8


def test_normalize_map():
    amap = np.array([[0.0, 1.0], [2.0, 5.0]])
    np.testing.assert_allclose(normalize_map(amap, 1.0, 3.0), [[0.0, 0.0], [0.5, 1.0]])
    flat = normalize_map(amap, 2.0, 2.0)
    assert flat.shape == (2, 2)
    assert np.all(flat == 0.0)


def test_mask_boundary_of_inner_square():
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 1:6] = True
    expected = mask.copy()
    expected[2:5, 2:5] = False
    np.testing.assert_array_equal(mask_boundary(mask), expected)


def test_mask_boundary_image_border_counts_as_outside():
    mask = np.zeros((5, 5), dtype=bool)
    mask[0:3, 0:3] = True
    expected = mask.copy()
    expected[1, 1] = False  # the only pixel whose four neighbours are all in the mask
    np.testing.assert_array_equal(mask_boundary(mask), expected)


def _inputs(height=24, width=32):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    amap = np.exp(-((yy - height / 2) ** 2 + (xx - width / 2) ** 2) / 40.0)
    return image, amap


def _panel(sheet, index, height, width):
    left = index * (width + PANEL_GAP)
    return sheet[-height:, left : left + width]


@pytest.mark.parametrize("title", ["", "score=0.73 anomalous=yes"])
def test_four_panel_layout(title):
    image, amap = _inputs()
    sheet = four_panel(image, amap, threshold=0.5, vmin=0.0, vmax=1.0, title=title)
    rows = 24 + CAPTION_HEIGHT * (2 if title else 1)
    assert sheet.shape == (rows, 4 * 32 + 3 * PANEL_GAP, 3)
    assert sheet.dtype == np.uint8
    np.testing.assert_array_equal(_panel(sheet, 0, 24, 32), image)
    below_title = sheet[-(24 + CAPTION_HEIGHT) :]
    for gap in range(3):
        left = 32 + gap * (32 + PANEL_GAP)
        assert np.all(below_title[:, left : left + PANEL_GAP] == 255)


def test_four_panel_mask_panel_is_thresholded_map():
    image, amap = _inputs()
    sheet = four_panel(image, amap, threshold=0.5, vmin=0.0, vmax=1.0)
    expected = np.where(amap > 0.5, 255, 0)
    mask_panel = _panel(sheet, 2, 24, 32)
    for channel in range(3):
        np.testing.assert_array_equal(mask_panel[..., channel], expected)


def test_four_panel_heat_and_boundary_panels():
    image, amap = _inputs()
    sheet = four_panel(image, amap, threshold=0.5, vmin=0.0, vmax=1.0)
    heat = _panel(sheet, 1, 24, 32).astype(int)
    blend = (colormap_jet(amap).astype(int) + image) / 2
    assert np.all(np.abs(heat - blend) <= 0.5)
    boundary = _panel(sheet, 3, 24, 32)
    red = np.all(boundary == BOUNDARY_RGB, axis=-1)
    assert np.all(red[mask_boundary(amap > 0.5)])
    far = np.abs(np.mgrid[:24, :32] - np.array([12, 16])[:, None, None]).max(axis=0) > 8
    np.testing.assert_array_equal(boundary[far], image[far])


def test_four_panel_rejects_mismatched_map():
    image, amap = _inputs()
    with pytest.raises(ValueError, match="shape"):
        four_panel(image, amap[:-1], threshold=0.5, vmin=0.0, vmax=1.0)


def test_save_png_round_trip(tmp_path):
    image, amap = _inputs()
    sheet = four_panel(image, amap, threshold=0.5, vmin=0.0, vmax=1.0, title="t")
    path = tmp_path / "nested" / "folder" / "out.png"
    save_png(path, sheet)
    save_png(path, sheet)  # replacing an existing file works too
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), sheet)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.png"]


def test_save_png_rejects_non_uint8(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "out.png", np.zeros((4, 4, 3)))
    assert list(tmp_path.iterdir()) == []
