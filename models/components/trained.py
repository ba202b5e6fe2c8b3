"""The trained-network family: a network fitted by gradient steps, in epochs over the training images.

A method of this family says what its network is (:meth:`TrainedModel.build_network`), the loss of
a batch (:meth:`TrainedModel.loss`), its optimizer and learning-rate schedule
(:meth:`TrainedModel.make_optimizer`) and how the trained network scores (``fused_layer``). Shared
here: one optimizer step per batch (``partial_fit``), epochs in a seeded order per epoch, the
schedule stepped per epoch or per step, and checkpoints of the network weights and of the whole
optimizer state (moments, step counters, schedule) as plain npz arrays, no pickle. A fit state
saved after any batch resumes to the same weights as an uninterrupted fit.

The workflow drives it as it drives the statistics methods: :meth:`fit_position`,
:meth:`epoch_order`, ``partial_fit`` per batch, :meth:`end_epoch`, ``finalize``, ``calibrate``.
"""

from __future__ import annotations

import json
import sys
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import paddle
from paddle import nn

from core.errors import CheckpointError, InputError
from core.script import positive_float, positive_int
from models.base import AnomalyModel, MethodOptions, ModelConfig, option, positive
from models.checkpoint import ArraySpec

_NET = "net."
_OPT = "opt."
_SCHEDULE = "opt_schedule"


@dataclass(frozen=True)
class TrainingOptions(MethodOptions):
    """Options every trained method has; a method subclasses this with its own (``--variant``...)."""

    epochs: int = option(10, "passes over the training images", positive_int)
    lr: float = option(1e-3, "learning rate at the start of the schedule", positive_float)

    def check(self) -> None:
        positive("epochs", self.epochs)
        positive("lr", self.lr)


def optimizer_arrays(optimizer: paddle.optimizer.Optimizer, network: nn.Layer) -> dict[str, np.ndarray]:
    """The optimizer's state as npz arrays named by the network's parameter paths.

    Paddle names accumulators after the parameters' global names (``conv2d_3.w_0_moment1_0``),
    which depend on how many layers the process built before; the paths (``0.weight``) do not.
    The schedule's state becomes a JSON string array.
    """
    paths = {param.name: path for path, param in network.named_parameters()}
    arrays = {}
    for key, value in optimizer.state_dict().items():
        if key == "LR_Scheduler":
            arrays[_SCHEDULE] = np.array(json.dumps(value))
            continue
        owner = max((name for name in paths if key.startswith(name + "_")), key=len, default=None)
        if owner is None or not isinstance(value, paddle.Tensor):
            raise CheckpointError(f"optimizer state {key!r} belongs to no network parameter; "
                                  "a trained method must optimise its network's parameters only")
        arrays[f"{_OPT}{paths[owner]}:{key[len(owner) + 1:]}"] = value.numpy()
    return arrays


def restore_optimizer(optimizer: paddle.optimizer.Optimizer, network: nn.Layer,
                      arrays: dict[str, np.ndarray]) -> None:
    """Inverse of :func:`optimizer_arrays` for a new optimizer of the same network."""
    params = dict(network.named_parameters())
    state: dict[str, object] = {}
    for key, value in arrays.items():
        if key.startswith(_OPT):
            path, suffix = key[len(_OPT):].split(":", 1)
            if path not in params:
                raise ValueError(f"optimizer state {key} belongs to no network parameter")
            shape = tuple(params[path].shape)
            if value.shape != shape and value.size != 1:  # moments: the parameter's shape; powers: (1,)
                raise ValueError(f"optimizer state {key} has shape {value.shape}, its parameter {shape}")
            if value.dtype.kind != "f" or not np.isfinite(value).all():
                raise ValueError(f"optimizer state {key} is not all finite floats")
            state[f"{params[path].name}_{suffix}"] = paddle.to_tensor(value)
    if _SCHEDULE in arrays:
        state["LR_Scheduler"] = json.loads(str(arrays[_SCHEDULE]))
    optimizer.set_state_dict(state)


class TrainedModel(AnomalyModel):
    """Base of methods whose fit trains a network (CutPaste, EfficientAD, ...).

    ``schedule_per`` says when the learning-rate schedule steps: after every ``"epoch"`` or
    every ``"step"``.
    """

    Options = TrainingOptions
    schedule_per: ClassVar[str] = "epoch"
    progress_names: ClassVar[tuple[str, ...]] = ("loss",)
    """Names of the figures :meth:`loss` returns (the loss first), shown on the progress bar."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        state = paddle.get_rng_state()
        paddle.seed(self.config.seed)
        try:
            self.network = self.build_network()
        finally:
            paddle.set_rng_state(state)
        self.optimizer, self.schedule = self.make_optimizer()
        self.epoch = 0
        self.position = 0
        self.losses: list[float] = []
        """The loss of every step so far."""
        self.epoch_start = 0
        """Index in :attr:`losses` of the current epoch's first step."""
        self.last_figures: list[float] = []
        """The last step's loss and further figures (see :attr:`progress_names`)."""

    # -- method hooks ------------------------------------------------------------------------
    @abstractmethod
    def build_network(self) -> nn.Layer:
        """The trainable network (its initial weights are drawn from ``config.seed``)."""

    @abstractmethod
    def loss(self, images: paddle.Tensor) -> paddle.Tensor | tuple[paddle.Tensor, ...]:
        """Scalar training loss of a batch of normal images (B, 3, S, S); or a tuple of the loss
        and further scalars to show on the progress bar (named by :attr:`progress_names`)."""

    def make_optimizer(self) -> tuple[paddle.optimizer.Optimizer, paddle.optimizer.lr.LRScheduler | None]:
        """The optimizer of :attr:`network` and its schedule (None: constant ``--lr``); Adam here."""
        return paddle.optimizer.Adam(self.options.lr, parameters=self.network.parameters()), None

    def _init_random(self, rng: np.random.Generator) -> None:
        """The network's initial weights are the random part (drawn in ``__init__``)."""

    # -- the fit's course --------------------------------------------------------------------
    @property
    def max_steps(self) -> int | None:
        """A budget of optimizer steps (the fit stops when it is spent, even mid-epoch), or None:
        the fit runs ``--epochs`` passes over the training images."""
        return None

    @property
    def epochs(self) -> int:
        return self.options.epochs if self.max_steps is None else sys.maxsize

    def fit_done(self) -> bool:
        return self.max_steps is not None and len(self.losses) >= self.max_steps

    def progress(self) -> dict[str, float]:
        if not self.last_figures:
            return {}
        return dict(zip(self.progress_names, self.last_figures, strict=True))

    def fit_position(self) -> tuple[int, int]:
        return self.epoch, self.position

    def epoch_order(self, count: int, epoch: int) -> np.ndarray:
        """A permutation of range(count) drawn from (seed, epoch): the same in a resumed fit."""
        return np.random.default_rng([self.config.seed, epoch]).permutation(count)

    def partial_fit(self, images: np.ndarray, paths: Sequence[str] | None = None) -> None:
        """One optimizer step on a batch of normal images (B, 3, S, S) float32."""
        images = np.asarray(images, dtype=np.float32)
        self.check_finite(images, paths, "pixel values")
        if self.trunk is not None:
            self.trunk.eval()  # the pretrained trunk is frozen: batch norm keeps its statistics
        self.network.train()
        figures = self.loss(paddle.to_tensor(images))
        loss, *others = figures if isinstance(figures, tuple) else (figures,)
        value = float(loss.numpy())
        if not np.isfinite(value):
            raise InputError(f"--method {self.method}: the training loss became {value} at step "
                             f"{len(self.losses) + 1}; lower --lr or check the images")
        loss.backward()
        self.optimizer.step()
        self.optimizer.clear_grad()
        if self.schedule is not None and self.schedule_per == "step":
            self.schedule.step()
        self.losses.append(value)
        self.last_figures = [value, *(float(other.numpy()) for other in others)]
        self.position += len(images)
        self.n_train += len(images)

    def end_epoch(self) -> None:
        if self.schedule is not None and self.schedule_per == "epoch":
            self.schedule.step()
        recent = self.losses[self.epoch_start:]
        if recent:
            done = (f"epoch {self.epoch + 1}/{self.epochs}" if self.max_steps is None
                    else f"epoch {self.epoch + 1}, step {len(self.losses)}/{self.max_steps}")
            print(f"{self.category or self.method}: {done}, mean loss {np.mean(recent):.6f}",
                  file=sys.stderr)
        self.epoch += 1
        self.position = 0
        self.epoch_start = len(self.losses)

    def finalize(self) -> None:
        self.network.eval()
        self.fitted = True
        self._scorer = None

    # -- checkpoints -------------------------------------------------------------------------
    @classmethod
    def array_specs(cls, config: ModelConfig, fitted: bool,
                    arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
        """n_train, the loss of every step and, unfinished, the fit progress (epoch, position,
        epoch start); the network's weights are checked against the network when restored."""
        specs = {"n_train": ArraySpec((), "i"), "train_losses": ArraySpec((None,))}
        if not fitted:
            specs["fit_progress"] = ArraySpec((3,), "i")
        return specs

    def network_weights(self) -> dict[str, paddle.Tensor]:
        """The network's parameters and buffers by path, without the trunk's: a network may hold
        the trunk to train it (CutPaste), and the trunk is saved once, as the backbone."""
        trunk = set() if self.trunk is None else {id(tensor) for tensor in self.trunk.state_dict().values()}
        return {name: tensor for name, tensor in self.network.state_dict().items() if id(tensor) not in trunk}

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {_NET + name: value.numpy() for name, value in self.network_weights().items()}
        arrays["n_train"] = np.array(self.n_train, dtype=np.int64)
        arrays["train_losses"] = np.array(self.losses, dtype=np.float64)
        if not self.fitted:
            arrays["fit_progress"] = np.array([self.epoch, self.position, self.epoch_start], dtype=np.int64)
            arrays.update(optimizer_arrays(self.optimizer, self.network))
        return arrays

    def _restore(self, arrays: dict[str, np.ndarray], fitted: bool) -> None:
        weights = {name[len(_NET):]: value for name, value in arrays.items() if name.startswith(_NET)}
        tensors = self.network_weights()
        for name, tensor in tensors.items():
            if name not in weights:
                raise KeyError(f"network weight {name}")
            if tuple(weights[name].shape) != tuple(tensor.shape):
                raise ValueError(f"network weight {name} has shape {weights[name].shape}, this "
                                 f"configuration needs {tuple(tensor.shape)}")
            if weights[name].dtype.kind != "f" or not np.isfinite(weights[name]).all():
                raise ValueError(f"network weight {name} is not all finite floats")
        for name, tensor in tensors.items():  # set_value needs the tensor's own dtype ("paddle.float32")
            tensor.set_value(weights[name].astype(str(tensor.dtype).rsplit(".", 1)[-1], copy=False))
        self.n_train = int(arrays["n_train"])
        self.losses = arrays["train_losses"].tolist()
        if fitted:
            self.finalize()
            return
        self.epoch, self.position, self.epoch_start = (int(v) for v in arrays["fit_progress"])
        restore_optimizer(self.optimizer, self.network, arrays)
