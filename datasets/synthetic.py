"""A small generated dataset in MVTec AD layout, for tests and the no-download quick start.

Categories:

- ``tiles``: a texture, vertical stripes plus smooth random noise (grayscale replicated to RGB),
  with a random stripe phase, contrast and brightness per image.
- ``disc``: an object, a disc lit from the top left, centred with a small random offset on a
  plain background.

Defect types of both categories (``n_test_defect`` images each):

- ``scratch``: a straight line, 3 px wide at size 128, at a random angle, painted black or
  white (whichever contrasts more with what lies under it).
- ``spot``: a filled ellipse whose pixels are shifted by 110 grey levels, keeping the texture.

Backgrounds stay within grey levels 40..215, so every painted pixel changes value, and the mask
(``ground_truth/<defect>/NNN_mask.png``, 0/255) is exactly the set of altered pixels. Defect
areas are about 1-4 % of the image (on ``disc`` they are confined to the disc). Images are a
pure function of (seed, category, folder, index, size): same arguments, identical PNG bytes.

CLI: ``python -m datasets.synthetic --dst data/demo [--size 128 --n_train 40 --seed 0 ...]``.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import ConfigError, ToolkitError
from datasets.mvtec import build_atomically

DEMO_ROOT = Path("data/demo")
"""Where the scripts generate and look for the demo data."""
CATEGORIES = ("tiles", "disc")
DEFECTS = ("scratch", "spot")
MARKER = ".synthetic.json"
VERSION = 1  # bump when the images change, so old generated folders are rebuilt
LOW, HIGH = 40, 215  # grey-level range of defect-free images


def seeded_rng(seed: int, *key: str | int) -> np.random.Generator:
    """A generator determined by ``seed`` and ``key`` (strings hashed with crc32)."""
    words = [zlib.crc32(k.encode()) if isinstance(k, str) else k for k in key]
    return np.random.default_rng([seed, *words])


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """float64 (size, size) noise with unit-ish std, smooth over ``size / cells`` pixels."""
    coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.float64)


def _tiles(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Texture background: grey float64 (size, size) and the bool region defects may cover."""
    x = np.arange(size)[None, :]
    phase = rng.uniform(-0.4, 0.4)
    stripes = np.sin(2 * np.pi * x / (size / 8) + phase)
    grey = 128 + rng.uniform(-6, 6) + rng.uniform(32, 40) * stripes
    grey = grey + 12 * smooth_noise(rng, size, 8) + rng.normal(0, 2, (size, size))
    margin = size // 10
    region = np.zeros((size, size), bool)
    region[margin:-margin, margin:-margin] = True
    return grey, region


def _disc(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Object background: grey float64 (size, size) and the bool disc region."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    radius = size * rng.uniform(0.34, 0.38)
    dy, dx = (y - cy) / radius, (x - cx) / radius
    region = dx**2 + dy**2 <= 1
    shade = 165 - 35 * (dx + dy) - 30 * (dx**2 + dy**2)
    grey = np.where(region, shade, 60 + rng.uniform(-5, 5)) + rng.normal(0, 1.5, (size, size))
    return grey, region


def _scratch(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """bool (S, S) line segment at a random angle, centred inside ``region``, clipped to it."""
    size = region.shape[0]
    ys, xs = np.nonzero(region)
    extent = max(np.ptp(ys), np.ptp(xs))
    centre = np.array([ys.mean(), xs.mean()]) + rng.uniform(-0.15, 0.15, 2) * extent
    angle = rng.uniform(0, np.pi)
    half = rng.uniform(0.3, 0.4) * extent * np.array([np.sin(angle), np.cos(angle)])
    a, d = centre - half, 2 * half
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    t = np.clip(((y - a[0]) * d[0] + (x - a[1]) * d[1]) / (d @ d), 0, 1)
    dist = np.hypot(y - a[0] - t * d[0], x - a[1] - t * d[1])
    return (dist <= max(1.0, size / 80)) & region


def _spot(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """bool (S, S) filled ellipse at a random angle, centred inside ``region``, clipped to it."""
    size = region.shape[0]
    ys, xs = np.nonzero(region)
    pick = rng.integers(len(ys))
    cy, cx = ys[pick], xs[pick]
    semi_a, semi_b = rng.uniform(0.08, 0.11) * size, rng.uniform(0.06, 0.08) * size
    angle = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    return ((u / semi_a) ** 2 + (v / semi_b) ** 2 <= 1) & region


def _rgb(grey: np.ndarray) -> np.ndarray:
    """Grey float (S, S) with integral values in 0..255 -> uint8 (S, S, 3)."""
    return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)


def render(
    category: str, folder: str, index: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of ``category``; ``folder`` is "train", "good" or a defect type.

    Returns:
        (clean, image): uint8 (size, size, 3) RGB (grey replicated) before and after painting
        the defect; identical unless ``folder`` is a defect type.
    """
    background = _tiles if category == "tiles" else _disc
    grey, region = background(seeded_rng(seed, category, folder, index), size)
    clean = np.clip(np.rint(grey), LOW, HIGH)
    grey = clean.copy()
    if folder in DEFECTS:
        defect_rng = seeded_rng(seed, category, folder, index, "defect")
        shape = (_scratch if folder == "scratch" else _spot)(defect_rng, region)
        shift = -110 if grey[shape].mean() >= 128 else 110
        if folder == "scratch":
            grey[shape] = 255 if shift > 0 else 0
        else:
            grey[shape] = np.clip(grey[shape] + shift, 0, 255)
    return _rgb(clean), _rgb(grey)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_category(
    root: Path, category: str, counts: dict[str, int], size: int, seed: int
) -> None:
    """Write one category; ``counts`` maps "train", "good" and each defect to an image count."""
    for folder, count in counts.items():
        image_dir = root / category / ("train/good" if folder == "train" else f"test/{folder}")
        for index in range(count):
            clean, image = render(category, folder, index, size, seed)
            _save(image, image_dir / f"{index:03d}.png")
            if folder in DEFECTS:
                altered = np.any(image != clean, axis=2)
                mask_path = root / category / "ground_truth" / folder / f"{index:03d}_mask.png"
                _save(altered.astype(np.uint8) * 255, mask_path)


def _generate(
    dst: str | Path,
    categories: Sequence[str] = CATEGORIES,
    n_train: int = 40,
    n_test_good: int = 8,
    n_test_defect: int = 8,
    size: int = 128,
    seed: int = 0,
) -> tuple[Path, bool]:
    """:func:`generate`, also telling whether this call wrote the dataset."""
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise ConfigError(f"synthetic categories {list(categories)}: choose from {CATEGORIES}")
    if size < 32 or min(n_train, n_test_good, n_test_defect) < 1:
        raise ConfigError("synthetic dataset: need size >= 32 and at least one image per folder")
    params = {
        "version": VERSION,
        "categories": list(dict.fromkeys(categories)),
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "size": size,
        "seed": seed,
    }
    counts = {"train": n_train, "good": n_test_good} | dict.fromkeys(DEFECTS, n_test_defect)

    def build(tmp: Path) -> dict:
        for category in params["categories"]:
            _write_category(tmp, category, counts, size, seed)
        return params

    dst = Path(dst)
    _, built = build_atomically(dst, MARKER, build, lambda found: found == params)
    return dst, built


def generate(
    dst: str | Path,
    categories: Sequence[str] = CATEGORIES,
    n_train: int = 40,
    n_test_good: int = 8,
    n_test_defect: int = 8,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write the synthetic dataset to ``dst`` (a dataset root) unless it is already there.

    Writes ``dst/<category>/train/good/NNN.png`` (``n_train``), ``test/good`` (``n_test_good``),
    ``test/<defect>`` and ``ground_truth/<defect>/NNN_mask.png`` (``n_test_defect`` per defect
    type), then ``dst/.synthetic.json`` with the parameters and the folders written. Nothing is
    done if that file already holds the same parameters. The category folders of an earlier
    synthetic dataset in ``dst`` are replaced; anything else in ``dst`` is left alone.

    Returns:
        ``dst`` as a Path.

    Raises:
        ConfigError: unknown category, size < 32 or a count < 1.
        InputError: ``dst`` is a non-empty folder not written by this generator, or holds a
            folder of a category to write that this generator did not write.
    """
    return _generate(dst, categories, n_train, n_test_good, n_test_defect, size, seed)[0]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dst", required=True, help="dataset root to write, e.g. data/demo")
    parser.add_argument("--categories", default=",".join(CATEGORIES), help="comma list")
    parser.add_argument("--n_train", type=int, default=40)
    parser.add_argument("--n_test_good", type=int, default=8)
    parser.add_argument("--n_test_defect", type=int, default=8, help="per defect type")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    try:
        dst, built = _generate(
            args.dst,
            categories,
            args.n_train,
            args.n_test_good,
            args.n_test_defect,
            args.size,
            args.seed,
        )
    except ToolkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not built:
        print(f"{dst}: synthetic dataset with these parameters already there; nothing to do")
        return 0
    per_category = (
        f"{args.n_train} train/good, {args.n_test_good} test/good, "
        f"{args.n_test_defect} each in test/{{{','.join(DEFECTS)}}} with masks"
    )
    for category in dict.fromkeys(categories):
        print(f"wrote {dst / category}: {per_category} ({args.size}x{args.size} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
