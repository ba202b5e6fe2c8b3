"""Anomaly detection methods behind one interface (see models.base.AnomalyModel)."""

from __future__ import annotations

from typing import Any

from engine.errors import ConfigError
from engine.runtime import Runtime
from models.base import AnomalyModel, ModelConfig, load_checkpoint
from models.ortho import OrthoModel
from models.padim import PadimModel
from models.patchcore import PatchCoreModel
from models.spade import SpadeModel

METHODS: dict[str, type[AnomalyModel]] = {
    "ortho": OrthoModel, "padim": PadimModel, "spade": SpadeModel, "patchcore": PatchCoreModel,
}


def method_class(method: str) -> type[AnomalyModel]:
    """The class of ``--method``; a ConfigError listing the methods if there is none."""
    if method not in METHODS:
        raise ConfigError(f"--method {method}: choose one of {', '.join(METHODS)}")
    return METHODS[method]


def resolve_k(method: str, k: int | None) -> int:
    """``--k`` for ``method``: as given, else the method's default (ortho/padim 100, spade 50);
    0 for patchcore, which has no k."""
    return method_class(method).resolve_k(k)


def build_model(config: ModelConfig, runtime: Runtime | None = None) -> AnomalyModel:
    """A new, unfitted model of ``config.method``."""
    return method_class(config.method).create(config, runtime)


def load_model(
    path: str, expect: ModelConfig | dict[str, Any] | None = None, runtime: Runtime | None = None,
    final: bool = False,
) -> AnomalyModel:
    """Load a checkpoint of any method; ``expect`` (method/arch/k/size) must match if given;
    ``final`` refuses a fit state."""
    return load_checkpoint(path, METHODS, expect, runtime, final)


__all__ = ["METHODS", "AnomalyModel", "ModelConfig", "Runtime", "build_model", "load_model",
           "method_class", "resolve_k"]
