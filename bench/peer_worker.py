"""anomalib's PaDiM timed in the peer venv; run by bench/bench_peers.py with that venv's python.

    <peer venv>/bin/python bench/peer_worker.py SPEC.json

Imports only the peer packages (torch, torchvision, anomalib, onnxruntime, openvino) and numpy, never
this toolkit. SPEC (JSON): backbone, n_features, threads, warmup, seed (torch's, for the backbone's
initialisation and the channel choice), network (optional: "timm", the default, keeps timm's
initialisation, whose ``zero_init_last`` zeroes the last BatchNorm scale of every residual block, so
that each block starts as its shortcut; "active" sets those scales to 1, as torchvision and Paddle
initialise them, so that every block's convolutions count), train (.npy, (N, 3, S, S) float32, already
normalised), test (.npy, same layout), out (JSON written here), folder (scratch space), fit_only
(optional: stop after the fit, writing its wall and CPU seconds, and the error's first line if
anomalib's fit failed), timed (optional, default true: false skips the timings), score (optional .npy,
same layout: images whose OpenVINO f32 and default-precision maps (N, S, S) are written to
``maps_openvino_f32.npy`` and ``maps_openvino_default.npy`` in folder). Without fit_only, a failed fit
(its inverse) is finished with numpy's float64 inverse (``inverse_in_float64``) so that inference still
runs, and the error is reported.

anomalib's PadimModel (random-initialised backbone, ``pre_trained=False``) is created, its backbone
(after ``network``) written to folder as ``network.pth`` in torchvision's layout (``share_network``) and
its channel indices as ``channels.npy``, so that the toolkit can run the same network; then it is fitted
on the training images in batches of 32 (its forward in training mode, then ``fit()``, as its Lightning
module does), and each test image is scored at batch 1 by: the eager module, its ONNX export under ONNX
Runtime, and that ONNX model under OpenVINO with ``INFERENCE_PRECISION_HINT`` f32 and with the default
precision. Writes ms per image (every timed image) and the fit seconds.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def timed(run: Callable[[np.ndarray], object], images: np.ndarray, warmup: int) -> list[float]:
    """Milliseconds of ``run`` on each image after ``warmup`` untimed ones."""
    for image in images[:warmup]:
        run(image[None])
    times = []
    for image in images[warmup:]:
        start = time.perf_counter()
        run(image[None])
        times.append(1000.0 * (time.perf_counter() - start))
    return times


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


def activate_blocks(model, torch) -> None:
    """Undo timm's ``zero_init_last``: the last BatchNorm scale of every residual block (bn3 of a
    bottleneck, bn2 of a basic block) back to 1, as torchvision and Paddle initialise it."""
    for module in model.feature_extractor.modules():
        if hasattr(module, "zero_init_last"):
            last = module.bn3 if hasattr(module, "bn3") else module.bn2
            torch.nn.init.ones_(last.weight)


def share_network(model, spec: dict, torch) -> None:
    """Write ``model``'s backbone as a torchvision state dict (``network.pth``: layer4 and fc, which
    the feature extractor drops and layer1-3 never use, from a freshly initialised torchvision
    model) and its channel indices (k,) as ``channels.npy``, both in spec's folder."""
    import torchvision

    state = getattr(torchvision.models, spec["backbone"])().state_dict()
    trunk = model.feature_extractor.feature_extractor.state_dict()
    foreign = sorted(set(trunk) - set(state))
    if foreign or any(not name.startswith(("layer4.", "fc.")) for name in set(state) - set(trunk)):
        raise SystemExit(f"error: timm's {spec['backbone']} names differ from torchvision's: {foreign[:3]}")
    state.update(trunk)
    folder = Path(spec["folder"])
    torch.save(state, folder / "network.pth")
    np.save(folder / "channels.npy", model.idx.numpy())


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import onnxruntime as ort
    import openvino as ov
    import torch
    from anomalib.models.image.padim.torch_model import PadimModel

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec.get("seed", 0))
    folder = Path(spec["folder"])
    train = np.load(spec["train"], mmap_mode="r")
    test = np.load(spec["test"])
    model = PadimModel(backbone=spec["backbone"], pre_trained=False, n_features=spec["n_features"])
    if spec.get("network", "timm") == "active":
        activate_blocks(model, torch)
    if not spec.get("fit_only"):
        share_network(model, spec, torch)
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
    if error is not None and not spec.get("fit_only"):  # inference still runs: the same Gaussian
        inverse_in_float64(model, torch)
    model.eval()
    if spec.get("fit_only"):
        Path(spec["out"]).write_text(json.dumps({"fit_seconds": fit_seconds, "fit_cpu_seconds": fit_cpu,
                                                 "fit_error": error, "train_images": len(train),
                                                 "torch": torch.__version__}))
        return 0
    result = {"fit_seconds": fit_seconds, "fit_error": error, "train_images": len(train),
              "torch": torch.__version__, "openvino": ov.__version__, "onnxruntime": ort.__version__,
              "bf16_flags": sorted({flag for flag in Path("/proc/cpuinfo").read_text().split()
                                    if flag.startswith(("avx512_bf16", "amx_bf16"))})}
    timed_runs = spec.get("timed", True)

    class MapOnly(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).anomaly_map

    onnx_file = folder / "padim.onnx"
    torch.onnx.export(MapOnly(model).eval(), torch.from_numpy(test[:1]), str(onnx_file),
                      input_names=["image"], output_names=["anomaly_map"], dynamo=False)
    core = ov.Core()
    network = core.read_model(str(onnx_file))
    requests = {}
    for name, hint in (("openvino_f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("openvino_default", {})):
        compiled = core.compile_model(network, "CPU", {"INFERENCE_NUM_THREADS": spec["threads"], **hint})
        requests[name] = compiled.create_infer_request()
        result[f"{name}_precision"] = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    runs = {name: (lambda x, r=request: next(iter(r.infer({0: x}).values())))
            for name, request in requests.items()}
    if timed_runs:
        result.update(timings(model, runs, spec, test, onnx_file, torch, ort, ov))
    if spec.get("score"):
        images = np.load(spec["score"], mmap_mode="r")
        for name, run in runs.items():
            maps = np.stack([np.asarray(run(np.array(images[i : i + 1])))[0, 0] for i in range(len(images))])
            np.save(folder / f"maps_{name}.npy", maps)
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def timings(model, runs: dict[str, Callable[[np.ndarray], np.ndarray]], spec: dict, test: np.ndarray,
            onnx_file: Path, torch, ort, ov) -> dict:
    """ms per image of the eager module, ONNX Runtime, OpenVINO (``runs``: f32 and default) and the
    backbone's layer1-3 alone on OpenVINO f32."""
    threads, warmup = spec["threads"], spec["warmup"]

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).anomaly_map.numpy()

    class TrunkOnly(torch.nn.Module):  # the backbone's layer1..3 maps, as our "trunk alone"
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(self.inner(x).values())

    result = {}
    result["eager_ms"] = timed(eager, test, warmup)
    trunk_file = onnx_file.with_name("trunk.onnx")
    torch.onnx.export(TrunkOnly(model.feature_extractor).eval(), torch.from_numpy(test[:1]),
                      str(trunk_file), input_names=["image"], dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    result["onnxruntime_ms"] = timed(lambda x: session.run(None, {"image": x})[0], test, warmup)
    for name, run in runs.items():
        result[f"{name}_ms"] = timed(run, test, warmup)
    core = ov.Core()
    trunk = core.compile_model(core.read_model(str(trunk_file)), "CPU",
                               {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    trunk_request = trunk.create_infer_request()
    result["openvino_f32_trunk_ms"] = timed(
        lambda x: next(iter(trunk_request.infer({0: x}).values())), test, warmup)
    return result


if __name__ == "__main__":
    sys.exit(main())
