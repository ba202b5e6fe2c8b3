"""anomalib's PaDiM timed in the peer venv; run by bench/bench_peers.py with that venv's python.

    <peer venv>/bin/python bench/peer_worker.py SPEC.json

Imports only the peer packages (torch, anomalib, onnxruntime, openvino) and numpy, never this
toolkit. SPEC (JSON): backbone, n_features, threads, warmup, train (.npy, (N, 3, S, S) float32,
already normalised), test (.npy, same layout), out (JSON written here), folder (scratch space),
fit_only (optional: stop after the fit, writing its wall and CPU seconds, and the error's
first line if anomalib's fit failed). Without fit_only, a failed fit (its inverse) is finished
with numpy's float64 inverse (``inverse_in_float64``) so that inference is still timed, and the
error is reported.
anomalib's PadimModel (random-initialised backbone, ``pre_trained=False``) is fitted on the training
images in batches of 32 (its forward in training mode, then ``fit()``, as its Lightning module
does), then each test image is scored at batch 1 by: the eager module, its ONNX export under ONNX
Runtime, and that ONNX model under OpenVINO with ``INFERENCE_PRECISION_HINT`` f32 and with the
default precision. Writes ms per image (every timed image), the fit seconds and the largest
difference between OpenVINO's f32 and default-precision maps.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def timed(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
          warmup: int, keep: bool = True) -> tuple[list[float], np.ndarray | None]:
    """Milliseconds of ``run`` on each image after ``warmup`` untimed ones, and (``keep``) its
    outputs for the timed images stacked (N, ...): the maps (N, 1, S, S) of a whole model."""
    for image in images[:warmup]:
        run(image[None])
    times, maps = [], []
    for image in images[warmup:]:
        start = time.perf_counter()
        out = run(image[None])
        times.append(1000.0 * (time.perf_counter() - start))
        if keep:
            maps.append(np.asarray(out)[0])
    return times, np.stack(maps) if keep else None


def inverse_in_float64(model, torch, chunk: int = 256) -> None:
    """anomalib's Gaussian of ``model``'s memory bank (B, C, H, W) as its ``fit`` forms it (mean,
    covariance + 0.01 I + 1e-5 I per position), in float64 by numpy, ``chunk`` positions at a time,
    stored in float32: the buffers inference reads, where anomalib's ``torch.linalg.inv`` failed."""
    flat = model.memory_bank.reshape(len(model.memory_bank), model.memory_bank.shape[1], -1)
    count, channels, positions = flat.shape
    ridge = (0.01 + 1e-5) * np.eye(channels)
    means, inverses = [], []
    for first in range(0, positions, chunk):
        part = flat[:, :, first : first + chunk].numpy().astype(np.float64).transpose(2, 0, 1)  # (p, B, C)
        mean = part.mean(axis=1)
        centred = part - mean[:, None]
        covariance = centred.transpose(0, 2, 1) @ centred / (count - 1) + ridge
        means.append(mean)
        inverses.append(np.linalg.inv(covariance).astype(np.float32))
    model.gaussian.mean = torch.from_numpy(np.ascontiguousarray(np.concatenate(means).T, dtype=np.float32))
    model.gaussian.inv_covariance = torch.from_numpy(np.concatenate(inverses))
    model.memory_bank = []


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import onnxruntime as ort
    import openvino as ov
    import torch
    from anomalib.models.image.padim.torch_model import PadimModel

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    folder = Path(spec["folder"])
    train = np.load(spec["train"], mmap_mode="r")
    test = np.load(spec["test"])
    model = PadimModel(backbone=spec["backbone"], pre_trained=False, n_features=spec["n_features"])
    model.train()
    start, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(train), 32):
        model(torch.from_numpy(np.array(train[first : first + 32])))
    error = None
    try:
        model.fit()
    except RuntimeError as exc:  # torch.linalg.inv of its covariances (torch 2.14 + oneMKL here)
        if "lu_solve" not in str(exc) and "singular" not in str(exc):
            raise
        error = str(exc).splitlines()[0]
    fit_seconds, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
    if error is not None and not spec.get("fit_only"):  # inference is still timed: the same Gaussian
        inverse_in_float64(model, torch)
    model.eval()
    if spec.get("fit_only"):
        Path(spec["out"]).write_text(json.dumps({"fit_seconds": fit_seconds, "fit_cpu_seconds": fit_cpu,
                                                 "fit_error": error, "train_images": len(train),
                                                 "torch": torch.__version__}))
        return 0

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).anomaly_map.numpy()

    result = {"fit_seconds": fit_seconds, "fit_error": error, "train_images": len(train),
              "torch": torch.__version__,
              "openvino": ov.__version__, "onnxruntime": ort.__version__}
    result["eager_ms"], _ = timed(eager, test, spec["warmup"])

    class MapOnly(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).anomaly_map

    class TrunkOnly(torch.nn.Module):  # the backbone's layer1..3 maps, as our "trunk alone"
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(self.inner(x).values())

    onnx_file, trunk_file = folder / "padim.onnx", folder / "trunk.onnx"
    torch.onnx.export(MapOnly(model).eval(), torch.from_numpy(test[:1]), str(onnx_file),
                      input_names=["image"], output_names=["anomaly_map"], dynamo=False)
    torch.onnx.export(TrunkOnly(model.feature_extractor).eval(), torch.from_numpy(test[:1]),
                      str(trunk_file), input_names=["image"], dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    result["onnxruntime_ms"], _ = timed(lambda x: session.run(None, {"image": x})[0], test, spec["warmup"])
    core = ov.Core()
    network = core.read_model(str(onnx_file))
    maps = {}
    for name, hint in (("openvino_f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("openvino_default", {})):
        compiled = core.compile_model(network, "CPU", {"INFERENCE_NUM_THREADS": spec["threads"], **hint})
        request = compiled.create_infer_request()
        result[f"{name}_precision"] = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        result[f"{name}_ms"], maps[name] = timed(
            lambda x, r=request: next(iter(r.infer({0: x}).values())), test, spec["warmup"])
    trunk = core.compile_model(core.read_model(str(trunk_file)), "CPU",
                               {"INFERENCE_NUM_THREADS": spec["threads"], "INFERENCE_PRECISION_HINT": "f32"})
    trunk_request = trunk.create_infer_request()
    result["openvino_f32_trunk_ms"], _ = timed(
        lambda x: next(iter(trunk_request.infer({0: x}).values())), test, spec["warmup"], keep=False)
    reference = maps["openvino_f32"]
    result["default_vs_f32_max_abs"] = float(np.abs(maps["openvino_default"] - reference).max())
    result["default_vs_f32_max_rel"] = float(result["default_vs_f32_max_abs"] / np.abs(reference).max())
    result["bf16_flags"] = sorted({flag for flag in Path("/proc/cpuinfo").read_text().split()
                                   if flag.startswith(("avx512_bf16", "amx_bf16"))})
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
