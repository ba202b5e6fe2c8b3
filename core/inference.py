"""Paddle Inference helpers: one place that turns options into a predictor config and runs it.

Shared by infer.py (exported models) and by the fit/score runtime (layers compiled on the fly).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paddle
from paddle import inference

from core.device import check_gpu
from core.errors import ConfigError, InputError


@dataclass
class PredictorOptions:
    """How a predictor runs: device, threads, oneDNN or OpenVINO, GPU memory pool, TensorRT, precision."""

    use_gpu: bool = False
    gpu_id: int = 0
    gpu_mem: int = 4000
    cpu_threads: int = 2
    enable_mkldnn: bool = True
    use_tensorrt: bool = False
    precision: str = "fp32"
    """fp32; fp16 (GPU); bf16 (CPU with bfloat16 instructions: oneDNN runs :data:`BF16_OPS` in
    bfloat16, the OpenVINO engine the whole graph)."""
    min_subgraph_size: int = 3
    max_batch_size: int = 1
    use_openvino: bool = False
    """Run the graph in Paddle Inference's OpenVINO engine (CPU builds that ship it; legacy IR)."""


_PRECISIONS = {"fp32": "Float32", "fp16": "Half", "bf16": "Bfloat16"}
BF16_OPS = ("conv2d", "fused_conv2d", "pool2d")
"""The operators oneDNN runs in bfloat16 at ``precision="bf16"``: the backbone's convolutions and
poolings; everything after them (the statistics' products, resampling, smoothing) stays float32."""


def make_config(model_file: str, params_file: str, opts: PredictorOptions) -> inference.Config:
    """A Paddle Inference config for a ``model.json`` (PIR) or ``model.pdmodel`` (legacy) graph."""
    for path, what in ((model_file, "model"), (params_file, "params")):
        if not os.path.isfile(path):
            raise InputError(f"{path}: {what} file not found; export one with export_model.py")
    check_run_precision(opts)
    config = inference.Config(model_file, params_file)
    if opts.use_gpu:
        if opts.use_openvino:
            raise ConfigError("--use_openvino runs on the CPU: drop --use_gpu True or --use_openvino True")
        check_gpu(opts.gpu_id)
        precision = getattr(inference.PrecisionType, _PRECISIONS[opts.precision])
        # Without TensorRT, fp16 is Paddle's mixed-precision GPU inference (enable_use_gpu's mode).
        config.enable_use_gpu(opts.gpu_mem, opts.gpu_id,
                              inference.PrecisionType.Float32 if opts.use_tensorrt else precision)
        if opts.use_tensorrt:
            config.enable_tensorrt_engine(
                workspace_size=1 << 30,
                max_batch_size=opts.max_batch_size,
                min_subgraph_size=opts.min_subgraph_size,
                precision_mode=precision,
                use_static=False,
                use_calib_mode=False,
            )
    else:
        if opts.precision == "fp16" or opts.use_tensorrt:
            raise ConfigError("fp16 and TensorRT need a GPU: add --use_gpu True or drop them")
        if opts.use_openvino:
            _check_openvino(model_file)
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(opts.cpu_threads)
        if opts.enable_mkldnn:
            config.enable_mkldnn()
            if opts.precision == "bf16" and not opts.use_openvino:
                config.enable_mkldnn_bfloat16()
                config.set_bfloat16_op(set(BF16_OPS))
        else:
            config.disable_mkldnn()
    if opts.use_openvino:
        config.enable_openvino_engine(getattr(inference.PrecisionType, _PRECISIONS[opts.precision]))
    config.switch_ir_optim(True)
    if model_file.endswith(".json"):
        config.enable_new_executor()
    config.enable_memory_optim()
    config.disable_glog_info()
    return config


def _check_openvino(model_file: str) -> None:
    """One line unless Paddle Inference's OpenVINO engine can take ``model_file``."""
    if not model_file.endswith(".pdmodel"):
        raise ConfigError(f"--use_openvino: {model_file}: Paddle Inference's OpenVINO engine reads "
                          "legacy-IR graphs; export with --split (ortho, padim) or --format pdmodel")
    if not hasattr(inference.Config, "enable_openvino_engine"):
        raise ConfigError(f"--use_openvino: Paddle {paddle.__version__} has no OpenVINO engine; "
                          "install a paddlepaddle CPU build that has it (3.3.1 has) or drop --use_openvino")


def check_run_precision(opts: PredictorOptions) -> None:
    """One line for a precision these options, or this CPU, cannot run (before anything is loaded)."""
    if opts.precision not in _PRECISIONS:
        raise ConfigError(f"--precision {opts.precision}: use fp32, fp16 (GPU) or bf16 (CPU)")
    if opts.precision != "bf16":
        return
    if opts.use_gpu:
        raise ConfigError("--precision bf16 runs on the CPU: use --precision fp16 on a GPU, "
                          "or drop --use_gpu True")
    if not paddle.base.core.supports_bfloat16_fast_performance():
        raise ConfigError("--precision bf16: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX); "
                          "use --precision fp32")
    if not (opts.enable_mkldnn or opts.use_openvino):
        raise ConfigError("--precision bf16 runs through oneDNN or the OpenVINO engine: drop "
                          "--enable_mkldnn False, or add --use_openvino True")


class Predictor:
    """A Paddle Inference predictor with zero-copy handles: ``run(x) -> list of outputs``."""

    def __init__(self, model_file: str, params_file: str, opts: PredictorOptions) -> None:
        self.options = opts
        self.config = make_config(model_file, params_file, opts)
        # The OpenVINO engine caches its compiled model under the optim cache dir, by default
        # ./__cache__ of the working directory; it is read only while the predictor is built.
        cache = tempfile.TemporaryDirectory(prefix="orthoad-openvino-") if opts.use_openvino else None
        with cache or contextlib.nullcontext():
            if cache is not None:
                self.config.set_optim_cache_dir(cache.name)
            self._predictor = inference.create_predictor(self.config)
        self.input_names = self._predictor.get_input_names()
        self.output_names = self._predictor.get_output_names()

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """Feed ``inputs`` in input-name order and return every output as a numpy array."""
        for name, array in zip(self.input_names, inputs, strict=True):
            handle = self._predictor.get_input_handle(name)
            handle.reshape(list(array.shape))
            handle.copy_from_cpu(np.ascontiguousarray(array))
        self._predictor.run()
        return [self._predictor.get_output_handle(n).copy_to_cpu() for n in self.output_names]


def chained(first: Predictor, second: Predictor) -> Callable[[np.ndarray], list[np.ndarray]]:
    """A run function feeding ``first``'s first output to ``second`` (a split export's two graphs)."""

    def run(images: np.ndarray) -> list[np.ndarray]:
        return second.run(first.run(images)[0])

    return run
