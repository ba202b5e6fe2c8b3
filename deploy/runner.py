"""An export folder loaded for inference: its preprocessing, graph and (unfused) numpy tail.

    deployed = DeployedModel.load("export/model.json")
    maps, scores = deployed.score(images)   # images (N, 3, S, S) -> (N, S, S), (N,) float32

Every file is checked against deploy.json (identity and SHA-256) before anything runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle

from core.errors import ConfigError, InputError, ToolkitError
from core.inference import Predictor, PredictorOptions, chained
from core.kernels import SOURCES, load_kernel
from core.runtime import RunFn, run_chunked
from datasets import Preprocess
from deploy.benchmark import Timer, timed
from deploy.manifest import HEAD_PARAMS, MANIFEST, Manifest, check_file, read_manifest
from deploy.onnx_model import OnnxRunner
from deploy.postprocess import GaussianHead
from deploy.report import BadInputs, Result, batches
from deploy.stats import read_stats

BACKENDS = {"paddle": (".json", ".pdmodel"), "onnxruntime": (".onnx",)}


def _paddle_runner(model_file: Path, params_file: Path, options: PredictorOptions) -> Predictor:
    """A Paddle Inference predictor; a graph Paddle cannot load becomes one InputError."""
    try:
        return Predictor(str(model_file), str(params_file), options)
    except ToolkitError:
        raise
    except Exception as exc:  # Paddle raises assorted C++ error types for unloadable graphs
        reason = " ".join(str(exc).split())[:200]
        if options.use_openvino:
            raise ConfigError(f"--use_openvino: {model_file}: Paddle Inference {paddle.__version__} could "
                              f"not build its OpenVINO engine for it ({type(exc).__name__}: {reason}); run "
                              "without --use_openvino (which also shows whether the graph itself loads)"
                              ) from exc
        raise InputError(f"{model_file}: Paddle Inference {paddle.__version__} cannot load it with "
                         f"{params_file} ({type(exc).__name__}: {reason}); pass the params file exported "
                         "with it, or export again with this Paddle version") from exc


def _check_split_files(manifest: Manifest, folder: Path, model_path: Path, params: Path) -> None:
    """A split export runs its features graph with its params, then its head graph: refuse any other
    file given as the model or params, and a head graph or params not of this export."""
    for given, expected, what in ((model_path, manifest.model_file, "--model_file"),
                                  (params, manifest.params_file, "--params_file")):
        if given.name != expected:
            raise InputError(f"{what} {given}: {folder} is a split export, whose first graph is "
                             f"{expected} (its head runs after it); pass the export folder")
    check_file(manifest, folder, folder / str(manifest.head_file), "head model")
    check_file(manifest, folder, folder / HEAD_PARAMS, "head params")


def load_kernels(manifest: Manifest, folder: Path, options: PredictorOptions) -> None:
    """Register the compiled CPU operators an export's graph holds (deploy.json ``kernels``)."""
    if manifest.kernels and options.use_gpu:
        raise ConfigError(f"{folder}: exported with --head kernel, a compiled CPU operator; run it "
                          "without --use_gpu, or export again with --head matmul for a GPU")
    for name in manifest.kernels:
        if name not in SOURCES:
            raise InputError(f"{folder / MANIFEST}: needs the operator {name!r}, which this toolkit "
                             "does not have; export the model again with this version")
        load_kernel(name)


def paddle_status(predictor: Predictor) -> dict[str, object]:
    """The predictor's settings under auto_log's config keys (make_config enables memory_optim)."""
    config = predictor.config
    return {"runtime_device": "gpu" if config.use_gpu() else "cpu", "ir_optim": config.ir_optim(),
            "enable_memory_optim": True, "enable_tensorrt": config.tensorrt_engine_enabled(),
            "precision": predictor.options.precision, "enable_mkldnn": config.mkldnn_enabled(),
            "enable_openvino": predictor.options.use_openvino,
            "cpu_math_library_num_threads": config.cpu_math_library_num_threads()}


def _model_path(model_file: Path, manifest: Manifest, backend: str) -> Path:
    """``model_file`` itself, or the backend's model in the export folder ``model_file``."""
    if not model_file.is_dir():
        return model_file
    name = manifest.onnx_file if backend == "onnxruntime" else manifest.model_file
    if name is None:
        raise InputError(f"{model_file}: this export has no ONNX model; export it again with --onnx")
    return model_file / name


@dataclass
class DeployedModel:
    """A loaded export: ``forward`` runs the graph, ``finish`` turns its outputs into results."""

    manifest: Manifest
    run: RunFn
    chunk: int
    head: GaussianHead | None
    status: dict[str, object]
    folder: Path = Path()

    @classmethod
    def load(cls, model_file: str | Path, params_file: str | Path | None = None,
             stats_file: str | Path | None = None, options: PredictorOptions | None = None,
             backend: str = "paddle") -> DeployedModel:
        """Load an export; ``model_file`` is a model file or the export folder itself.

        ``params_file`` and ``stats_file`` default to the files deploy.json names beside the model.
        """
        if backend not in BACKENDS:
            raise ConfigError(f"--backend {backend}: use {' or '.join(BACKENDS)}")
        options = options or PredictorOptions()
        if backend == "onnxruntime" and (options.use_tensorrt or options.precision != "fp32"
                                         or options.use_openvino):
            raise ConfigError("--use_tensorrt, --use_openvino and --precision fp16 or bf16 apply to "
                              "--backend paddle")
        given = Path(model_file)
        folder = given if given.is_dir() else given.parent
        manifest = read_manifest(folder)
        model_path = _model_path(given, manifest, backend)
        if model_path.suffix not in BACKENDS[backend]:
            other = next(name for name in BACKENDS if name != backend)
            raise ConfigError(f"--model_file {model_path}: --backend {backend} runs "
                              f"{' or '.join(BACKENDS[backend])} files; pass one of those or "
                              f"add --backend {other}")
        check_file(manifest, folder, model_path, "model")
        head = cls._head(manifest, folder, stats_file)
        if backend == "onnxruntime":
            runner = OnnxRunner(model_path, options.cpu_threads, options.use_gpu, options.gpu_id)
            return cls(manifest, runner.run, 0, head, runner.status, folder)
        params = Path(params_file) if params_file else folder / manifest.params_file
        check_file(manifest, folder, params, "params")
        if options.use_openvino and manifest.kernels and not manifest.head_file:
            raise ConfigError(f"--use_openvino: {folder} holds a compiled operator inside its graph, "
                              "which OpenVINO cannot run; export it again with --split (ortho, padim) "
                              "or with --head matmul --format pdmodel")
        if manifest.head_file is not None:
            _check_split_files(manifest, folder, model_path, params)
        elif options.precision == "bf16" and not options.use_gpu:
            raise ConfigError(f"--precision bf16: runs the features graph of a --split export in bfloat16 "
                              f"and its head in float32; {folder} is not split: export it with --split "
                              "(ortho, padim) or drop --precision bf16")
        # A batch goes to the graph in one call when the export checked that oneDNN gives the same
        # results for it (deploy.json "batched"): then the statistics are read once per batch.
        # Otherwise oneDNN runs one image per call: Paddle 3.3's oneDNN has given wrong results
        # for PIR graphs fed batches > 1 (a 2-D @ 4-D broadcast matmul). The OpenVINO engine,
        # which the export does not run, always gets one image per call, and so does oneDNN in
        # bfloat16 (the export checked batches in float32 only).
        load_kernels(manifest, folder, options)
        one_by_one = options.enable_mkldnn and not options.use_gpu and (not manifest.batched
                                                                         or options.precision == "bf16")
        chunk = 1 if one_by_one or options.use_openvino else 0
        predictor = _paddle_runner(model_path, params, options)
        status = paddle_status(predictor)
        if manifest.head_file is None:
            return cls(manifest, predictor.run, chunk, head, status, folder)
        scorer = _paddle_runner(folder / manifest.head_file, folder / HEAD_PARAMS,
                                dataclasses.replace(options, use_openvino=False,
                                                    precision="fp32" if options.precision == "bf16"
                                                    else options.precision))
        return cls(manifest, chained(predictor, scorer), chunk, head, status, folder)

    @staticmethod
    def _head(manifest: Manifest, folder: Path, stats_file: str | Path | None) -> GaussianHead | None:
        """The numpy tail of an unfused export (None for a fused one)."""
        if manifest.fused:
            if stats_file:
                raise ConfigError(f"--stats {stats_file}: {folder} holds a fused export, which "
                                  "needs no stats file; drop --stats")
            return None
        path = Path(stats_file) if stats_file else folder / str(manifest.stats_file)
        path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
        stats = read_stats(path, manifest)
        check_file(manifest, folder, path, "stats")
        return GaussianHead(stats)

    @property
    def preprocess(self) -> Preprocess:
        """The training preprocessing: resize, centre crop to the input size, normalise."""
        return Preprocess(resize=self.manifest.resize, crop_size=self.manifest.image_size)

    def forward(self, images: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for images (N, 3, S, S) float32."""
        parts = [outs for _, outs in run_chunked(self.run, images, self.chunk)]
        return [np.concatenate(group) for group in zip(*parts, strict=True)]

    def finish(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps (N, S, S) and image scores (N,) from the graph's outputs."""
        amaps, scores = (outputs[0][:, 0], outputs[1]) if self.head is None else self.head(outputs[0])
        if not (np.isfinite(scores).all() and np.isfinite(amaps.sum(dtype=np.float64))):
            raise InputError(f"{self.folder}: the exported model gave NaN or inf anomaly scores; its "
                             "statistics are not finite: fit and export the model again")
        return amaps, scores

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps (N, S, S) and image scores (N,) of images (N, 3, S, S) float32."""
        return self.finish(self.forward(images))

    def results(self, paths: Sequence[Path], batch_size: int, timer: Timer,
                bad: BadInputs | None = None) -> Iterator[Result]:
        """(path, image (3, S, S), map (S, S), score) of each image file, batch by batch.

        ``timer`` is stamped the auto_log way: reading + preprocessing, inference, postprocessing
        of each batch; whatever the caller does with a result is not timed. An unreadable image
        goes to ``bad`` (default: raise).
        """
        for chunk, images in timed(batches(paths, self.preprocess, batch_size, bad), timer):
            outputs = self.forward(images)
            timer.stamp()
            amaps, scores = self.finish(outputs)
            timer.end(stamp=True)
            for path, image, amap, score in zip(chunk, images, amaps, scores, strict=True):
                yield path, image, amap, float(score)
