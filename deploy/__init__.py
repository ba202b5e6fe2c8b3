"""Deployment: export fitted models to Paddle Inference (and ONNX) folders, load and run them.

    from deploy import DeployedModel, export_model
    manifest = export_model(model, Path("export/bottle"))            # fused model.json + params
    maps, scores = DeployedModel.load("export/bottle/model.json").score(images)

Modules: export (writing a folder), manifest (deploy.json), stats (stats.npz of unfused exports),
postprocess (their numpy tail), onnx_model (paddle2onnx / onnxruntime), runner (loading and running),
benchmark (--enable_benchmark reports).
"""

from typing import Any

import core  # noqa: F401  (first: quiets Paddle's import-time glog and warnings)
from deploy.manifest import Manifest, read_manifest
from deploy.runner import DeployedModel

__all__ = ["DeployedModel", "Manifest", "export_model", "read_manifest"]


def __getattr__(name: str) -> Any:
    """``export_model`` is imported on first use: the runtime side (runner, manifest, stats,
    postprocess, report) must import without the models, so infer.py runs on a box without them."""
    if name == "export_model":
        from deploy.export import export_model

        return export_model
    raise AttributeError(f"module 'deploy' has no attribute {name!r}")
