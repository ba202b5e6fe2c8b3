"""Deployment: export fitted models to Paddle Inference (and ONNX) folders, load and run them.

    from deploy import DeployedModel, export_model
    manifest = export_model(model, Path("export/bottle"))            # fused model.json + params
    maps, scores = DeployedModel.load("export/bottle/model.json").score(images)

Modules: export (writing a folder), manifest (deploy.json), stats (stats.npz of unfused exports),
postprocess (their numpy tail), onnx_model (paddle2onnx / onnxruntime), runner (loading and running),
benchmark (--enable_benchmark reports).
"""

import core  # noqa: F401  (first: quiets Paddle's import-time glog and warnings)
from deploy.export import export_model
from deploy.manifest import Manifest, read_manifest
from deploy.runner import DeployedModel

__all__ = ["DeployedModel", "Manifest", "export_model", "read_manifest"]
