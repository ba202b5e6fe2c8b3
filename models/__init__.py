"""Anomaly detection methods behind one interface (see models.base.AnomalyModel)."""

from __future__ import annotations

from typing import Any

from engine.errors import ConfigError
from engine.runtime import Runtime
from models.base import AnomalyModel, ModelConfig, load_checkpoint
from models.ortho import OrthoModel
from models.padim import PadimModel

METHODS: dict[str, type[AnomalyModel]] = {"ortho": OrthoModel, "padim": PadimModel}


def build_model(config: ModelConfig, runtime: Runtime | None = None) -> AnomalyModel:
    """A new, unfitted model of ``config.method``."""
    if config.method not in METHODS:
        raise ConfigError(f"--method {config.method}: choose one of {', '.join(METHODS)}")
    return METHODS[config.method].create(config, runtime)


def load_model(
    path: str, expect: ModelConfig | dict[str, Any] | None = None, runtime: Runtime | None = None
) -> AnomalyModel:
    """Load a checkpoint of any method; ``expect`` (method/arch/k/size) must match if given."""
    return load_checkpoint(path, METHODS, expect, runtime)


__all__ = ["METHODS", "AnomalyModel", "ModelConfig", "Runtime", "build_model", "load_model"]
