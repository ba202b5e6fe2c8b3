"""The memory-bank family (SPADE, PatchCore): keep features of the training images, score by kNN.

The fit keeps the outputs of a feature layer for every training image (:meth:`fit_layer`);
finalize turns them into the method's bank (:meth:`_build`). The fit is not a sum of per-image
terms, so it does not spread over processes (AnomalyModel.check_world refuses).

A training image's own features are in the bank, so its in-sample score is about 0. Training
images are remembered by path (by position when no paths are given), and :meth:`calibration_scores`
scores each of them against the bank without its own entries.
"""

from __future__ import annotations

import sys
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from paddle import nn

from core.errors import InputError
from core.runtime import Chunks, RunFn, run_chunked
from models.base import AnomalyModel, Batch, MethodOptions, ModelConfig, option, recorded_count, unpack_batch
from models.checkpoint import ArraySpec
from models.components.knn import PreparedBank


def concatenate_released(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts)`` that empties ``parts`` while it copies (peak: result + one part)."""
    out = np.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype)
    start = 0
    while parts:
        part = parts.pop(0)
        out[start : start + len(part)] = part
        start += len(part)
    return out


@dataclass(frozen=True)
class BankOptions(MethodOptions):
    """Options every memory-bank method has."""

    half: bool = option(False, "store the gallery/bank in float16 (half its size)")


class MemoryBankModel(AnomalyModel):
    """Base of methods that score an image by its nearest neighbours among training features."""

    fit_outputs: ClassVar[tuple[str, ...]]
    """Names of :meth:`fit_layer`'s outputs, in order."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.n_train = 0
        self.train_paths: list[str | None] = []
        self.fit_parts: dict[str, list[np.ndarray]] = {name: [] for name in self.fit_outputs}
        self._extractor: RunFn | None = None
        self._prepared: PreparedBank | None = None

    # -- method hooks ------------------------------------------------------------------------
    @abstractmethod
    def fit_layer(self) -> nn.Layer:
        """Layer mapping images (N, 3, S, S) to the features the fit keeps: one (N, ...) array
        per name of :attr:`fit_outputs`."""

    @abstractmethod
    def _build(self, parts: dict[str, list[np.ndarray]]) -> None:
        """Make the bank from the features of all training images: {name: [(b_j, ...) batches]},
        in fit order. The lists may be emptied (:func:`concatenate_released`)."""

    @abstractmethod
    def _held_out_scores(self, images: np.ndarray, owners: list[int | None]) -> np.ndarray:
        """Image scores (B,) of images (B, 3, S, S); image i is scored against the bank without
        the entries of training image ``owners[i]`` (None: against the whole bank)."""

    @abstractmethod
    def _searched(self) -> np.ndarray:
        """The rows (M, D) that the numpy held-out scores search (:attr:`prepared`)."""

    @abstractmethod
    def _bank_arrays(self) -> dict[str, np.ndarray]:
        """The fitted bank as named arrays (for the checkpoint)."""

    @abstractmethod
    def _restore_bank(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`_bank_arrays`."""

    @classmethod
    @abstractmethod
    def fit_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Shape of one image's output of :meth:`fit_layer` for ``config``, by output name."""

    @classmethod
    @abstractmethod
    def bank_specs(cls, config: ModelConfig, n_train: int) -> dict[str, ArraySpec]:
        """Shapes of :meth:`_bank_arrays` for ``config`` and ``n_train`` training images."""

    @classmethod
    def random_specs(cls, config: ModelConfig) -> dict[str, ArraySpec]:
        """Shapes of :meth:`_random_arrays` (none by default)."""
        return {}

    @classmethod
    def array_specs(cls, config: ModelConfig, fitted: bool,
                    arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
        """Random parts, n_train and the bank, or the fit state: every recorded batch of each
        fit output (b_j, ...), the batch count and the training paths (n_train,)."""
        n_train = recorded_count(arrays, "n_train")
        specs = {**cls.random_specs(config), "n_train": ArraySpec((), "i")}
        if fitted:
            specs.update(cls.bank_specs(config, n_train))
            return specs
        parts = recorded_count(arrays, "fit_parts")
        for name, shape in cls.fit_shapes(config).items():
            specs.update({f"fit_{name}_{i}": ArraySpec((None, *shape)) for i in range(parts)})
        specs.update(fit_parts=ArraySpec((), "i"), train_paths=ArraySpec((n_train,), "U"))
        return specs

    def _random_arrays(self) -> dict[str, np.ndarray]:
        """The method's random parts (none by default)."""
        return {}

    def _restore_random(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`_random_arrays`."""

    # -- shared behaviour --------------------------------------------------------------------
    def stored(self, array: np.ndarray) -> np.ndarray:
        """``array`` in the bank's storage type: float16 with ``--half``, else float32."""
        return array.astype(np.float16 if self.options.half else np.float32, copy=False)

    @property
    def prepared(self) -> PreparedBank:
        """:meth:`_searched` made ready for searches, once per fit or load (on first use: scoring
        through the fused layer never needs it)."""
        if self._prepared is None:
            self._prepared = PreparedBank(self._searched())
        return self._prepared

    def compile(self, layer: nn.Layer) -> RunFn:
        """As AnomalyModel.compile, but one image per call: the distance blocks of a scoring layer
        grow with the number of images it gets at once."""
        run = super().compile(layer)

        def per_image(images: np.ndarray) -> list[np.ndarray]:
            outputs = [run(images[i : i + 1]) for i in range(len(images))]
            return [np.concatenate(parts) for parts in zip(*outputs, strict=True)]

        return per_image

    def extract(self, images: np.ndarray) -> Chunks:
        """:meth:`fit_layer`'s outputs for consecutive slices of images (B, 3, S, S)."""
        if self._extractor is None:
            self._extractor = super().compile(self.fit_layer())
        yield from run_chunked(self._extractor, images, self.runtime.chunk)

    def partial_fit(self, images: np.ndarray, paths: Sequence[str] | None = None) -> None:
        images = np.asarray(images, dtype=np.float32)
        self.check_finite(images, paths, "pixel values")
        for part, outputs in self.extract(images):
            names = list(paths[part]) if paths else None
            for name, values in zip(self.fit_outputs, outputs, strict=True):
                self.check_finite(values, names, "features")
                self.fit_parts[name].append(values)
            self.train_paths.extend(names or [None] * len(outputs[0]))
            self.n_train += len(outputs[0])

    def finalize(self) -> None:
        if self.n_train < 2:
            raise InputError(
                f"--method {self.method} got {self.n_train} training image(s) and needs at least 2 "
                "(each is scored against the others for the threshold); add training images"
            )
        self._build(self.fit_parts)
        self._prepared = None
        self.fit_parts = {name: [] for name in self.fit_outputs}
        self.fitted = True
        self._scorer = None

    def warn(self, message: str) -> None:
        """Print a warning about this fit to stderr."""
        print(f"warning: {self.category or self.method}: {message}", file=sys.stderr)

    def calibration_scores(self, batches: Iterable[Batch]) -> Iterator[np.ndarray]:
        """Held-out image scores of the calibration batches.

        An image that is a training image of this fit (same path; without paths, same position
        in the batches as in the fit) is scored against the bank without its own entries; any
        other image against the whole bank. A loaded checkpoint does not know its training images
        (only a fit state does), so there every image counts as new.
        """
        owner_of: dict[str | int, int] = {
            index if path is None else path: index for index, path in enumerate(self.train_paths)
        }
        position = 0
        for batch in batches:
            images, paths = unpack_batch(batch)
            keys = paths if paths else range(position, position + len(images))
            yield self._held_out_scores(images, [owner_of.get(key) for key in keys])
            position += len(images)

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = dict(self._random_arrays())
        arrays["n_train"] = np.array(self.n_train, dtype=np.int64)
        if self.fitted:
            arrays.update(self._bank_arrays())
            return arrays
        for name, parts in self.fit_parts.items():
            arrays.update({f"fit_{name}_{i}": part for i, part in enumerate(parts)})
        arrays["fit_parts"] = np.array(len(self.fit_parts[self.fit_outputs[0]]), dtype=np.int64)
        arrays["train_paths"] = np.array([path or "" for path in self.train_paths], dtype=str)
        return arrays

    def _restore(self, arrays: dict[str, np.ndarray], fitted: bool) -> None:
        self._restore_random(arrays)
        self.n_train = int(arrays["n_train"])
        if fitted:
            self._restore_bank(arrays)
            self._prepared = None
            self.fitted = True
            return
        count = int(arrays["fit_parts"])
        self.fit_parts = {name: [arrays[f"fit_{name}_{i}"] for i in range(count)]
                          for name in self.fit_outputs}
        self.train_paths = [path or None for path in arrays["train_paths"].tolist()]
        if len(self.train_paths) != self.n_train:
            raise ValueError(f"{len(self.train_paths)} training paths for {self.n_train} images")
