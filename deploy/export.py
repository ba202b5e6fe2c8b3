"""Export a fitted model to a deploy folder that infer.py (or any Paddle Inference user) runs.

Layouts:

* fused (default): one static graph, images (N, 3, S, S) -> (anomaly map (N, 1, S, S), image score
  (N,)), with the statistics as its parameters: ``model.json|pdmodel`` + ``model.pdiparams``.
* unfused: the graph stops at the embedding x (N, F, h, w) (trunk features, layer2/3 nearest-
  upsampled to layer1's grid); ``stats.npz`` holds the rest, finished in numpy (deploy.postprocess).
* split (``--split``): the fused graph cut in two: ``model.pdmodel`` + ``model.pdiparams`` map images
  to the embedding z (N, k, h, w) in standard ops and the legacy IR, which Paddle Inference's
  OpenVINO engine runs; ``head.json|pdmodel`` + ``head.pdiparams`` score z (any ``--head``).

Files are written to a staging folder beside the target, the graph (and the ONNX file) is run once
on a probe image and compared with the dynamic-graph layer, then the files are moved into place and
``deploy.json`` is written last. Staging folders left by a killed export (``.NAME.export-PID-*``
whose process is gone) are removed by the next export beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import paddle
from paddle import nn

from core.errors import ConfigError
from core.inference import Predictor, PredictorOptions, chained
from core.io import remove_stale_temporaries, staging_dir
from core.kernels import check_precision
from core.runtime import RunFn, compile_layer, save_static
from datasets import IMAGENET_MEAN, IMAGENET_STD
from deploy.manifest import (
    FORMAT_VERSION,
    HALF_FORMAT_VERSION,
    HEAD,
    HEAD_PARAMS,
    MANIFEST,
    SPLIT_FORMAT_VERSION,
    Manifest,
    sha256_file,
    write_manifest,
)
from deploy.onnx_model import ONNX, OnnxRunner, convert, require
from deploy.stats import STATS, write_stats
from models.base import AnomalyModel, UnfusedParts

FORMATS = ("json", "pdmodel")
HEADS = ("matmul", "kernel")
"""Scoring heads of a fused export: standard Paddle ops (any device, ONNX), or a compiled CPU
operator of core/csrc (CPU only; deploy.json lists it under ``kernels``): ortho's and padim's
Mahalanobis head, patchcore's nearest-patch search (AnomalyModel.kernels)."""
PARAMS = "model.pdiparams"
ARTEFACTS = ("model.json", "model.pdmodel", PARAMS, f"{PARAMS}.info", STATS, ONNX,
             f"{HEAD}.json", f"{HEAD}.pdmodel", HEAD_PARAMS, f"{HEAD}.pdiparams.info")
"""Files an export may leave in its folder; those a new export does not write are removed."""
PROBE_TOLERANCE = 1e-3
"""Largest accepted |exported - dynamic| / max|dynamic| on the probe image."""
PRECISION_TOLERANCE = 1e-2
"""Largest accepted deviation of a 16-bit ``--head_precision`` head from the float32 head on the
probe images (the rounding moves the magnetic-tile maps by 6e-5 in float16, 5e-4 in bfloat16; a
factor with values near float16's smallest normal number, 6e-5, would move them far more)."""
BATCH_PROBE = 3
"""Probe images run in one predictor call (oneDNN) to decide whether the export runs batches."""


def _pir_enabled() -> bool:
    """Whether Paddle traces to PIR by default (FLAGS_enable_pir_api, on in Paddle 3)."""
    try:
        return bool(paddle.get_flags("FLAGS_enable_pir_api")["FLAGS_enable_pir_api"])
    except ValueError:  # Paddle < 2.6 has no PIR at all
        return False


@contextlib.contextmanager
def ir_guard(fmt: str) -> Iterator[None]:
    """Trace and save under the IR that writes ``model.<fmt>``: PIR (json) or legacy (pdmodel)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: use json or pdmodel")
    if fmt == "json" and int(paddle.__version__.split(".")[0]) < 3:
        raise ConfigError(f"--format json needs Paddle 3; this is Paddle {paddle.__version__}: "
                          "use --format pdmodel")
    pir = _pir_enabled()
    if fmt == "pdmodel" and pir:
        guard = paddle.pir_utils.DygraphOldIrGuard()
    elif fmt == "json" and not pir:
        guard = paddle.pir_utils.DygraphPirGuard()
    else:
        guard = contextlib.nullcontext()
    with guard:
        yield


def probe_image(size: int, count: int = 1) -> np.ndarray:
    """Fixed pseudo-random normalised images (count, 3, S, S) float32 for checking exports."""
    return np.random.default_rng(0).standard_normal((count, 3, size, size)).astype(np.float32)


def deviation(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """Largest |actual - expected| / max|expected| over pairs of outputs."""
    return float(np.max([np.abs(a - e).max() / max(np.abs(e).max(), 1e-12)  # NaN stays NaN
                         for a, e in zip(actual, expected, strict=True)]))


def batch_deviation(run: RunFn, probes: np.ndarray, expected: list[np.ndarray]) -> float | None:
    """:func:`deviation` of ``run(probes)`` (several images in one call); None if the call fails
    (Paddle 3.3's oneDNN has crashed on batches of some graphs: those run one image per call)."""
    try:
        worst = deviation(run(probes), expected)
    except Exception:  # noqa: BLE001 - Paddle raises assorted C++ error types
        return None
    return worst if np.isfinite(worst) else None  # deploy.json is JSON: no NaN


def check_outputs(run: RunFn, expected: list[np.ndarray], probe: np.ndarray, what: Path) -> float:
    """Largest relative deviation of ``run(probe)`` from ``expected``; ConfigError past tolerance."""
    worst = deviation(run(probe), expected)
    if not worst <= PROBE_TOLERANCE:
        raise ConfigError(f"{what}: the exported graph's outputs differ from the model's by "
                          f"{worst:.2e} (relative) on a test image; this Paddle/runtime does not "
                          "reproduce the model: try the other --format or report the versions")
    return worst


def _outputs(model: AnomalyModel, names: list[str], unfused: UnfusedParts | None) -> list[dict[str, object]]:
    """The graph outputs' names, meanings and shapes (-1 = batch) for deploy.json."""
    size = model.config.image_size
    if unfused is None:
        return [{"name": names[0], "meaning": "anomaly_map", "shape": [-1, 1, size, size]},
                {"name": names[1], "meaning": "image_score", "shape": [-1]}]
    h, w = unfused.meta["grid"]
    return [{"name": names[0], "meaning": "embedding", "shape": [-1, unfused.meta["features"], h, w]}]


def _identity(model: AnomalyModel) -> dict[str, object]:
    """What deploy.json and stats.npz record of the model: method, arch, k (0: the method has
    none), category, input sizes."""
    config = model.config
    return {"method": config.method, "arch": config.arch, "k": config.identity().get("k", 0),
            "category": model.category, "image_size": config.image_size, "resize": config.resize}


def export_model(model: AnomalyModel, save_dir: Path, fmt: str = "json", fuse: bool = True,
                 onnx: bool = False, source: str = "", head: str = "matmul",
                 head_precision: str = "fp32", split: bool = False) -> Manifest:
    """Export ``model`` to ``save_dir`` (see the module docstring) and return its deploy.json.

    Every method exports fused (its ``fused_layer``); ``fuse=False`` needs a method with
    :meth:`unfused_parts` (ortho, padim); ``head="kernel"`` is ortho's and padim's fused export
    with :meth:`kernel_layer` (see :data:`HEADS`; patchcore's too, with ``head_precision`` fp32),
    its factor stored as ``head_precision`` (a key of core.kernels.FACTOR_DTYPES; a 16-bit export
    records its deviation from the float32 head on the probe images in deploy.json's
    ``verified.fp32_max_rel_diff``). ``split`` writes the split layout (``model.split_layer``).
    """
    check_head(head, fuse, onnx, head_precision, split)
    if head == "kernel":
        model.check_kernel_head(head_precision)
    model.check_statistics(source or f"{model.config.method} model", "fit it again")
    if split:
        model.check_split()
    if save_dir.exists() and not save_dir.is_dir():
        raise ConfigError(f"--save_dir {save_dir}: is a file; pass a folder")
    if not fuse and model.unfused_parts() is None:
        raise ConfigError(f"--no-fuse: --method {model.config.method} has no unfused layout "
                          "(ortho and padim have); drop --no-fuse to export it fused")
    try:
        save_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(save_dir.parent)
        staging = staging_dir(save_dir, "export")
    except OSError as exc:
        raise ConfigError(f"--save_dir {save_dir}: cannot write there ({exc.strerror}); "
                          "pass a writable folder") from exc
    try:
        manifest = _build(model, staging, fmt, fuse, onnx, source, head, head_precision, split)
        _publish(staging, save_dir, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def check_head(head: str, fuse: bool, onnx: bool, precision: str = "fp32", split: bool = False) -> None:
    """One line for a head (or head precision, or ``--split``) that does not fit the other options."""
    if head not in HEADS:
        raise ConfigError(f"--head {head}: use {' or '.join(HEADS)}")
    check_precision(precision)
    if head == "kernel" and (not fuse or onnx):
        raise ConfigError(f"--head kernel: a compiled CPU operator inside the fused graph, so it "
                          f"cannot go with {'--no-fuse' if not fuse else '--onnx'}; drop one of them")
    if split and (not fuse or onnx):
        raise ConfigError(f"--split: cuts the fused graph in two for Paddle Inference, so it cannot go "
                          f"with {'--no-fuse' if not fuse else '--onnx'}; drop one of them")
    if precision != "fp32" and head != "kernel":
        raise ConfigError(f"--head_precision {precision}: stores the compiled head's statistics in 16 "
                          "bits, so it needs --head kernel; add it, or drop --head_precision")


def check_precision_cost(outputs: list[np.ndarray], reference: list[np.ndarray], precision: str) -> float:
    """:func:`deviation` of a 16-bit head's outputs from the float32 head's; ConfigError past
    :data:`PRECISION_TOLERANCE`."""
    worst = deviation(outputs, reference)
    if not worst <= PRECISION_TOLERANCE:
        raise ConfigError(f"--head_precision {precision}: the 16-bit head's outputs differ from the float32 "
                          f"head's by {worst:.2e} (relative) on the test images, more than "
                          f"{PRECISION_TOLERANCE:g}; export with the other 16-bit precision (fp16 keeps "
                          "more bits, bf16 a wider range) or fp32")
    return worst


def _build(model: AnomalyModel, staging: Path, fmt: str, fuse: bool, onnx: bool, source: str,
           head: str, head_precision: str, split: bool) -> Manifest:
    """Write the export's files into ``staging`` and return their manifest."""
    if onnx:
        require("paddle2onnx", "--onnx")
        require("onnxruntime", "--onnx")
    size = model.config.image_size
    probes = probe_image(size, BATCH_PROBE)
    # eagerly in the model's own runtime: a default Runtime() would reset the process's threads
    eager = dataclasses.replace(model.runtime, engine="dynamic")
    # a 16-bit head is compared with the float32 head, run first so that one factor is held at a time
    reference = compile_layer(model.kernel_layer(), size, eager)(probes) if head_precision != "fp32" else None
    unfused = None if fuse else model.unfused_parts()
    if unfused is not None:
        layer = unfused.layer
    else:
        layer = model.kernel_layer(head_precision) if head == "kernel" else model.fused_layer()
    expected_all = compile_layer(layer, size, eager)(probes)
    probe, expected = probes[:1], [out[:1] for out in expected_all]
    verified: dict[str, float | None] = {}
    if reference is not None:
        verified["fp32_max_rel_diff"] = check_precision_cost(expected_all, reference, head_precision)
    parts = model.split_layer(layer) if split else None
    with ir_guard(fmt if parts is None else "pdmodel"):
        model_file = Path(save_static(layer if parts is None else parts[0], [None, 3, size, size],
                                      str(staging / "model")))
    predictor = Predictor(str(model_file), str(staging / PARAMS), PredictorOptions())
    run, output_names, head_file = predictor.run, predictor.output_names, None
    files = [model_file.name, PARAMS]
    if parts is not None:
        head_file, run, output_names = _save_head(parts[1], predictor, staging, fmt, probe)
        files += [head_file, HEAD_PARAMS]
    verified["paddle_max_rel_diff"] = check_outputs(run, expected, probe, model_file)
    batch_diff = verified["paddle_batch_max_rel_diff"] = batch_deviation(run, probes, expected_all)
    if unfused is not None:
        write_stats(staging / STATS, {**_identity(model), **unfused.meta, "threshold": model.threshold},
                    unfused.arrays)
        files.append(STATS)
    if onnx:
        convert(model_file, staging / PARAMS, staging / ONNX)
        runner = OnnxRunner(staging / ONNX, cpu_threads=2)
        verified["onnx_max_rel_diff"] = check_outputs(runner.run, expected, probe, staging / ONNX)
        files.append(ONNX)
    return Manifest(
        **_identity(model), run_name=model.config.run_name,
        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), threshold=model.threshold,
        score_min=model.score_min, fused=fuse,
        format=fmt, model_file=model_file.name, params_file=PARAMS,
        inputs=[{"name": predictor.input_names[0], "shape": [-1, 3, size, size],
                 "dtype": "float32", "layout": "NCHW", "color": "RGB"}],
        outputs=_outputs(model, output_names, unfused), paddle_version=paddle.__version__,
        batched=batch_diff is not None and batch_diff <= PROBE_TOLERANCE,
        stats_file=None if fuse else STATS, onnx_file=ONNX if onnx else None,
        kernels=list(model.kernels) if head == "kernel" else [], head_precision=head_precision,
        head_file=head_file, format_version=SPLIT_FORMAT_VERSION if parts is not None else
        FORMAT_VERSION if head_precision == "fp32" else HALF_FORMAT_VERSION,
        files={name: sha256_file(staging / name) for name in files}, verified=verified,
        source={"checkpoint": source,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    )


def _save_head(tail: nn.Layer, features: Predictor, staging: Path, fmt: str,
               probe: np.ndarray) -> tuple[str, RunFn, list[str]]:
    """Save a split export's scoring graph (its input shaped like the features graph's output on
    ``probe``); returns its file name, the two graphs chained, and the chain's output names."""
    shape = features.run(probe)[0].shape
    with ir_guard(fmt):
        head_file = Path(save_static(tail, [None, *shape[1:]], str(staging / HEAD), name="embedding"))
    scorer = Predictor(str(head_file), str(staging / HEAD_PARAMS), PredictorOptions())
    return head_file.name, chained(features, scorer), scorer.output_names


def _publish(staging: Path, save_dir: Path, manifest: Manifest) -> None:
    """Move the staged files into ``save_dir``, drop stale artefacts, write deploy.json last."""
    save_dir.mkdir(exist_ok=True)
    (save_dir / MANIFEST).unlink(missing_ok=True)
    for name in ARTEFACTS:
        if name not in manifest.files:
            (save_dir / name).unlink(missing_ok=True)
    for name in manifest.files:
        os.replace(staging / name, save_dir / name)
    write_manifest(save_dir, manifest)
