"""Normal validation images for methods that normalise their maps on held-out images (EfficientAD).

``ROOT/CATEGORY/validation/good`` when it exists (MVTec LOCO has one); otherwise a seeded 15 %
share of ``train/good`` (at least 2 images), which is then left out of the training images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.errors import InputError
from datasets.mvtec import Sample, image_files

VALIDATION_SHARE = 0.15
MIN_IMAGES = 2


def validation_split(root: str | Path, category: str, train: Sequence[Sample],
                     seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(training samples, validation samples) of ``root/category``.

    ``train`` is the category's train/good listing (datasets.list_samples). With a
    ``validation/good`` folder every training image is kept; otherwise ``max(2, ceil(0.15 n))``
    of the n training images, drawn by ``seed``, become the validation images, in file order.

    Raises:
        InputError: naming the folder, when fewer than 2 images would remain on either side.
    """
    folder = Path(root) / category / "validation" / "good"
    if folder.is_dir():
        hint = "put normal validation images there or remove the folder"
        validation = [Sample(p, 0, "good", None) for p in image_files(folder, hint)]
        if len(validation) < MIN_IMAGES:
            raise InputError(f"{folder}: holds {len(validation)} image; the map normalisation needs at "
                             f"least {MIN_IMAGES}: add images or remove the folder")
        return list(train), validation
    count = max(MIN_IMAGES, math.ceil(VALIDATION_SHARE * len(train)))
    if len(train) - count < MIN_IMAGES:
        raise InputError(f"{Path(root) / category / 'train' / 'good'}: {len(train)} images; "
                         f"{count} would be held out for validation (15 %, at least {MIN_IMAGES}) and "
                         f"at least {MIN_IMAGES} must remain to train on: add images, or add a "
                         "validation/good folder")
    held = set(np.random.default_rng(seed).choice(len(train), size=count, replace=False).tolist())
    return ([s for i, s in enumerate(train) if i not in held],
            [s for i, s in enumerate(train) if i in held])
