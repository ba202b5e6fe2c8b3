"""Assertions shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from models import Runtime, load_model

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS_ENV = "ORTHOAD_SCREENSHOTS"


def screenshot_dir(tmp_path: Path) -> Path:
    """Where a test saves the README's pictures: docs/screenshots when ORTHOAD_SCREENSHOTS=1 asks to
    refresh them, else ``tmp_path`` (a plain test run leaves the source tree untouched)."""
    if os.environ.get(SCREENSHOTS_ENV) == "1":
        folder = ROOT / "docs" / "screenshots"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path


def rel_close(actual, expected, rtol):
    """|actual - expected| <= rtol * max|expected| everywhere (relative to the array's scale)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} * {scale:.3g}"


def assert_served_matches_dynamic(fitted, images, tmp_path):
    """``fitted`` saved and loaded on the Paddle Inference runtime scores ``images`` as the
    dynamic graph does (maps and scores within 1e-4 relative)."""
    path = str(tmp_path / "model.npz")
    fitted.save(path)
    served = load_model(path, runtime=Runtime(engine="inference"))
    maps, scores = fitted.score(images)
    maps_inf, scores_inf = served.score(images)
    rel_close(maps_inf, maps, 1e-4)
    np.testing.assert_allclose(scores_inf, scores, rtol=1e-4)
