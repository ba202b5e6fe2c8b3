"""First run on a new GPU machine: fit, export and infer the demo data on the GPU and on the CPU.

    pip install -r requirements-gpu.txt
    python bench/gpu_check.py [--category tiles] [--k 100] [--resize 256] [--gpu_id 0]
                              [--use_tensorrt] [--precision fp16] [--pretrained none]

On the demo data (generated into data/demo if missing, as train.py does), with one seed:
1. fits and calibrates the model twice, with the layers on GPU --gpu_id and on the CPU, and scores
   the test images with each fit (train.py / predict.py's code path, --engine inference);
2. exports the GPU fit (fused, model.json, in a temporary folder) and runs the export through
   Paddle Inference on the GPU (config.enable_use_gpu; with --use_tensorrt, enable_tensorrt_engine
   at --precision) and on the CPU (oneDNN), infer.py's code path.
Prints the time of every step and the largest score difference, relative to the largest score:
GPU fit vs CPU fit, GPU export vs CPU export, GPU export vs the GPU fit's own scores. fp32 results
agree to about 1e-4; fp16 moves them by about 1e-3.

On a CPU-only Paddle build (paddle.device.is_compiled_with_cuda() false) it stops with one line.
The backbone defaults to ImageNet weights (Paddle's download); --pretrained none needs no download.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", message="No ccache found")  # as engine/__init__.py: not actionable
import paddle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.device import check_gpu, select_device  # noqa: E402
from core.errors import ConfigError  # noqa: E402
from core.inference import PredictorOptions  # noqa: E402
from core.runtime import Runtime  # noqa: E402
from core.script import run_main  # noqa: E402
from datasets import AnomalyDataset, BatchLoader, Preprocess, list_samples, read_image  # noqa: E402
from datasets.synthetic import DEMO_ROOT, generate  # noqa: E402
from deploy import DeployedModel, export_model  # noqa: E402
from models import AnomalyModel, ModelConfig, build_model, load_model, model_config  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="tiles", help="demo category (tiles or disc; default tiles)")
    parser.add_argument("--method", default="ortho", help="ortho, padim, spade or patchcore (default ortho)")
    parser.add_argument("--arch", default="resnet18", help="backbone (default resnet18)")
    parser.add_argument("--k", type=int, default=None, help="k (default: the method's)")
    parser.add_argument("--resize", type=int, default=256, help="input side (default 256)")
    parser.add_argument("--pretrained", default="imagenet", help="imagenet, PATH.pdparams or none")
    parser.add_argument("--batch_size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--gpu_id", type=int, default=0, help="GPU device id (default 0)")
    parser.add_argument("--use_tensorrt", action="store_true", help="TensorRT for the GPU export run")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                        help="precision of the GPU export run (default fp32)")
    return parser.parse_args(argv)


def timed(step: Callable[[], object]) -> tuple[object, float]:
    """(result of ``step()``, seconds it took)."""
    start = time.perf_counter()
    result = step()
    return result, time.perf_counter() - start


def scores_of(score: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], images: np.ndarray,
              batch_size: int) -> np.ndarray:
    """Image scores (N,) of images (N, 3, S, S) through ``score``, ``batch_size`` at a time."""
    return np.concatenate([score(images[i:i + batch_size])[1] for i in range(0, len(images), batch_size)])


def fit_on(device: str, config: ModelConfig, train: AnomalyDataset, batch_size: int) -> AnomalyModel:
    """A model fitted and calibrated with its layers on ``device`` ("gpu:N" or "cpu")."""
    select_device(device)
    model = build_model(config, Runtime(engine="inference", device=device))
    model.category = "gpu_check"
    model.fit(BatchLoader(train, batch_size, 0))
    model.calibrate(BatchLoader(train, batch_size, 0))
    return model


def largest_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|."""
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), 1e-12))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not paddle.device.is_compiled_with_cuda():
        raise ConfigError("this Paddle build is CPU-only (paddle.device.is_compiled_with_cuda() is "
                          "False): install the GPU build (pip install -r requirements-gpu.txt, README "
                          "'GPU') and run bench/gpu_check.py again")
    check_gpu(args.gpu_id)
    gpu = f"gpu:{args.gpu_id}"
    root = generate(DEMO_ROOT)
    pre = Preprocess(resize=args.resize)
    train = AnomalyDataset(list_samples(root, args.category, "train"), pre)
    tests = [s.path for s in list_samples(root, args.category, "test")]
    images = np.stack([pre(read_image(p)) for p in tests])
    config = model_config(args.method, strict=False, arch=args.arch, k=args.k,
                          image_size=args.resize, resize=args.resize, pretrained=args.pretrained, seed=0)
    rows: list[tuple[str, str, float]] = []

    fitted: dict[str, AnomalyModel] = {}
    scores: dict[str, np.ndarray] = {}
    for device in (gpu, "cpu"):
        fitted[device], seconds = timed(lambda d=device: fit_on(d, config, train, args.batch_size))
        rows.append(("fit + threshold", device, seconds))
        scores[device], seconds = timed(lambda d=device: scores_of(fitted[d].score, images, args.batch_size))
        rows.append((f"score {len(images)} test images", device, seconds))

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        checkpoint = Path(tmp) / "model.npz"
        fitted[gpu].save(str(checkpoint))
        select_device("cpu")
        on_cpu = load_model(str(checkpoint), runtime=Runtime(engine="dynamic"))
        _, seconds = timed(lambda: export_model(on_cpu, Path(tmp) / "export", "json"))
        rows.append(("export (fused, json)", "cpu", seconds))
        options = {gpu: PredictorOptions(use_gpu=True, gpu_id=args.gpu_id, use_tensorrt=args.use_tensorrt,
                                         precision=args.precision, max_batch_size=args.batch_size),
                   "cpu": PredictorOptions()}
        served: dict[str, np.ndarray] = {}
        for device, opts in options.items():
            deployed = DeployedModel.load(Path(tmp) / "export", options=opts)
            scores_of(deployed.score, images[:1], 1)  # warm-up (TensorRT builds its engine here)
            served[device], seconds = timed(lambda d=deployed: scores_of(d.score, images, args.batch_size))
            rows.append((f"infer {len(images)} test images (export)", device, seconds))

    print(f"Paddle {paddle.__version__}, CUDA {paddle.version.cuda()}, cuDNN {paddle.version.cudnn()}, "
          f"{paddle.device.cuda.get_device_name(args.gpu_id)}; {args.method} {args.arch}, "
          f"{args.resize} px, demo category {args.category}, {len(train)} training images")
    print("| step | device | seconds |\n|---|---|---|")
    for step, device, seconds in rows:
        print(f"| {step} | {device} | {seconds:.2f} |")
    engine = f"{args.precision}{', TensorRT' if args.use_tensorrt else ''}"
    print("largest score difference, GPU fit vs CPU fit: "
          f"{largest_difference(scores[gpu], scores['cpu']):.2e}")
    print(f"largest score difference, GPU export ({engine}) vs CPU export: "
          f"{largest_difference(served[gpu], served['cpu']):.2e}")
    print("largest score difference, GPU export vs the GPU fit: "
          f"{largest_difference(served[gpu], scores[gpu]):.2e}")
    return 0


if __name__ == "__main__":
    run_main(main)
