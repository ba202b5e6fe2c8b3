"""Anomaly detection methods behind one interface (see models.base.AnomalyModel).

Methods are registered by name; :func:`register_method` adds one (a plugin module named in the
environment variable ``ORTHOAD_PLUGINS``, comma separated, is imported at the end of this module
so that it can register its methods before the scripts build their arguments).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any

from core.errors import ConfigError
from core.runtime import Runtime
from models.base import AnomalyModel, MethodOptions, ModelConfig, load_checkpoint
from models.cutpaste import CutPasteModel
from models.efficientad import EfficientADModel, PuadModel
from models.ortho import OrthoModel
from models.padim import PadimModel
from models.patchcore import PatchCoreModel
from models.spade import SpadeModel

METHODS: dict[str, type[AnomalyModel]] = {}
PLUGINS_ENV = "ORTHOAD_PLUGINS"


def register_method(cls: type[AnomalyModel]) -> type[AnomalyModel]:
    """Make ``cls`` available as ``--method cls.method`` (usable as a class decorator)."""
    METHODS[cls.method] = cls
    return cls


def method_class(method: str) -> type[AnomalyModel]:
    """The class of ``--method``; a ConfigError listing the methods if there is none."""
    if method not in METHODS:
        raise ConfigError(f"--method {method}: choose one of {', '.join(METHODS)}")
    return METHODS[method]


def model_config(method: str, strict: bool = True, **fields: Any) -> ModelConfig:
    """A ModelConfig of ``method``: shared fields and the method's options by name, the rest
    defaults. ``strict`` refuses fields the method does not have; otherwise (the scripts, whose
    arguments cover every method) those and None values are skipped."""
    own = {f.name for f in dataclasses.fields(method_class(method).Options)}
    shared = {f.name for f in dataclasses.fields(ModelConfig)} - {"method", "options"}
    unknown = sorted(set(fields) - own - shared)
    if strict and unknown:
        raise ConfigError(f"--method {method} has no option {', '.join(unknown)}; "
                          f"its options: {', '.join(sorted(own)) or 'none'}")
    given = {key: value for key, value in fields.items() if value is not None}
    options = method_class(method).Options(**{k: v for k, v in given.items() if k in own})
    return ModelConfig(method=method, options=options,
                       **{k: v for k, v in given.items() if k in shared})


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


def load_plugins(names: str) -> None:
    """Import the comma-separated modules ``names`` (each registers its methods)."""
    for name in filter(None, (part.strip() for part in names.split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"{PLUGINS_ENV}={names}: cannot import {name} ({exc}); fix the "
                              "module name or PYTHONPATH") from exc


for _cls in (OrthoModel, PadimModel, SpadeModel, PatchCoreModel, CutPasteModel, EfficientADModel, PuadModel):
    register_method(_cls)
load_plugins(os.environ.get(PLUGINS_ENV, ""))

__all__ = ["METHODS", "AnomalyModel", "MethodOptions", "ModelConfig", "Runtime", "build_model",
           "load_model", "method_class", "model_config", "register_method"]
