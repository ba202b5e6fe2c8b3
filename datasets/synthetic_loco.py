"""A small generated dataset in MVTec LOCO layout: logical and structural anomalies, with masks.

Category ``tray``: a light tray (width 5/4 of its height) split by a dark divider; a good tray holds
exactly two red discs in the left half and two blue discs in the right half, at random places.

Logical anomalies (``test/logical_anomalies``), cycling with the image index:

- ``missing_object``: one half holds one disc. Every disc looks normal and stands where discs
  stand: only the count is wrong, a rule no patch of the image shows (a global anomaly). Mask: the
  whole half, with an absolute saturation threshold of one disc's area (finding a disc's worth of
  it counts as found), as MVTec LOCO marks missing parts.
- ``extra_object``: one half holds three discs (again only the count is wrong). Mask: the third.
- ``wrong_colour``: a disc has the other half's colour (in odd-numbered images one in each half:
  two masks). Mask: the disc.

Structural anomalies (``test/structural_anomalies``): ``scratch``, a dark line across a disc (two
scratches, two masks, in odd-numbered images).

Masks: ``ground_truth/<type>/<NNN>/000.png, 001.png ...``, one per defect, 0 outside and the defect
type's grey value inside, as listed in ``tray/defects_config.json``. ``validation/good`` holds more
good images. Images are a pure function of (seed, folder, index, size): same arguments, identical
PNG bytes.

CLI: ``python -m datasets.synthetic_loco --dst data/loco [--size 96 --n_train 40 --seed 0 ...]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import ConfigError
from core.script import run_main
from datasets.mvtec import build_atomically
from datasets.mvtec_loco import CONFIG_NAME
from datasets.synthetic import seeded_rng, smooth_noise

CATEGORY = "tray"
LOGICAL = ("missing_object", "extra_object", "wrong_colour")
STRUCTURAL = ("scratch",)
GLOBAL = ("missing_object", "extra_object")
"""Logical defect types that no local patch shows: only the number of normal discs is wrong."""
GREY = {"missing_object": 255, "extra_object": 200, "wrong_colour": 150, "scratch": 100}
MARKER = ".synthetic_loco.json"
VERSION = 1  # bump when the images change, so old generated folders are rebuilt
_COLOURS = (np.array([200.0, 55.0, 50.0]), np.array([50.0, 75.0, 200.0]))  # left red, right blue
_PER_HALF = 2


def _disc_radius(size: int) -> float:
    return 0.09 * size


def _halves(size: int) -> list[np.ndarray]:
    """bool (H, W) interior of the left and right half of the tray (where discs may stand)."""
    height, width = size, size * 5 // 4
    y, x = np.mgrid[0:height, 0:width]
    border, middle = round(0.08 * size), width // 2
    inside = (y >= border) & (y < height - border)
    return [inside & (x >= border) & (x < middle - 2), inside & (x > middle + 2) & (x < width - border)]


def _places(rng: np.random.Generator, half: np.ndarray, count: int, radius: float) -> list[np.ndarray]:
    """``count`` disc centres (y, x) inside ``half``, at least 2.3 radii apart and off its edges."""
    ys, xs = np.nonzero(half)
    low, high = np.array([ys.min(), xs.min()]) + radius, np.array([ys.max(), xs.max()]) - radius
    centres: list[np.ndarray] = []
    while len(centres) < count:
        centre = rng.uniform(low, high)
        if all(np.hypot(*(centre - other)) >= 2.3 * radius for other in centres):
            centres.append(centre)
    return centres


def _distance(shape: tuple[int, int], centre: np.ndarray, radius: float) -> np.ndarray:
    """float64 (H, W): each pixel's distance from ``centre`` in radii (<= 1 on the disc)."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.hypot(y - centre[0], x - centre[1]) / radius


def _scratch(rng: np.random.Generator, shape: tuple[int, int], centre: np.ndarray,
             radius: float) -> np.ndarray:
    """bool (H, W) line through ``centre``, 2.6 radii long, at a random angle."""
    angle = rng.uniform(0, np.pi)
    half = 1.3 * radius * np.array([np.sin(angle), np.cos(angle)])
    a, d = centre - half, 2 * half
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    t = np.clip(((y - a[0]) * d[0] + (x - a[1]) * d[1]) / (d @ d), 0, 1)
    return np.hypot(y - a[0] - t * d[0], x - a[1] - t * d[1]) <= max(1.0, shape[0] / 70)


def render(folder: str, index: int, size: int, seed: int) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """Render one image; ``folder`` is "train", "validation", "good", "logical_anomalies" or
    "structural_anomalies".

    Returns:
        (uint8 (size, 5 * size // 4, 3) RGB image, list of (defect type, bool (H, W) mask)).
    """
    rng = seeded_rng(seed, CATEGORY, folder, index)
    halves = _halves(size)
    shape = halves[0].shape
    radius = _disc_radius(size) * rng.uniform(0.95, 1.05)
    tray = 178 + rng.uniform(-6, 6) + 5 * smooth_noise(rng, max(shape), 6)[: shape[0], : shape[1]]
    rgb = np.repeat(np.where(halves[0] | halves[1], tray, 110.0)[:, :, None], 3, axis=2)
    kind = LOGICAL[index % len(LOGICAL)] if folder == "logical_anomalies" else None
    side = int(rng.integers(2))  # the half a logical defect is in
    counts = [_PER_HALF, _PER_HALF]
    if kind == "missing_object":
        counts[side] -= 1
    elif kind == "extra_object":
        counts[side] += 1
    centres = [_places(rng, half, count, radius) for half, count in zip(halves, counts, strict=True)]
    colours = [[0] * counts[0], [1] * counts[1]]
    if kind == "wrong_colour":
        for swapped in ([0, 1] if index % 2 else [side]):
            colours[swapped][0] = 1 - swapped
    defects = []
    if kind == "missing_object":
        defects.append((kind, halves[side]))
    for half in (0, 1):
        for number, (centre, colour) in enumerate(zip(centres[half], colours[half], strict=True)):
            distance = _distance(shape, centre, radius)
            disc = distance <= 1
            rgb[disc] = _COLOURS[colour] * (1.0 - 0.25 * distance[disc, None] ** 2)  # shaded dome
            if kind == "extra_object" and half == side and number == _PER_HALF:
                defects.append((kind, disc))
            if kind == "wrong_colour" and colour != half:
                defects.append((kind, disc))
    if folder == "structural_anomalies":
        flat = [centre for half in centres for centre in half]
        for pick in rng.choice(len(flat), 2 if index % 2 else 1, replace=False):
            line = _scratch(rng, shape, flat[pick], radius)
            rgb[line] = 30.0
            defects.append(("scratch", line))
    rgb += rng.normal(0, 2.0, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), defects


def defects_config(size: int) -> list[dict]:
    """The defects_config.json entries: a missing disc saturates at one disc's area in pixels."""
    disc = round(np.pi * _disc_radius(size) ** 2)
    return [{"defect_name": name, "pixel_value": GREY[name],
             "saturation_threshold": disc if name == "missing_object" else 1.0,
             "relative_saturation": name != "missing_object"} for name in (*LOGICAL, *STRUCTURAL)]


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write(root: Path, counts: dict[str, int], size: int, seed: int) -> None:
    base = root / CATEGORY
    folders = {"train": "train/good", "validation": "validation/good", "good": "test/good",
               "logical_anomalies": "test/logical_anomalies",
               "structural_anomalies": "test/structural_anomalies"}
    for folder, count in counts.items():
        for index in range(count):
            image, defects = render(folder, index, size, seed)
            _save(image, base / folders[folder] / f"{index:03d}.png")
            for number, (name, mask) in enumerate(defects):
                path = base / "ground_truth" / folder / f"{index:03d}" / f"{number:03d}.png"
                _save(mask.astype(np.uint8) * GREY[name], path)
    (base / CONFIG_NAME).write_text(json.dumps(defects_config(size), indent=2) + "\n")


def generate(dst: str | Path, n_train: int = 40, n_validation: int = 10, n_test_good: int = 8,
             n_logical: int = 6, n_structural: int = 6, size: int = 96, seed: int = 0) -> Path:
    """Write the synthetic LOCO dataset (category ``tray``) to ``dst`` unless it is already there.

    Writes ``dst/tray/train/good`` (``n_train`` images), ``validation/good`` (``n_validation``),
    ``test/good`` (``n_test_good``), ``test/logical_anomalies`` (``n_logical``, the types
    cycling: image i is ``LOGICAL[i % 3]``), ``test/structural_anomalies`` (``n_structural``), the
    masks and ``defects_config.json``; images are ``size`` high and ``5 * size // 4`` wide. Then
    ``dst/.synthetic_loco.json`` with the parameters; nothing is done if it holds the same ones.
    Rebuilding replaces only what an earlier build wrote (see datasets.mvtec.build_atomically).

    Returns:
        ``dst`` as a Path.

    Raises:
        ConfigError: size < 48 or a count < 1.
        InputError: ``dst`` is a non-empty folder not written by this generator.
    """
    return _generate(dst, n_train, n_validation, n_test_good, n_logical, n_structural, size, seed)[0]


def _generate(dst: str | Path, n_train: int, n_validation: int, n_test_good: int, n_logical: int,
              n_structural: int, size: int, seed: int) -> tuple[Path, bool]:
    """:func:`generate`, also telling whether this call wrote the dataset."""
    counts = {"train": n_train, "validation": n_validation, "good": n_test_good,
              "logical_anomalies": n_logical, "structural_anomalies": n_structural}
    if size < 48 or min(counts.values()) < 1:
        raise ConfigError("synthetic LOCO dataset: need --size >= 48 and at least one image per folder")
    params = {"version": VERSION, "size": size, "seed": seed, **{f"n_{k}": v for k, v in counts.items()}}

    def build(tmp: Path) -> dict:
        _write(tmp, counts, size, seed)
        return params

    dst = Path(dst)
    _, built = build_atomically(dst, MARKER, build, lambda found: found == params)
    return dst, built


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (a ToolkitError is left to core.script.run_main)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dst", required=True, help="dataset root to write, e.g. data/loco")
    parser.add_argument("--n_train", type=int, default=40)
    parser.add_argument("--n_validation", type=int, default=10)
    parser.add_argument("--n_test_good", type=int, default=8)
    parser.add_argument("--n_logical", type=int, default=6)
    parser.add_argument("--n_structural", type=int, default=6)
    parser.add_argument("--size", type=int, default=96, help="image height; the width is 5/4 of it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dst, built = _generate(args.dst, args.n_train, args.n_validation, args.n_test_good,
                           args.n_logical, args.n_structural, args.size, args.seed)
    if not built:
        print(f"{dst}: synthetic LOCO dataset with these parameters already there; nothing to do")
        return 0
    print(f"wrote {dst / CATEGORY}: {args.n_train} train/good, {args.n_validation} validation/good, "
          f"{args.n_test_good} test/good, {args.n_logical} logical and {args.n_structural} structural "
          f"anomalies with masks ({args.size * 5 // 4}x{args.size} px)")
    return 0


if __name__ == "__main__":
    run_main(main)
