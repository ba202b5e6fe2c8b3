"""Image folders that are not an anomaly dataset: the teacher's distillation images and the
student's penalty images (ImageNet in the paper; any folder tree of images here).

The one module of models/ that reads images (through datasets, an exception the architecture
test allows): the anomaly images themselves reach the models as arrays from the engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import InputError
from datasets.image import Preprocess, read_image
from datasets.mvtec import IMAGE_SUFFIXES


class ImageFolder:
    """Every image under ``root`` (sub-folders included, sorted by path), resized to ``side``
    (aspect not kept) and ImageNet-normalised; ``what`` names the argument in errors."""

    def __init__(self, root: str | Path, side: int, what: str) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{what} {root}: not a folder; pass a folder of images")
        self.paths = sorted(p for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                            and not p.name.startswith("."))
        if not self.paths:
            raise InputError(f"{what} {root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} "
                             "in it and its sub-folders); pass a folder of images")
        self.preprocess = Preprocess(resize=side)

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """Images (B, 3, side, side) float32 at ``indices`` (B,)."""
        return np.stack([self.preprocess(read_image(self.paths[int(i)])) for i in indices])

    def draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``count`` images drawn uniformly with replacement by ``rng``: (count, 3, side, side)."""
        return self.batch(rng.integers(0, len(self.paths), size=count))
