"""The per-position Gaussian family (OrthoAD, PaDiM): project features to k dims, fit, score.

A method of this family only says how features of layer1..3 become k-dim vectors z at every
position of layer1's grid (:meth:`embedding`); fitting (streaming, mergeable), the Mahalanobis
distance, upsampling, blur and image score are shared here.
"""

from __future__ import annotations

import math
import sys
import tempfile
import zlib
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, ClassVar

import numpy as np
import paddle
from paddle import nn

from core.distributed import Collective
from core.errors import CheckpointError, ConfigError
from core.kernels import MAHALANOBIS_HEAD
from core.runtime import RunFn, Runtime, run_chunked
from core.script import positive_float, positive_int
from models.base import (
    AnomalyModel,
    Batch,
    MethodOptions,
    ModelConfig,
    UnfusedParts,
    option,
    positive,
    unpack_batch,
)
from models.checkpoint import ArraySpec, check_arrays
from models.components.backbone import layer_channels, layer_grid
from models.components.gaussian import GaussianAccumulator, gaussian_of, mean_of, squared_distances
from models.components.layers import AnomalyMapHead, MahalanobisMap, ToRows
from models.components.projection import FeatureConcat

_CALIBRATION_BYTES = 512 << 20  # features held at once while scoring out of fold


class KeptFeatures:
    """Fit-basis features (P, k) float32 of chosen training images, kept from the fit's own pass
    for the out-of-fold threshold, in an unlinked temporary file (``tempfile``'s folder, TMPDIR):
    200 images of wide_resnet50_2 at k=300 are 0.98 GB, which stays out of the process's memory.

    Records are exact copies, so a threshold from them equals one from embedding the images again.
    If the file cannot be written (disk full), it is dropped with a note and :meth:`has` is False
    for every image: the threshold then embeds those images again.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.wanted = set(paths)
        self.record: dict[str, int] = {}  # path -> record index
        self.nbytes = 0
        self._file: IO[bytes] | None = None

    def put(self, path: str | None, z: np.ndarray) -> None:
        """Keep ``z`` (P, k) float32 of the image at ``path`` if it is wanted and not kept yet."""
        if path not in self.wanted or path in self.record:
            return
        data = np.ascontiguousarray(z, dtype=np.float32)
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="orthoad-calibration-")
                self.nbytes = data.nbytes
            self._file.seek(len(self.record) * self.nbytes)
            self._file.write(memoryview(data).cast("B"))
        except OSError as exc:
            print(f"note: the calibration images' features could not be kept on disk ({exc}); "
                  "the threshold embeds them again", file=sys.stderr)
            self.close()
            return
        self.record[path] = len(self.record)

    def has(self, path: str | None) -> bool:
        """Whether the features of the image at ``path`` are kept."""
        return path in self.record

    def read(self, path: str, out: np.ndarray) -> None:
        """Copy the kept features of ``path`` into ``out`` (P, k) float32 (C-contiguous)."""
        self._file.seek(self.record[path] * self.nbytes)
        if self._file.readinto(memoryview(out).cast("B")) != self.nbytes:
            raise OSError(f"the kept features of {path} were cut short in the temporary file")

    def close(self) -> None:
        """Delete the file and forget every record."""
        if self._file is not None:
            self._file.close()
        self._file, self.wanted, self.record = None, set(), {}


class Pipeline(nn.Layer):
    """Composition of layers: trunk -> embedding -> [distance -> map head]."""

    def __init__(self, trunk: nn.Layer, embedding: nn.Layer, *tail: nn.Layer) -> None:
        super().__init__()
        self.trunk = trunk
        self.embedding = embedding
        self.tail = nn.LayerList(tail)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor | tuple[paddle.Tensor, paddle.Tensor]:
        out = self.embedding(self.trunk(x))
        for layer in self.tail:
            out = layer(out)
        return out


@dataclass(frozen=True)
class GaussianOptions(MethodOptions):
    """Options of the per-position Gaussian methods (ortho, padim)."""

    name_fields: ClassVar[tuple[str, ...]] = ("k",)
    k: int = option(100, "embedding dimension (<= the backbone's F)", positive_int)
    eps: float = option(0.01, "covariance regulariser eps*I", positive_float)

    def check(self) -> None:
        positive("k", self.k)


class GaussianModel(AnomalyModel):
    """Base of methods that fit one Gaussian per position of a k-dim embedding.

    Training images are split into two folds (by a hash of the file path, or alternately when no
    paths are given), each with its own accumulator; the model is the Gaussian of their union.
    The folds let :meth:`calibrate` score every training image with the Gaussian fitted on the
    *other* fold, so the default threshold comes from out-of-sample scores.
    """

    Options = GaussianOptions
    folds_count: ClassVar[int] = 2
    kernels = (MAHALANOBIS_HEAD,)
    splits = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        positions = self.grid[0] * self.grid[1]
        self.folds: list[GaussianAccumulator] = []
        for index in range(self.folds_count):  # in pairs sharing one triangle store
            partner = self.folds[-1] if index % 2 else None
            self.folds.append(GaussianAccumulator(positions, self.options.k,
                                                  threads=self.runtime.cpu_threads, partner=partner))
        self.mean: np.ndarray | None = None
        self._inv_cov: np.ndarray | None = None
        self.n_train = 0
        self._embedder: RunFn | None = None
        self._kept: KeptFeatures | None = None

    @classmethod
    def create(cls, config: ModelConfig, runtime: Runtime | None = None) -> AnomalyModel:
        """As AnomalyModel.create; a ConfigError unless eps is a finite number > 0."""
        if not (math.isfinite(config.options.eps) and config.options.eps > 0):
            raise ConfigError(f"--eps {config.options.eps}: must be a finite number > 0 "
                              "(the covariance regulariser eps*I)")
        return super().create(config, runtime)

    def feature_channels(self) -> int:
        """F, the channels of the concatenated features x; a ConfigError if k exceeds it."""
        features = sum(self.trunk.channels)
        if self.options.k > features:
            raise ConfigError(
                f"--k {self.options.k}: {self.config.arch} has {features} feature channels; "
                f"use k <= {features}"
            )
        return features

    @abstractmethod
    def embedding(self) -> nn.Layer:
        """Layer mapping the trunk's feature list to z (N, k, h, w) on layer1's grid."""

    def fit_embedding(self) -> nn.Layer:
        """Layer giving the features the fit accumulates: z' = basis z (:meth:`fit_basis`)."""
        return self.embedding()

    def fit_basis(self) -> np.ndarray | None:
        """(k, k) invertible matrix of the fit's coordinates (z' = basis z), or None (z' = z).

        Mahalanobis distances do not depend on the coordinates, so a method may fit in whichever
        basis makes its embedding cheapest; statistics are turned back into z's at finalize.
        """
        return None

    def embed(self, images: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        """Features z (b, P, k) float32 (P = h*w) of consecutive slices of images (B, 3, S, S)."""
        if self._embedder is None:
            self._embedder = self.compile(Pipeline(self.trunk, self.fit_embedding(), ToRows()))
        for part, (z,) in run_chunked(self._embedder, images, self.runtime.chunk):
            yield part, z

    def fold_of(self, path: str | None, position: int) -> int:
        """Fold of a training image: CRC32 of its path, else its running position."""
        key = zlib.crc32(path.encode()) if path else position
        return key % self.folds_count

    def partial_fit(self, images: np.ndarray, paths: Sequence[str] | None = None) -> None:
        images = np.asarray(images, dtype=np.float32)
        self.check_finite(images, paths, "pixel values")
        for part, z in self.embed(images):
            names = list(paths[part]) if paths else [None] * len(z)
            self.check_finite(z, names if paths else None, "features")
            for row, name in zip(z, names, strict=True):
                self.folds[self.fold_of(name, self.n_train)].update(row[None])
                if self._kept is not None:
                    self._kept.put(name, row)
                self.n_train += 1

    def keep_for_calibration(self, paths: Sequence[str]) -> None:
        """Keep the fit-basis features of the training images at ``paths`` as the fit embeds them
        (:class:`KeptFeatures`): :meth:`calibration_scores` then scores them without running the
        backbone again. Images fitted before (a resumed fit) or by other processes are embedded
        again there."""
        if self._kept is not None:
            self._kept.close()
        self._kept = KeptFeatures(paths) if paths else None

    def finalize(self) -> None:
        for fold in self.folds:
            fold.release()
        self.mean = mean_of(self.folds, self.fit_basis())
        self._inv_cov = None  # formed when first used: after the threshold, see inv_cov
        self.fitted = True
        self._scorer = None
        self._check_fitted({"mean": self.mean})

    def _check_fitted(self, arrays: dict[str, np.ndarray]) -> None:
        """Refuse fitted statistics (see :meth:`array_specs`) that are not finite, naming the fit."""
        specs = self.array_specs(self.config, True, arrays)
        check_arrays(f"fit of {self.category or self.method}", arrays,
                     {name: specs[name] for name in arrays},
                     f"check --eps ({self.options.eps}) and the training images")

    @property
    def inv_cov(self) -> np.ndarray | None:
        """Inverse covariances (P, k, k) float32 of the fitted model, None before finalize.

        Formed from the fold statistics when first read (scoring, saving), not in
        :meth:`finalize`: the out-of-fold threshold needs no inverse, so the two never share memory.
        """
        if self._inv_cov is None and self.fitted:
            self._inv_cov = gaussian_of(self.folds, self.options.eps, self.fit_basis())[1]
            self._check_fitted({"inv_cov": self._inv_cov})
        return self._inv_cov

    @inv_cov.setter
    def inv_cov(self, value: np.ndarray | None) -> None:
        self._inv_cov = value

    def calibration_scores(self, batches: Iterable[Batch]) -> Iterator[np.ndarray]:
        """Out-of-fold image scores: each image is scored by the Gaussian of the other fold.

        Images whose features the fit kept (:meth:`keep_for_calibration`) are not embedded again;
        the others are kept as images (smaller than their features) until their fold's turn. Fold
        by fold, the fit-basis features of the images it scores, in groups of at most
        ``_CALIBRATION_BYTES``, are whitened by that fold's Cholesky factors (no inverse covariance
        is formed). Yields the scores of one group at a time. Without fold statistics (a loaded
        checkpoint, or a fold with fewer than 2 images) the full model scores them.
        """
        if any(fold.count < 2 for fold in self.folds):
            if self._kept is not None:  # not read: release the temporary file now
                self._kept.close()
                self._kept = None
            yield from super().calibration_scores(batches)
            return
        kept = self._kept or KeptFeatures(())
        scored_by: list[list[str | np.ndarray]] = [[] for _ in self.folds]
        position = 0
        for batch in batches:
            images, paths = unpack_batch(batch)
            for i, image in enumerate(images):
                path = paths[i] if paths else None
                fold = self.fold_of(path, position)
                scored_by[(fold + 1) % self.folds_count].append(path if kept.has(path) else image)
                position += 1
        head = AnomalyMapHead(self.grid, (self.config.image_size,) * 2, self.config.sigma)
        positions, k = self.folds[0].positions, self.options.k
        group = max(1, _CALIBRATION_BYTES // (positions * k * 4))
        try:
            for fold, items in zip(self.folds, scored_by, strict=True):
                for start in range(0, len(items), group):
                    z = self._calibration_features(items[start : start + group], kept)
                    squared = squared_distances([fold], self.options.eps, self.fit_basis(), z)
                    dist = np.sqrt(np.maximum(squared, 0.0)).reshape(len(z), 1, *self.grid)
                    with paddle.no_grad():
                        yield head(paddle.to_tensor(dist))[1].numpy()
        finally:
            kept.close()
            self._kept = None

    def _calibration_features(self, items: Sequence[str | np.ndarray], kept: KeptFeatures) -> np.ndarray:
        """Fit-basis features (N, P, k) float32 of ``items``: paths read from ``kept``, images embedded."""
        z = np.empty((len(items), self.folds[0].positions, self.options.k), dtype=np.float32)
        fresh = [i for i, item in enumerate(items) if not isinstance(item, str)]
        for i, item in enumerate(items):
            if isinstance(item, str):
                kept.read(item, z[i])
        if fresh:
            for part, features in self.embed(np.stack([items[i] for i in fresh])):
                z[fresh[part]] = features
        return z

    def merge(self, other: GaussianModel) -> None:
        """Add the fit state of ``other`` (same configuration, disjoint images) to this one."""
        if (
            other.config != self.config
            or any(not np.array_equal(a, other._random_arrays()[n])
                   for n, a in self._random_arrays().items())
        ):
            raise CheckpointError("cannot merge fit states of different configurations or seeds")
        for mine, theirs in zip(self.folds, other.folds, strict=True):
            mine.merge(theirs)
        self.n_train += other.n_train

    def reduce_across(self, collective: Collective) -> None:
        """Turn this process's fit state into that of all processes' images together."""
        for fold in self.folds:
            fold.reduce_across(collective)
        self.n_train = sum(fold.count for fold in self.folds)

    def _scoring_layer(self, mean: np.ndarray, inv_cov: np.ndarray, kernel: bool = False,
                       precision: str = "fp32") -> nn.Layer:
        distance = MahalanobisMap(mean, inv_cov, self.grid, kernel=kernel, precision=precision)
        size = (self.config.image_size, self.config.image_size)
        head = AnomalyMapHead(self.grid, size, self.config.sigma)
        return Pipeline(self.trunk, self.embedding(), distance, head)

    def fused_layer(self) -> nn.Layer:
        return self._scoring_layer(self.mean, self.inv_cov)

    def kernel_layer(self, precision: str = "fp32") -> nn.Layer:
        return self._scoring_layer(self.mean, self.inv_cov, kernel=True, precision=precision)

    def split_layer(self, fused: nn.Layer) -> tuple[nn.Layer, nn.Layer]:
        if not isinstance(fused, Pipeline) or len(fused.tail) != 2:
            raise TypeError("split_layer cuts this model's fused_layer() or kernel_layer()")
        return Pipeline(fused.trunk, fused.embedding), nn.Sequential(*fused.tail)

    def unfused_parts(self) -> UnfusedParts:
        """The graph up to x and the statistics that finish it (deploy.postprocess)."""
        (name, array), = self.embedding_arrays().items()
        features = array.shape[0] if name == "projection" else sum(self.trunk.channels)
        arrays = {name: array.astype(np.float32 if name == "projection" else np.int64),
                  "mean": self.mean.astype(np.float32), "inv_cov": self.inv_cov.astype(np.float32)}
        meta = {"sigma": self.config.sigma, "grid": list(self.grid), "features": int(features)}
        return UnfusedParts(self.feature_layer(), arrays, meta)

    def feature_layer(self) -> nn.Layer:
        """Layer mapping images (N, 3, S, S) to the unprojected embedding x (N, F, h, w).

        x = [layer1; up(layer2); up(layer3)], nearest-upsampled to layer1's grid and concatenated
        (the reference implementations' embedding); z is W^T x or k of its channels, see
        :meth:`embedding_arrays`.
        """
        grids = [layer_grid(self.config.image_size, name) for name in self.layers]
        return Pipeline(self.trunk, FeatureConcat(grids))

    @abstractmethod
    def embedding_arrays(self) -> dict[str, np.ndarray]:
        """How x (F channels) becomes z (k): {"projection": W (F, k)} or {"channels": index (k,)}."""

    @abstractmethod
    def _random_arrays(self) -> dict[str, np.ndarray]:
        """The method's random parts (projection or channel subset)."""

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = dict(self._random_arrays())
        arrays["n_train"] = np.array(self.n_train, dtype=np.int64)
        if self.fitted:
            arrays.update(mean=self.mean, inv_cov=self.inv_cov)
            return arrays
        for index, fold in enumerate(self.folds):
            arrays.update({f"fold{index}_{k}": v for k, v in fold.state().items()})
        return arrays

    def _restore(self, arrays: dict[str, np.ndarray], fitted: bool) -> None:
        self._restore_random(arrays)
        self.n_train = int(arrays["n_train"])
        if fitted:
            self.mean = arrays["mean"]
            self.inv_cov = arrays["inv_cov"]
            self.fitted = True
            return
        for index, fold in enumerate(self.folds):
            prefix = f"fold{index}_"
            fold.load_state({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})

    @abstractmethod
    def _restore_random(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`_random_arrays`."""

    @classmethod
    @abstractmethod
    def random_specs(cls, config: ModelConfig, channels: tuple[int, ...]) -> dict[str, ArraySpec]:
        """Shapes of :meth:`_random_arrays` for ``config``; ``channels`` per layer of the trunk."""

    @classmethod
    def array_specs(cls, config: ModelConfig, fitted: bool,
                    arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
        """Random parts, n_train and mean (P, k) / inv_cov (P, k, k), or per fold its count, mean
        and scatter; P the positions of layer1's grid."""
        side, k = layer_grid(config.image_size, cls.layers[0]), config.options.k
        specs = {**cls.random_specs(config, layer_channels(config.arch, cls.layers)),
                 "n_train": ArraySpec((), "i")}
        if fitted:
            specs.update(mean=ArraySpec((side * side, k)), inv_cov=ArraySpec((side * side, k, k)))
            return specs
        for index in range(cls.folds_count):
            specs.update({f"fold{index}_count": ArraySpec((), "i"),
                          f"fold{index}_mean": ArraySpec((side * side, k)),
                          f"fold{index}_scatter": ArraySpec((side * side, k, k))})
        return specs
