"""ONNX files: conversion with paddle2onnx and running with onnxruntime (both optional).

paddle2onnx (2.1, see requirements-deploy.txt) converts ``model.json`` and ``model.pdmodel``
alike. It runs in a child process (``python -m deploy.onnx_model MODEL PARAMS OUT``) because it
aborts the whole process on an operator it does not know, and with ``optimize_tool="None"``:
its default optimiser (polygraphy) would pip-install packages at run time.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from core.errors import ConfigError

ONNX = "model.onnx"
OPSET = 11
_ROOT = Path(__file__).resolve().parents[1]


def require(module: str, flag: str) -> None:
    """Fail with one line naming ``flag`` when the optional ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{flag} needs {module}, which is not installed: "
                          "pip install -r requirements-deploy.txt")


def convert(model_file: Path, params_file: Path, target: Path) -> None:
    """Write the ONNX conversion of a Paddle Inference model to ``target`` (opset >= 11)."""
    require("paddle2onnx", "--onnx")
    env = {**os.environ, "POLYGRAPHY_AUTOINSTALL_DEPS": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.onnx_model", str(model_file), str(params_file), str(target)],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0 or not target.is_file():
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        reason = (errors or lines or [f"exit status {proc.returncode}"])[0]
        raise ConfigError(f"{model_file}: paddle2onnx could not convert it ({reason}); export "
                          "without --onnx, or try the other --format")


class OnnxRunner:
    """An onnxruntime session: ``run(images (N, 3, S, S)) -> list of outputs`` as numpy arrays."""

    def __init__(self, path: Path, cpu_threads: int, use_gpu: bool = False, gpu_id: int = 0) -> None:
        require("onnxruntime", "--backend onnxruntime")
        import onnxruntime as ort

        providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
        if use_gpu:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError("--use_gpu True: this onnxruntime has no CUDAExecutionProvider; "
                                  "install onnxruntime-gpu or use --use_gpu False")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu_id}))
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.status: dict[str, object] = {
            "runtime_device": "gpu" if use_gpu else "cpu", "backend": f"onnxruntime {ort.__version__}",
            "providers": self.session.get_providers(), "precision": "fp32", "enable_tensorrt": False,
            "enable_mkldnn": False, "cpu_math_library_num_threads": cpu_threads,
        }

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(None, {self.input_name: images}))


def _main(argv: list[str]) -> int:
    """Child process: convert MODEL PARAMS to OUT; paddle2onnx's own messages go to stderr."""
    import paddle2onnx

    model_file, params_file, target = argv
    paddle2onnx.export(model_file, params_file, save_file=target, opset_version=OPSET,
                       auto_upgrade_opset=True, enable_onnx_checker=True, optimize_tool="None")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
