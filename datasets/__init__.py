"""Data input: image reading, MVTec-layout datasets, batching, dataset generators/converters.

No deep-learning framework is imported here: items are numpy arrays.
"""

from datasets.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    denormalize,
    read_image,
    read_mask,
)
from datasets.loader import BatchLoader, shard_indices
from datasets.mvtec import (
    MVTEC_CATEGORIES,
    OBJECTS,
    TEXTURES,
    AnomalyDataset,
    Sample,
    has_masks,
    list_samples,
    resolve_categories,
)
from datasets.validation import validation_split

__all__ = [
    "validation_split",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MVTEC_CATEGORIES",
    "OBJECTS",
    "TEXTURES",
    "AnomalyDataset",
    "BatchLoader",
    "Preprocess",
    "Sample",
    "denormalize",
    "has_masks",
    "list_samples",
    "read_image",
    "read_mask",
    "resolve_categories",
    "shard_indices",
]
