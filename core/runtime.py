"""Run a model's Paddle layers either eagerly or as a Paddle Inference predictor.

The inference runtime traces the layer to a static graph in a temporary folder and loads it with
Paddle Inference (oneDNN on CPU by default): on a 2-core CPU this is 2-3x faster than eager mode.
Both runtimes take and return numpy arrays, so callers do not care which one runs.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import paddle
from paddle import nn

from core.device import parse_device, set_cpu_threads
from core.errors import ConfigError
from core.inference import Predictor, PredictorOptions

RunFn = Callable[[np.ndarray], list[np.ndarray]]
Chunks = Iterator[tuple[slice, list[np.ndarray]]]
ENGINES = ("inference", "dynamic")
CPU_THREADS = min(os.cpu_count() or 1, 8)  # the default: the cores, at most 8


@dataclass
class Runtime:
    """Where and how the layers run: ``engine`` is "inference" or "dynamic".

    ``cpu_threads`` is the predictor's thread count and, on the CPU, also that of eager Paddle
    (training and the dynamic engine), set for the whole process when the runtime is made.
    """

    engine: str = "inference"
    device: str = "cpu"
    cpu_threads: int = CPU_THREADS
    enable_mkldnn: bool = True

    def __post_init__(self) -> None:
        if parse_device(self.device)[0] == "cpu":
            set_cpu_threads(self.cpu_threads)

    def predictor_options(self) -> PredictorOptions:
        """The Paddle Inference options of this runtime (device, threads, oneDNN)."""
        kind, index = parse_device(self.device)
        return PredictorOptions(
            use_gpu=kind == "gpu",
            gpu_id=index,
            cpu_threads=self.cpu_threads,
            enable_mkldnn=self.enable_mkldnn,
        )

    @property
    def chunk(self) -> int:
        """Images per call: 1 for oneDNN on the CPU (fastest there), else 0 (the whole batch)."""
        return 1 if parse_device(self.device)[0] == "cpu" and self.engine == "inference" else 0


def run_chunked(run: RunFn, images: np.ndarray, chunk: int) -> Chunks:
    """Run ``run`` on consecutive slices of ``chunk`` images (N, 3, S, S) (0 = all at once).

    Yields (slice of the batch, outputs of that slice), so callers consume results without the
    batch-sized concatenation.
    """
    step = chunk or len(images)
    for start in range(0, len(images), step):
        part = slice(start, start + step)
        yield part, run(np.ascontiguousarray(images[part], dtype=np.float32))


def save_static(layer: nn.Layer, input_shape: Sequence[int | None], path_prefix: str,
                name: str = "image") -> str:
    """Trace ``layer`` for inputs of ``input_shape`` (None = any) named ``name`` and save it;
    returns the model file.

    The file is ``<prefix>.json`` under Paddle 3's PIR or ``<prefix>.pdmodel`` under the legacy IR.
    """
    spec = [paddle.static.InputSpec(list(input_shape), "float32", name=name)]
    layer.eval()
    static = paddle.jit.to_static(layer, input_spec=spec, full_graph=True)
    paddle.jit.save(static, path_prefix)
    found = [p for p in glob.glob(path_prefix + ".*") if p.endswith((".json", ".pdmodel"))]
    if not found:
        raise ConfigError(f"{path_prefix}: Paddle wrote no model file")
    return found[0]


def compile_layer(layer: nn.Layer, image_size: int, runtime: Runtime) -> RunFn:
    """A function mapping images (N, 3, S, S) float32 to the layer's outputs as numpy arrays."""
    if runtime.engine not in ENGINES:
        raise ConfigError(f"--engine {runtime.engine}: use one of {', '.join(ENGINES)}")
    if runtime.engine == "dynamic":
        layer.eval()

        def run_dynamic(images: np.ndarray) -> list[np.ndarray]:
            with paddle.no_grad():
                outs = layer(paddle.to_tensor(images))
            outs = outs if isinstance(outs, list | tuple) else [outs]
            return [o.numpy() for o in outs]

        return run_dynamic
    with tempfile.TemporaryDirectory(prefix="orthoad-static-") as tmp:
        prefix = os.path.join(tmp, "model")
        model_file = save_static(layer, [None, 3, image_size, image_size], prefix)
        predictor = Predictor(model_file, prefix + ".pdiparams", runtime.predictor_options())
    return predictor.run
