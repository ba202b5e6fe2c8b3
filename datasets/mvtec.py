"""Datasets in MVTec AD layout: listing, loading and atomically writing them.

Layout of one category under a dataset root::

    <root>/<category>/train/good/*.png              defect-free training images
    <root>/<category>/test/<defect or good>/*.png   test images, one folder per defect type
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   masks of the defective images
    <root>/<category>/ground_truth/<defect>/<stem>/*.png      or a folder of masks, one per defect
                                                              (MVTec LOCO; see datasets.mvtec_loco)

Hidden files and folders (name starting with ``.``, e.g. macOS ``._x.png``) are ignored.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError
from core.io import atomic_write_text, remove_stale_temporaries, staging_dir
from datasets.image import Preprocess, read_image, read_mask

TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
OBJECTS = (
    "bottle",
    "cable",
    "capsule",
    "hazelnut",
    "metal_nut",
    "pill",
    "screw",
    "toothbrush",
    "transistor",
    "zipper",
)
MVTEC_CATEGORIES = TEXTURES + OBJECTS
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _train_dir(root: Path, category: str) -> Path:
    return root / category / "train" / "good"


def _found_categories(root: Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that have a train/good folder."""
    return sorted(
        d.name
        for d in root.iterdir()
        if not d.name.startswith(".") and _train_dir(root, d.name).is_dir()
    )


def check_category_name(name: str) -> str:
    """``name`` if it is one plain path component; else an InputError (it would reach outside the
    dataset root and the checkpoint folder)."""
    if name in (".", "..") or any(char in name for char in "/\\\0"):
        raise InputError(f"--category {name}: a category is one folder name under the dataset root "
                         "(no /, \\ or ..); pass its name")
    return name


def resolve_categories(root: str | Path, spec: str) -> list[str]:
    """Expand a category spec into category names that exist under ``root``.

    Args:
        root: dataset root folder.
        spec: a category name, a comma list of them, ``all``, ``textures`` or ``objects``
            (the keywords may be mixed with names in a comma list).

    Returns:
        category names, duplicates removed, first-seen order kept. ``all`` gives the 15 MVTec
        categories in their canonical order when all exist, else every category found, sorted.

    Raises:
        InputError: the root is missing, nothing is found, or a named category is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(
            f"{root}: dataset root not found; download the dataset there or fix the path"
        )
    found = _found_categories(root)
    names: list[str] = []
    for token in (t.strip() for t in spec.split(",")):
        if token == "all":
            if not found:
                raise InputError(
                    f"{root}: no category folders with train/good found; "
                    "point the dataset root at the folder holding the category folders"
                )
            names += list(MVTEC_CATEGORIES) if set(MVTEC_CATEGORIES) <= set(found) else found
        elif token == "textures":
            names += TEXTURES
        elif token == "objects":
            names += OBJECTS
        elif token:
            names.append(check_category_name(token))
    if not names:
        raise InputError(f"category spec {spec!r} is empty; pass a name, a comma list or all")
    for name in names:
        if not _train_dir(root, name).is_dir():
            listed = ", ".join(found) if found else "none"
            raise InputError(
                f"{_train_dir(root, name)}: category folder not found (categories found: "
                f"{listed}); fix the category name or the dataset root"
            )
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Sample:
    """One image of a split: ``label`` 0 = good, 1 = defective; ``defect`` is its folder name."""

    path: Path
    label: int
    defect: str
    mask_path: Path | None


def image_files(folder: Path, hint: str) -> list[Path]:
    """Image files directly in ``folder``, sorted by file name; none -> InputError with ``hint``."""
    files = []
    if folder.is_dir():
        files = sorted(
            (
                p
                for p in folder.iterdir()
                if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            ),
            key=lambda p: p.name,
        )
    if not files:
        raise InputError(f"{folder}: no images found; {hint}")
    return files


def list_samples(root: str | Path, category: str, split: str) -> list[Sample]:
    """List the samples of ``split`` ("train" or "test") of ``root/category``.

    Train: train/good images. Test: every sub-folder of test/ sorted by name, images sorted by
    file name; a defective image's mask is ``ground_truth/<defect>/<stem>_mask.png`` if that file
    exists, else the folder ``ground_truth/<defect>/<stem>/`` (MVTec LOCO: one PNG per defect,
    read as their union) if that exists, else None.

    Raises:
        InputError: naming the folder that is missing or holds no images.
        ValueError: ``split`` is neither "train" nor "test".
    """
    base = Path(root) / category
    if split == "train":
        hint = "put the defect-free training images there"
        return [Sample(p, 0, "good", None) for p in image_files(base / "train" / "good", hint)]
    if split != "test":
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    test_dir = base / "test"
    folders = []
    if test_dir.is_dir():
        folders = sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise InputError(
            f"{test_dir}: no test folders found; put test images in test/good and "
            "test/<defect type>/"
        )
    samples = []
    for folder in folders:
        defect = folder.name
        for path in image_files(folder, "put test images there or remove the folder"):
            if defect == "good":
                samples.append(Sample(path, 0, defect, None))
                continue
            truth = base / "ground_truth" / defect
            mask = truth / f"{path.stem}_mask.png"
            if not mask.is_file():
                mask = truth / path.stem
            samples.append(Sample(path, 1, defect, mask if mask.exists() else None))
    return samples


def has_masks(samples: Sequence[Sample]) -> bool:
    """True when there is a defective sample and every defective sample has a mask."""
    defective = [s for s in samples if s.label == 1]
    return bool(defective) and all(s.mask_path is not None for s in defective)


class AnomalyDataset:
    """Indexable samples -> preprocessed arrays (no framework dependency, thread-safe)."""

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Load sample ``i``.

        Returns:
            dict with ``image`` float32 (3, S, S); ``mask`` uint8 (S, S) 0/1 (zeros for good
            samples, None for a defective sample without mask); ``label`` int; ``path`` str.

        Raises:
            InputError: unreadable image or mask, or a mask whose size differs from the image.
        """
        sample = self.samples[i]
        rgb = read_image(sample.path)
        mask = None
        if sample.mask_path is not None:
            raw = read_mask(sample.mask_path)
            if raw.shape != rgb.shape[:2]:
                (mh, mw), (h, w) = raw.shape, rgb.shape[:2]
                raise InputError(
                    f"{sample.mask_path}: mask is {mw}x{mh} but image {sample.path} is {w}x{h}; "
                    "replace the mask with one of the image's size"
                )
            mask = self.preprocess.mask(raw)
        elif sample.label == 0:
            mask = np.zeros((self.preprocess.size, self.preprocess.size), np.uint8)
        return {
            "image": self.preprocess(rgb),
            "mask": mask,
            "label": sample.label,
            "path": str(sample.path),
        }


WRITTEN = "written"  # marker key: the top-level entries of the dataset folder this tool wrote


def _read_marker(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _content(marker: Any) -> Any:
    """A marker's content as its builder returned it (without the list of written entries)."""
    if isinstance(marker, dict):
        return {key: value for key, value in marker.items() if key != WRITTEN}
    return marker


def _owned(marker: Any, built: list[str]) -> set[str]:
    """Top-level entry names an earlier build recorded in its marker (plain names only).

    A marker of a version that kept no record owned the whole folder; of it only the entries the
    new build replaces (``built``) are taken, so nothing else is deleted.
    """
    written = marker.get(WRITTEN) if isinstance(marker, dict) else None
    if not isinstance(written, list):
        return set(built)
    return {name for name in written
            if isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name}


def build_atomically(
    dst: Path, marker: str, build: Callable[[Path], dict], accept: Callable[[Any], bool]
) -> tuple[dict, bool]:
    """Build a dataset folder in a temporary sibling and move it into ``dst`` when complete.

    If ``dst/marker`` exists and ``accept`` returns True for its JSON content, nothing is built.
    Otherwise ``build(tmp)`` fills ``tmp`` and returns the marker content, which is written last
    with the list of the top-level entries built (key ``written``). A missing or empty ``dst``
    is replaced by ``tmp`` in one rename. In a ``dst`` holding an earlier build (its marker not
    accepted), only the entries that build wrote are replaced; anything else there (a user's own
    category folder) is kept. An interrupted run leaves no half-written entry, and a marker no run
    accepts, so the next run builds again. Staging folders of killed runs are removed.

    Returns:
        (marker content, True if this call built the folder).

    Raises:
        InputError: ``dst`` exists, is not empty and holds no marker (not ours to replace), or
            an entry the build would write exists in ``dst`` without being one of ours.
    """
    current = _read_marker(dst / marker)
    if current is not None and accept(_content(current)):
        return _content(current), False
    if dst.exists() and current is None and (not dst.is_dir() or any(dst.iterdir())):
        raise InputError(
            f"{dst}: exists but is not a dataset written by this tool; remove it or choose "
            "another destination"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dst.parent)
    tmp = staging_dir(dst, "partial")
    try:
        content = build(tmp)
        entries = sorted(entry.name for entry in tmp.iterdir())
        (tmp / marker).write_text(
            json.dumps({**content, WRITTEN: entries}, indent=2, sort_keys=True) + "\n"
        )
        _swap_into_place(tmp, dst, marker, accept, entries)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return content, True


def _swap_into_place(
    tmp: Path, dst: Path, marker: str, accept: Callable[[Any], bool], entries: list[str]
) -> None:
    """Move the ``entries`` built in ``tmp`` and then its marker into ``dst``.

    The entries of an earlier build are moved aside into a sibling (deleted at the end); an
    entry of ``dst`` not listed in the earlier marker is never touched.
    """
    current = _read_marker(dst / marker)
    if current is not None and accept(_content(current)):
        return  # a concurrent run published the same dataset meanwhile; keep it
    if current is None:  # dst is missing or empty (checked before the build)
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
        return
    owned = _owned(current, entries)
    foreign = [name for name in entries if name not in owned and os.path.lexists(dst / name)]
    if foreign:
        raise InputError(
            f"{dst / foreign[0]}: exists but was not written by this tool, and the new build "
            "would replace it; move it away or choose another destination"
        )
    # From here until the final marker, the marker lists every entry that may be ours and is
    # accepted by no run.
    in_progress = json.dumps({WRITTEN: sorted(owned | set(entries))}, indent=2) + "\n"
    atomic_write_text(dst / marker, in_progress)
    old = tmp.with_name(tmp.name + ".old")
    old.mkdir()
    try:
        for name in sorted(owned):
            if os.path.lexists(dst / name):
                os.rename(dst / name, old / name)
        for name in entries:
            os.rename(tmp / name, dst / name)
        os.replace(tmp / marker, dst / marker)
    finally:
        shutil.rmtree(old, ignore_errors=True)
