"""Convert the magnetic-tile defect dataset (Huang et al. 2020) to MVTec AD layout.

Source (``--src``): ``MT_Free/Imgs`` (defect-free) and ``MT_Blowhole``, ``MT_Break``,
``MT_Crack``, ``MT_Fray``, ``MT_Uneven`` (each ``Imgs/NAME.jpg`` with its mask ``NAME.png``,
> 0 = defect). Output: one category ``magnetic_tile`` under ``--dst``::

    magnetic_tile/train/good/NAME.jpg           4 of every 5 MT_Free images
    magnetic_tile/test/good/NAME.jpg            the other MT_Free images
    magnetic_tile/test/<type>/NAME.jpg          type = blowhole, break, crack, fray, uneven
    magnetic_tile/ground_truth/<type>/NAME_mask.png   mask binarised to 0/255

Split of MT_Free (deterministic): sort the image file names (plain string order); the image at
sorted position ``i`` (0-based) goes to test/good when ``i % 5 == 4``, else to train/good
(952 images -> 762 train, 190 test). Masks of MT_Free are not needed and not copied. Images
are copied byte for byte. The category folder is built in a temporary sibling folder and
renamed into place; ``.magnetic_tile.json`` (written last) holds the counts, and a later run
that finds it does nothing.

CLI: ``python -m datasets.magnetic_tile --src ../shared/data/magnetic_tile --dst data/mtd``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import InputError, ToolkitError
from datasets.image import read_mask
from datasets.mvtec import build_atomically

CATEGORY = "magnetic_tile"
DEFECT_FOLDERS = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
MARKER = ".magnetic_tile.json"
VERSION = 1


def _jpgs(src: Path, folder: str) -> list[Path]:
    """Sorted ``src/folder/Imgs/*.jpg``; missing or empty -> InputError."""
    imgs = src / folder / "Imgs"
    if not imgs.is_dir():
        raise InputError(
            f"{imgs}: folder not found; --src must be the magnetic-tile dataset folder holding "
            f"MT_Free and {', '.join(DEFECT_FOLDERS)}"
        )
    files = sorted(
        (p for p in imgs.iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file()),
        key=lambda p: p.name,
    )
    if not files:
        raise InputError(f"{imgs}: no .jpg images found; restore the folder from the dataset")
    return files


def _plan(src: Path) -> list[tuple[Path, str, Path | None]]:
    """(image, output folder relative to the category, mask or None) for every source image."""
    if not src.is_dir():
        raise InputError(
            f"{src}: magnetic-tile dataset folder not found; download the dataset "
            "(abin24/Magnetic-tile-defect-datasets.) and pass its folder as --src"
        )
    plan: list[tuple[Path, str, Path | None]] = []
    for i, image in enumerate(_jpgs(src, "MT_Free")):
        plan.append((image, "test/good" if i % 5 == 4 else "train/good", None))
    for folder in DEFECT_FOLDERS:
        kind = folder.removeprefix("MT_").lower()
        for image in _jpgs(src, folder):
            mask = image.with_suffix(".png")
            if not mask.is_file():
                raise InputError(
                    f"{image}: its mask {mask.name} is missing; restore it from the dataset "
                    "or remove the image"
                )
            plan.append((image, f"test/{kind}", mask))
    return plan


def _write_mask(mask_path: Path, image_path: Path, out: Path) -> None:
    """Binarise ``mask_path`` (> 0) to a 0/255 PNG at ``out``, checking its size."""
    mask = read_mask(mask_path)
    with Image.open(image_path) as im:
        width, height = im.size
    if mask.shape != (height, width):
        raise InputError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
            f"{width}x{height}; restore both files from the dataset"
        )
    Image.fromarray(mask.astype(np.uint8) * 255).save(out)


def _is_complete(marker: object) -> bool:
    return isinstance(marker, dict) and isinstance(marker.get("counts"), dict)


def _build(src: Path, tmp: Path) -> dict:
    """Write the converted category into ``tmp``; returns the marker content."""
    counts: dict[str, int] = {}
    for image, folder, mask in _plan(src):
        (tmp / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, tmp / folder / image.name)
        counts[folder] = counts.get(folder, 0) + 1
        if mask is not None:
            gt = "ground_truth/" + folder.removeprefix("test/")
            (tmp / gt).mkdir(parents=True, exist_ok=True)
            _write_mask(mask, image, tmp / gt / f"{image.stem}_mask.png")
            counts[gt] = counts.get(gt, 0) + 1
    return {"version": VERSION, "counts": counts, "split": "sorted MT_Free position % 5 == 4"}


def _convert(src: str | Path, dst: str | Path) -> tuple[dict[str, int], bool]:
    """:func:`convert`, also telling whether this call wrote the output."""
    out = Path(dst) / CATEGORY
    content, built = build_atomically(out, MARKER, lambda tmp: _build(Path(src), tmp), _is_complete)
    return dict(content["counts"]), built


def convert(src: str | Path, dst: str | Path) -> dict[str, int]:
    """Convert the dataset at ``src`` into ``dst/magnetic_tile`` (see the module docstring).

    Returns:
        number of files per output folder relative to the category folder, e.g.
        ``{"train/good": 762, "test/good": 190, "test/crack": 57, "ground_truth/crack": 57}``.
        When the output is already complete, the counts recorded then, without writing.

    Raises:
        InputError: ``src`` or an ``MT_*/Imgs`` folder is missing or empty, a defect image has
            no mask or a mask of another size, a file is unreadable, or ``dst/magnetic_tile``
            exists without being a complete conversion.
    """
    return _convert(src, dst)[0]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="magnetic-tile dataset folder (MT_* inside)")
    parser.add_argument(
        "--dst", default="data/mtd", help="dataset root to write (default %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        counts, built = _convert(args.src, args.dst)
    except ToolkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    order = sorted(counts, key=lambda f: (not f.startswith("train"), f.startswith("ground"), f))
    summary = ", ".join(f"{folder} {counts[folder]}" for folder in order)
    out = Path(args.dst) / CATEGORY
    if built:
        print(f"wrote {out}: {summary}")
    else:
        print(f"{out}: already converted ({summary}); nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
