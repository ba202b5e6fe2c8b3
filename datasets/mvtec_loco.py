"""MVTec LOCO AD (Bergmann et al., IJCV 2022): logical and structural anomalies.

Layout of one category under a dataset root::

    <root>/<category>/train/good/*.png               defect-free training images
    <root>/<category>/validation/good/*.png          defect-free validation images
    <root>/<category>/test/good/*.png                defect-free test images
    <root>/<category>/test/logical_anomalies/*.png   images breaking a rule (count, pairing, order)
    <root>/<category>/test/structural_anomalies/*.png   images with a damaged part
    <root>/<category>/ground_truth/<type>/<image stem>/000.png, 001.png ...   one mask per defect
    <root>/<category>/defects_config.json            the defect types (see :func:`read_defects_config`)

A mask's non-zero pixels carry the grey value of its defect type. :func:`datasets.list_samples`
lists the test split of such a category like any other (``Sample.mask_path`` is the image's mask
folder, read as the union of its masks); this module adds what the sPRO metric needs: the defect
types and every defect's own region with its saturation area.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import InputError
from datasets.image import Preprocess, read_mask_values

ANOMALY_TYPES = ("logical_anomalies", "structural_anomalies")
CONFIG_NAME = "defects_config.json"
_FIELDS = {"defect_name": str, "pixel_value": int, "saturation_threshold": float,
           "relative_saturation": bool}
_CONFIG_FIX = ("each entry needs defect_name (text), pixel_value (1..255), saturation_threshold (> 0; "
               "<= 1 when relative) and relative_saturation (true/false), as in MVTec LOCO's file")


def is_loco(category_dir: str | Path) -> bool:
    """True when ``category_dir`` is in MVTec LOCO layout: it holds ``defects_config.json`` or a
    ``test/logical_anomalies`` or ``test/structural_anomalies`` folder."""
    category_dir = Path(category_dir)
    return (category_dir / CONFIG_NAME).is_file() or any(
        (category_dir / "test" / kind).is_dir() for kind in ANOMALY_TYPES)


@dataclass(frozen=True)
class DefectType:
    """One entry of defects_config.json: a defect type's name, its grey value in the masks, and its
    saturation threshold, a fraction of the defect's area (``relative``) or a pixel count."""

    name: str
    pixel_value: int
    saturation_threshold: float
    relative: bool

    def saturation_fraction(self, area: int) -> float:
        """The share of a defect of ``area`` pixels (at the mask's resolution) that saturates it:
        the relative threshold, or min(threshold, area) / area for an absolute one."""
        if self.relative:
            return self.saturation_threshold
        return min(self.saturation_threshold, area) / area


def _entry(path: Path, index: int, entry: object) -> DefectType:
    """One checked entry of defects_config.json (its position ``index`` names it in errors)."""
    if not isinstance(entry, dict) or not set(_FIELDS) <= set(entry):
        raise InputError(f"{path}: entry {index} is not an object with the four fields; {_CONFIG_FIX}")
    values = []
    for field, kind in _FIELDS.items():
        value = entry[field]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            raise InputError(f"{path}: entry {index} has {field}={value!r}; {_CONFIG_FIX}")
        values.append(value)
    defect = DefectType(values[0], values[1], float(values[2]), values[3])
    if not 1 <= defect.pixel_value <= 255 or defect.saturation_threshold <= 0 or (
            defect.relative and defect.saturation_threshold > 1):
        raise InputError(f"{path}: entry {index} ({defect.name}) has pixel_value {defect.pixel_value}, "
                         f"saturation_threshold {defect.saturation_threshold}; {_CONFIG_FIX}")
    return defect


@dataclass(frozen=True)
class DefectsConfig:
    """A category's defects_config.json: its path and the defect types by grey value."""

    path: Path
    types: dict[int, DefectType]


def read_defects_config(category_dir: str | Path) -> DefectsConfig:
    """Read ``category_dir/defects_config.json``: a JSON list of objects such as
    ``{"defect_name": "missing_object", "pixel_value": 255, "saturation_threshold": 40,
    "relative_saturation": false}``.

    Returns:
        the file's path and its defect types by grey value.

    Raises:
        InputError: naming the file: missing, not JSON, not a list of such entries, a field of the
            wrong type or range, or one grey value given twice.
    """
    path = Path(category_dir) / CONFIG_NAME
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found; an MVTec LOCO category needs its defects_config.json "
                         "(copy it from the dataset)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({type(exc).__name__}); restore the file "
                         "from the dataset") from exc
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: must be a non-empty JSON list of defect types; {_CONFIG_FIX}")
    defects: dict[int, DefectType] = {}
    for index, entry in enumerate(entries):
        defect = _entry(path, index, entry)
        if defect.pixel_value in defects:
            raise InputError(f"{path}: pixel_value {defect.pixel_value} is given to "
                             f"{defects[defect.pixel_value].name} and {defect.name}; give each "
                             "defect type its own grey value")
        defects[defect.pixel_value] = defect
    return DefectsConfig(path, defects)


def defect_masks(folder: Path) -> list[Path]:
    """The mask files of one image (``*.png`` in its ground-truth folder), sorted by name."""
    return sorted(p for p in Path(folder).glob("*.png") if not p.name.startswith("."))


def read_defect(path: Path, config: DefectsConfig) -> tuple[np.ndarray, DefectType]:
    """Read one defect's mask and its type.

    Returns:
        (bool (H, W) region, its :class:`DefectType`).

    Raises:
        InputError: naming the mask: unreadable, empty, or its non-zero grey values are not one
            grey value of ``config``.
    """
    values = read_mask_values(path)
    found = np.unique(values[values > 0])
    if found.size == 0:
        raise InputError(f"{path}: mask is empty (no defect pixel); remove it or draw the defect")
    if found.size > 1 or int(found[0]) not in config.types:
        listed = ", ".join(str(v) for v in sorted(config.types))
        raise InputError(f"{path}: grey value(s) {', '.join(str(int(v)) for v in found)} not in "
                         f"{config.path} (it has {listed}); fix the mask or add the defect type there")
    return values > 0, config.types[int(found[0])]


def defect_regions(folder: Path, config: DefectsConfig,
                   preprocess: Preprocess) -> list[tuple[np.ndarray, float]]:
    """Every defect of one image, as the model sees it, with its saturation area.

    Each mask of ``folder`` is resized and cropped like the image (nearest neighbour). Its
    saturation area is its type's share (:meth:`DefectType.saturation_fraction`, taken at the
    mask's own resolution) of the defect's pixels after preprocessing, so an absolute threshold
    keeps its share of the defect at any input size. A defect with no pixel left after resizing
    and cropping is dropped.

    Returns:
        list of (uint8 (S, S) 0/1 region, saturation area > 0 in pixels of that region).
    """
    regions = []
    for path in defect_masks(folder):
        region, defect = read_defect(path, config)
        small = preprocess.mask(region)
        area = int(np.count_nonzero(small))
        if area:
            regions.append((small, defect.saturation_fraction(int(np.count_nonzero(region))) * area))
    return regions


def image_defects(folder: Path, config: DefectsConfig) -> list[str]:
    """The defect type names of one image's masks (one per mask file, in file order)."""
    return [read_defect(path, config)[1].name for path in defect_masks(folder)]
