"""The interface every method implements, and the parts they share (config, trunk, save/load).

A model is used like a scikit-learn estimator::

    model = build_model(model_config("ortho", arch="resnet18", k=100, pretrained="none"))
    model.fit(batches)                    # iterable of images (B, 3, S, S) float32, or loader dicts
    model.calibrate(batches)              # default threshold from normal images
    maps, scores = model.score(images)    # (B, S, S) float32, (B,) float32
    model.save("output/ortho_resnet18_100/bottle.npz")
    model = load_model("output/ortho_resnet18_100/bottle.npz")
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import paddle
from paddle import nn

from core.distributed import Collective
from core.errors import CheckpointError, ConfigError, InputError
from core.kernels import HALF_KERNELS
from core.runtime import RunFn, Runtime, compile_layer, run_chunked
from models.checkpoint import ArraySpec, check_arrays, check_identity, read_npz, write_npz
from models.components.backbone import ResNetTrunk, build_trunk, check_arch, layer_grid, weights_digest

Batch = np.ndarray | dict[str, Any]
_TRUNK_PREFIX = "backbone."
MAX_SIDE = 8192
"""Largest image side a checkpoint may declare (engine.cli.MAX_SIDE for the arguments)."""
_FIELD_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,),
                                             "bool": (bool,)}


def option(default: Any, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    """A method option: a dataclass field with the help of its command-line flag ``--<name>`` and
    the argparse ``type=`` that parses and range-checks it (default: the field's type)."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse})


@dataclass(frozen=True)
class MethodOptions:
    """A method's own options; each method subclasses this with its fields (see :func:`option`).

    ``name_fields`` name the fields that tell fits apart in folder names and identity checks
    (``k`` of ortho, padim and spade; none for patchcore). The fields are stored flat in the
    checkpoint's metadata next to the shared ones of :class:`ModelConfig`.
    """

    name_fields: ClassVar[tuple[str, ...]] = ()

    def check(self) -> None:
        """Raise a ConfigError naming the argument if a value is out of range."""


def positive(name: str, value: float) -> None:
    """A ConfigError ``--name value: must be a positive number`` unless ``value`` > 0."""
    if not value > 0:
        raise ConfigError(f"--{name} {value}: must be a positive number")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a fitted model: the shared fields and the method's ``options``.

    ``image_size`` is the (square) network input. Build one with :func:`models.model_config`,
    which fills the options with the method's defaults.
    """

    method: str
    options: MethodOptions
    arch: str = "resnet18"
    image_size: int = 256
    resize: int = 256
    sigma: float = 4.0
    seed: int = 0
    pretrained: str = "imagenet"

    @property
    def run_name(self) -> str:
        """Folder name of this configuration's checkpoints: ``<method>_<arch>[_<name field>...]``."""
        values = [str(getattr(self.options, name)) for name in self.options.name_fields]
        return "_".join([self.method, self.arch, *values])

    def identity(self) -> dict[str, Any]:
        """The fields a loaded checkpoint must match: method, arch, input sizes, name fields."""
        return {"method": self.method, "arch": self.arch, "image_size": self.image_size,
                "resize": self.resize,
                **{name: getattr(self.options, name) for name in self.options.name_fields}}

    def to_meta(self) -> dict[str, Any]:
        """The flat record stored in checkpoints: shared fields and the method's option fields."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**shared, **dataclasses.asdict(self.options)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], options: type[MethodOptions]) -> ModelConfig:
        """Inverse of :meth:`to_meta`; option fields a checkpoint lacks take their defaults
        (checkpoints of earlier versions held every method's fields: the others are ignored)."""
        shared = {f.name for f in dataclasses.fields(cls)} - {"options"}
        own = {f.name for f in dataclasses.fields(options)}
        return cls(options=options(**{key: meta[key] for key in own if key in meta}),
                   **{key: meta[key] for key in shared if key in meta})


@dataclass
class UnfusedParts:
    """An unfused export: ``layer`` maps images (N, 3, S, S) to the embedding x (N, F, h, w);
    ``arrays`` (projection W (F, k) float32 or channels (k,) int64, mean (P, k) and inv_cov
    (P, k, k) float32) and ``meta`` (sigma, grid [h, w], features F) finish it in numpy."""

    layer: nn.Layer
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def config_from_meta(path: str, meta: dict[str, Any], options: type[MethodOptions]) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint's metadata (shared fields and the fields of
    ``options``, the method's), every field type and size checked.

    Raises a CheckpointError naming ``path`` for a missing field, a value of the wrong JSON type,
    an unknown backbone or image sizes outside 1 <= image_size <= resize <= MAX_SIDE.
    """
    fields = [f for f in dataclasses.fields(ModelConfig) if f.name != "options"]
    for field in [*fields, *dataclasses.fields(options)]:
        if field.name not in meta and field.name != "method":
            continue  # written before the field existed: its default
        value = meta[field.name] if field.name in meta else None
        wanted = _FIELD_TYPES[str(field.type)]
        if not isinstance(value, wanted) or (bool not in wanted and isinstance(value, bool)):
            raise CheckpointError(f"{path}: metadata field {field.name} is {value!r}, expected "
                                  f"{'a number' if field.type == 'float' else f'a {field.type}'}; "
                                  "the file was changed or is damaged: train it again")
    config = ModelConfig.from_meta(meta, options)
    if not 1 <= config.image_size <= config.resize <= MAX_SIDE:
        raise CheckpointError(f"{path}: metadata image_size={config.image_size}, "
                              f"resize={config.resize}: need 1 <= image_size <= resize <= {MAX_SIDE}; "
                              "the file was changed or is damaged: train it again")
    if not 0 < config.sigma < np.inf:
        raise CheckpointError(f"{path}: metadata sigma={config.sigma}: the blur needs a finite number > 0; "
                              "the file was changed or is damaged: train it again")
    for name in ("threshold", "category", "stage"):
        value, wanted = meta.get(name), {"threshold": (int, float, type(None)), "category": (str,),
                                         "stage": (str,)}[name]
        if not isinstance(value, wanted) or isinstance(value, bool) or (
            name == "threshold" and value is not None and not np.isfinite(value)
        ) or (name == "stage" and value not in ("fit", "final")):
            raise CheckpointError(f"{path}: metadata field {name} is {value!r}; "
                                  "the file was changed or is damaged: train it again")
    try:
        check_arch(config.arch)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return config


def recorded_count(arrays: dict[str, np.ndarray], name: str) -> int:
    """The non-negative integer a checkpoint stores as the 0-d array ``name`` (ValueError if not)."""
    value = arrays.get(name)
    if value is None or value.shape != () or value.dtype.kind not in "iu" or int(value) < 0:
        raise ValueError(f"{name} must be a non-negative integer scalar")
    return int(value)


def unpack_batch(batch: Batch) -> tuple[np.ndarray, list[str] | None]:
    """(images (B, 3, S, S) float32, paths or None) of an array or a loader batch dict."""
    if isinstance(batch, dict):
        return batch["images"], batch.get("paths")
    return np.asarray(batch, dtype=np.float32), None


class AnomalyModel(ABC):
    """Base class: a feature trunk plus method-specific statistics, fitted on normal images."""

    method: ClassVar[str]
    layers: ClassVar[tuple[str, ...]] = ("layer1", "layer2", "layer3")
    """The backbone layers the method reads; () = no pretrained trunk (EfficientAD: its teacher)."""
    holds_out_validation: ClassVar[bool] = False
    """True: the fit keeps normal validation images apart (validation/good, else a seeded share of
    train/good, datasets.validation_split) and hands them to :meth:`fit_validation`."""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    """The method's options class (fields, defaults, checks)."""
    splits: ClassVar[bool] = False
    """Whether :meth:`split_layer` cuts the fused layer after the embedding (``--split``)."""
    kernels: ClassVar[tuple[str, ...]] = ()
    """Compiled CPU operators (core.kernels) that :meth:`kernel_layer` puts in its graph; none: the
    method has no ``--head kernel``."""

    def __init__(self, config: ModelConfig, trunk: ResNetTrunk | None, runtime: Runtime | None) -> None:
        self.config = config
        self.trunk = trunk
        self.runtime = runtime or Runtime()
        self.threshold: float | None = None
        self.score_min: float | None = None
        """Lowest calibration score: 0 of the normalised score (core.scores); None if unknown."""
        self.fitted = False
        self.category = ""
        self.meta: dict[str, Any] = {}
        self.n_train = 0
        """Training images fitted so far (a trained method: steps times images, over all epochs)."""
        self._scorer: RunFn | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def check_world(cls, size: int) -> None:
        """Raise a ConfigError if a fit cannot be spread over ``size`` processes.

        A method can if it overrides :meth:`reduce_across` (its fit is a sum of per-image terms);
        the workflow calls this before fitting, so a launched job fails at once.
        """
        if size > 1 and cls.reduce_across is AnomalyModel.reduce_across:
            raise ConfigError(
                f"--method {cls.method} cannot be fitted across processes; run train.py as a "
                "single process (without paddle.distributed.launch)"
            )

    @classmethod
    def create(cls, config: ModelConfig, runtime: Runtime | None = None) -> AnomalyModel:
        """A new, unfitted model: trunk weights from ``config.pretrained``, random parts from seed."""
        if not isinstance(config.options, cls.Options):
            raise ConfigError(f"--method {cls.method} takes {cls.Options.__name__}, not "
                              f"{type(config.options).__name__}; build the config with model_config()")
        config.options.check()
        trunk = build_trunk(config.arch, cls.layers, config.pretrained, config.seed) if cls.layers else None
        model = cls(config, trunk, runtime)
        model._init_random(np.random.default_rng(config.seed))
        return model

    @property
    def options(self) -> MethodOptions:
        """The method's options (``config.options``)."""
        return self.config.options

    @property
    def grid(self) -> tuple[int, int]:
        """Side of the finest feature grid used (h, w)."""
        side = layer_grid(self.config.image_size, self.layers[0])
        return side, side

    # -- method hooks ------------------------------------------------------------------------
    @abstractmethod
    def _init_random(self, rng: np.random.Generator) -> None:
        """Draw the method's random parts (projection, channel subset, ...) from ``rng``."""

    @abstractmethod
    def partial_fit(self, images: np.ndarray, paths: Sequence[str] | None = None) -> None:
        """Add a batch of normal images (B, 3, S, S) float32 to the fit."""

    @abstractmethod
    def finalize(self) -> None:
        """Turn the accumulated fit state into scoring statistics."""

    @abstractmethod
    def fused_layer(self) -> nn.Layer:
        """Layer mapping images (N, 3, S, S) to (anomaly map (N, 1, S, S), image score (N,))."""

    def kernel_layer(self, precision: str = "fp32") -> nn.Layer:
        """:meth:`fused_layer` with its scoring head as a compiled CPU operator (``--head kernel``,
        :attr:`kernels`) whose statistics are stored as ``precision`` (``--head_precision``).
        Methods with :attr:`kernels` override it."""
        self.check_kernel_head(precision)
        raise NotImplementedError(f"{type(self).__name__} lists kernels but builds no kernel layer")

    def split_layer(self, fused: nn.Layer) -> tuple[nn.Layer, nn.Layer]:
        """``fused`` (this model's :meth:`fused_layer` or :meth:`kernel_layer`) cut in two
        (``export_model.py --split``): features mapping images (N, 3, S, S) to the embedding z
        (N, k, h, w) in standard ops only, and the scoring head mapping z to (anomaly map
        (N, 1, S, S), image score (N,)). Methods with :attr:`splits` override it."""
        self.check_split()
        raise NotImplementedError(f"{type(self).__name__} splits but cuts no layer")

    def check_split(self) -> None:
        """One line if ``--split`` does not fit this method."""
        if not self.splits:
            raise ConfigError(f"--split: --method {self.config.method} has no split layout (ortho and "
                              "padim have); drop --split")

    def check_kernel_head(self, precision: str = "fp32") -> None:
        """One line if ``--head kernel --head_precision precision`` does not fit this method."""
        if not self.kernels:
            raise ConfigError(f"--head kernel: --method {self.config.method} has no compiled scoring "
                              "head (ortho, padim and patchcore have); export it with --head matmul")
        if precision != "fp32" and not HALF_KERNELS & set(self.kernels):
            raise ConfigError(f"--head_precision {precision}: only ortho's and padim's head stores its "
                              f"statistics in 16 bits, not --method {self.config.method}'s; drop "
                              "--head_precision")

    @abstractmethod
    def _arrays(self) -> dict[str, np.ndarray]:
        """Method arrays to store (random parts plus fit state or final statistics)."""

    @abstractmethod
    def _restore(self, arrays: dict[str, np.ndarray], fitted: bool) -> None:
        """Inverse of :meth:`_arrays`."""

    @classmethod
    @abstractmethod
    def array_specs(cls, config: ModelConfig, fitted: bool,
                    arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
        """The arrays :meth:`_arrays` writes for ``config`` (final statistics if ``fitted``, else
        the fit state), with their shapes. ``arrays`` gives counts a fit state records itself."""

    def check_statistics(self, source: str, fix: str) -> None:
        """Raise a CheckpointError naming ``source`` if an array of the model is not what
        :meth:`array_specs` declares (shape, dtype) or holds NaN/inf; ``fix`` ends the message."""
        arrays = self._arrays()
        check_arrays(source, arrays, self.array_specs(self.config, self.fitted, arrays), fix)

    # -- shared behaviour --------------------------------------------------------------------
    # -- the fit's course: epochs over the training images (one for the statistics methods) -------
    @property
    def epochs(self) -> int:
        """Passes over the training images; a statistics method needs one."""
        return 1

    def fit_position(self) -> tuple[int, int]:
        """(epoch, images of that epoch already fitted): where a resumed fit continues."""
        return 0, self.n_train

    def epoch_order(self, count: int, epoch: int) -> np.ndarray:
        """Order (count,) in which the ``count`` training images are visited in ``epoch``."""
        return np.arange(count)

    def end_epoch(self) -> None:  # noqa: B027  (a hook: nothing to do for a statistics method)
        """Called after each pass over the training images (a trained method steps its schedule)."""

    def fit_done(self) -> bool:
        """True once a budget of optimizer steps is spent: the fit stops, even mid-epoch."""
        return False

    def progress(self) -> dict[str, float]:
        """Figures the fit's progress bar shows after each batch (a trained method: its loss)."""
        return {}

    def prepare(self, batches: Iterable[Batch]) -> None:  # noqa: B027  (a hook)
        """Called once before the first step of a new fit with the training images (EfficientAD
        takes its teacher's channel statistics); nothing here, and ``batches`` is not read."""

    def fit_validation(self, train: Iterable[Batch], validation: Iterable[Batch]) -> None:  # noqa: B027
        """Called after :meth:`finalize` when :attr:`holds_out_validation`: the training and the
        held-out validation images (normal), e.g. to normalise maps; then the threshold is taken
        on the validation images."""

    def fit(self, batches: Iterable[Batch]) -> AnomalyModel:
        """Fit on image batches (arrays or loader dicts), then finalise.

        ``batches`` is iterated once per epoch, so a trained method needs a re-iterable (a list or
        a BatchLoader); a resumed model continues at its :meth:`fit_position`'s epoch.
        """
        for epoch in range(self.fit_position()[0], self.epochs):
            if self.fit_done():  # checked before each step, as the workflow does: a model saved at
                break            # its budget's last step takes no further step
            steps = 0
            for batch in batches:
                if self.fit_done():
                    break
                images, paths = unpack_batch(batch)
                self.partial_fit(images, paths)
                steps += 1
            if steps == 0:
                raise InputError(f"--method {self.method}: epoch {epoch + 1} got no batches; pass a "
                                 "re-iterable (a list or a BatchLoader) of at least one batch")
            self.end_epoch()
        self.finalize()
        return self

    def score(self, images: np.ndarray,
              paths: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps (B, S, S) and image scores (B,) of images (B, 3, S, S), both float32.

        ``paths`` (optional) name the images in errors.
        """
        if not self.fitted:
            raise ConfigError("the model is not fitted yet: call fit() or load a checkpoint")
        images = np.asarray(images, dtype=np.float32)
        self.check_finite(images, paths, "pixel values")
        if self._scorer is None:
            self._scorer = self.compile(self.fused_layer())
        outputs = [out for _, out in run_chunked(self._scorer, images, self.runtime.chunk)]
        amaps = np.concatenate([amap for amap, _ in outputs])
        scores = np.concatenate([scores for _, scores in outputs])
        if not (np.isfinite(scores).all() and np.isfinite(amaps.sum(dtype=np.float64))):
            raise CheckpointError(
                f"{self.category or self.config.method}: the model gave NaN or inf anomaly scores; "
                "its statistics are not finite: fit it again"
            )
        return amaps[:, 0], scores

    def unfused_parts(self) -> UnfusedParts | None:
        """The reference deploy layout of this model, or None if it only exports fused."""
        return None

    def reduce_across(self, collective: Collective) -> None:
        """Combine the fit states of all processes of a launched job (see core.distributed).

        This default refuses a job of several processes (see :meth:`check_world`).
        """
        self.check_world(collective.world.size)

    def calibrate(self, batches: Iterable[Batch]) -> float:
        """Set the default threshold to the highest image score over ``batches`` of normal images.

        The lowest of those scores is kept as :attr:`score_min` (for the normalised score).
        """
        scores = [np.asarray(s, dtype=np.float64) for s in self.calibration_scores(batches)]
        if not scores:
            raise InputError("no calibration images: the training folder yielded no batches")
        self.threshold = float(max(s.max() for s in scores))
        self.score_min = float(min(s.min() for s in scores))
        return self.threshold

    def keep_for_calibration(self, paths: Sequence[str]) -> None:
        """Told before the fit which training images (by path) :meth:`calibrate` will score, so a
        method may keep what it needs of them from the fit's own pass. Here: nothing is kept."""
        del paths

    def calibration_scores(self, batches: Iterable[Batch]) -> Iterator[np.ndarray]:
        """Image scores (B,) of each batch that :meth:`calibrate` takes the threshold from.

        Here the model's own scores; methods that can score training images out of sample
        override this.
        """
        for batch in batches:
            images, _ = unpack_batch(batch)
            yield self.score(images)[1]

    def compile(self, layer: nn.Layer) -> RunFn:
        """``layer`` (input: images (N, 3, S, S)) as a function on numpy arrays, in the runtime.

        Checks first that the trunk weights are finite: a NaN weight would otherwise vanish in a
        ReLU and give silently wrong scores.
        """
        for name, tensor in (self.trunk.state_dict() if self.trunk is not None else {}).items():
            if not np.isfinite(tensor.numpy()).all():
                raise CheckpointError(
                    f"backbone weight {name} contains NaN or inf (weights: {self.config.pretrained}); "
                    "use intact weights"
                )
        return compile_layer(layer, self.config.image_size, self.runtime)

    def check_finite(self, values: np.ndarray, paths: Sequence[str] | None, what: str) -> None:
        """Raise an InputError naming the first image whose ``values`` (B, ...) are not finite.

        Images are checked before the network (its ReLUs would turn NaN into 0) and features after.
        """
        if np.isfinite(values.sum(dtype=np.float64)):
            return
        finite = np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)
        i = int(np.argmin(finite))
        name = paths[i] if paths else f"image {i} of the batch"
        raise InputError(
            f"{name}: {what} contain NaN or inf; check the image and the backbone weights "
            f"({self.config.pretrained})"
        )

    def save(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Write the model (fit state if not finalised, statistics if fitted) to ``path``.

        ``extra`` adds JSON-able fields to the metadata (e.g. the resume position of a fit).
        """
        trunk_arrays = self.trunk.weight_arrays() if self.trunk is not None else {}
        meta = {
            **self.config.to_meta(),
            "stage": "final" if self.fitted else "fit",
            "threshold": self.threshold,
            "score_min": self.score_min,
            "category": self.category,
            "backbone_sha256": weights_digest(trunk_arrays),
            "paddle_version": paddle.__version__,
            **(extra or {}),
        }
        arrays = {_TRUNK_PREFIX + name: value for name, value in trunk_arrays.items()}
        arrays.update(self._arrays())
        write_npz(path, meta, arrays)

    @classmethod
    def from_file(
        cls, path: str, meta: dict[str, Any], arrays: dict[str, np.ndarray], runtime: Runtime | None
    ) -> AnomalyModel:
        """Rebuild a model of this class from checkpoint contents (see :func:`load_model`)."""
        config = config_from_meta(path, meta, cls.Options)
        fitted = meta.get("stage") == "final"
        try:
            specs = cls.array_specs(config, fitted, arrays)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: checkpoint is incomplete ({exc}); train it again") from exc
        check_arrays(path, arrays, specs)
        trunk = ResNetTrunk(config.arch, cls.layers) if cls.layers else None
        trunk_arrays = {
            name[len(_TRUNK_PREFIX):]: value
            for name, value in arrays.items()
            if name.startswith(_TRUNK_PREFIX)
        }
        if trunk is not None:
            trunk.load_weight_arrays(trunk_arrays, source=path, digest=meta.get("backbone_sha256"))
        model = cls(config, trunk, runtime)
        model.threshold = meta.get("threshold")
        model.score_min = meta.get("score_min")
        model.category = meta.get("category", "")
        model.meta = meta
        try:
            model._restore(arrays, fitted=fitted)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: checkpoint is incomplete ({exc}); train it again") from exc
        return model


def load_checkpoint(
    path: str,
    registry: dict[str, type[AnomalyModel]],
    expect: ModelConfig | dict[str, Any] | None = None,
    runtime: Runtime | None = None,
    final: bool = False,
) -> AnomalyModel:
    """Load any method's checkpoint, checking it against ``expect`` (method/arch/k/size).

    ``final``: refuse a fit state (the unfinished fit train.py --save_every writes).
    """
    meta, arrays = read_npz(path)
    if expect is not None:
        wanted = expect.identity() if isinstance(expect, ModelConfig) else dict(expect)
        check_identity(path, meta, wanted)
    method = meta.get("method")
    if method not in registry:
        raise CheckpointError(f"{path}: unknown method {method!r} in checkpoint")
    if final and meta.get("stage") != "final":
        raise CheckpointError(f"{path}: holds an unfinished fit (a --save_every fit state), not a "
                              "fitted model; finish it with train.py --resume or pass a final checkpoint")
    return registry[method].from_file(path, meta, arrays, runtime)
