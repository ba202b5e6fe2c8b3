"""Score images with an exported model (Paddle Inference or onnxruntime): the outputs of predict.py.

    python infer.py --model_file export/bottle/model.json --params_file export/bottle/model.pdiparams \
        --input_file images/
"""

from __future__ import annotations

import argparse

import numpy as np

from deploy.benchmark import AutoLog, RunInfo, StageLog, StageTimes, open_log
from deploy.runner import BACKENDS, DeployedModel
from engine.cli import finite_float, non_negative_int, positive_int, run_main, str2bool
from engine.errors import ConfigError
from engine.inference import PredictorOptions
from engine.predict import BadInputs, Reporter, collect_images, output_names, report_all


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_file", required=True,
                        help="model.json, model.pdmodel or model.onnx of an export (or its folder)")
    parser.add_argument("--params_file", default=None,
                        help="model.pdiparams (default: the one beside the model file)")
    parser.add_argument("--stats", default=None,
                        help="stats.npz of a --no-fuse export (default: the one beside the model)")
    parser.add_argument("--input_file", required=True, help="an image file or a folder of images")
    parser.add_argument("--batch_size", type=positive_int, default=1, help="images per batch (default 1)")
    parser.add_argument("--use_gpu", type=str2bool, default=False, help="run on a GPU (default False)")
    parser.add_argument("--gpu_mem", type=positive_int, default=4000, help="initial GPU memory pool, MB")
    parser.add_argument("--gpu_id", type=non_negative_int, default=0, help="GPU device id (default 0)")
    parser.add_argument("--use_tensorrt", type=str2bool, default=False,
                        help="TensorRT subgraphs on the GPU (default False)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                        help="fp16 needs --use_gpu True (default fp32)")
    parser.add_argument("--enable_mkldnn", type=str2bool, default=True,
                        help="oneDNN on the CPU (default True)")
    parser.add_argument("--cpu_threads", type=positive_int, default=2, help="CPU math threads (default 2)")
    parser.add_argument("--save_path", default="./output/infer",
                        help="folder for the PNGs and results.jsonl (default ./output/infer)")
    parser.add_argument("--threshold", type=finite_float, default=None,
                        help="image-score threshold (default: the one in deploy.json)")
    parser.add_argument("--enable_benchmark", type=str2bool, default=False,
                        help="print stage times, memory and settings in auto_log's format")
    parser.add_argument("--backend", default="paddle", choices=tuple(BACKENDS),
                        help="paddle (Paddle Inference, default) or onnxruntime (model.onnx)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip unreadable images (each named on stderr; exit status 3) "
                             "instead of stopping at the first")
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> PredictorOptions:
    """Predictor options from the device, precision and CPU arguments."""
    return PredictorOptions(use_gpu=args.use_gpu, gpu_id=args.gpu_id, gpu_mem=args.gpu_mem,
                            cpu_threads=args.cpu_threads, enable_mkldnn=args.enable_mkldnn,
                            use_tensorrt=args.use_tensorrt, precision=args.precision,
                            max_batch_size=args.batch_size)


def open_reporter(args: argparse.Namespace, default_threshold: float | None) -> Reporter:
    """predict.py's reporter writing into --save_path, with --threshold or the exported one."""
    threshold = args.threshold if args.threshold is not None else default_threshold
    if threshold is None:
        raise ConfigError(f"{args.model_file}: deploy.json holds no threshold (the checkpoint was "
                          "never calibrated); pass --threshold")
    reporter = Reporter(args.save_path, threshold)
    try:
        reporter.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--save_path {args.save_path}: cannot create it ({exc.strerror}); "
                          "pass a writable folder") from exc
    return reporter


def open_benchmark(args: argparse.Namespace, deployed: DeployedModel) -> StageLog | AutoLog:
    """Warm the model up on one blank image (untimed) and open the benchmark log."""
    manifest, size = deployed.manifest, deployed.manifest.image_size
    deployed.score(np.zeros((1, 3, size, size), np.float32))
    k = f"_{manifest.k}" if manifest.k else ""  # patchcore has no k (0), as in its folder name
    name = f"{manifest.method}_{manifest.arch}{k}_{manifest.category}"
    return open_log(RunInfo(name, args.precision, args.batch_size, [-1, 3, size, size],
                            deployed.status, args.gpu_id if args.use_gpu else None))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = collect_images([args.input_file])
    deployed = DeployedModel.load(args.model_file, args.params_file, args.stats,
                                  options_from(args), args.backend)
    reporter = open_reporter(args, deployed.manifest.threshold)
    names = dict(zip(paths, output_names(paths), strict=True))
    log = open_benchmark(args, deployed) if args.enable_benchmark else None
    timer = log.times if log else StageTimes()
    bad = BadInputs(args.skip_bad)
    status = report_all(deployed.results(paths, args.batch_size, timer, bad), reporter, names, bad)
    if log:
        log.report(len(reporter.records))
    return status


if __name__ == "__main__":
    run_main(main)
