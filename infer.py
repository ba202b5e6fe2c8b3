"""Score images with an exported model (Paddle Inference or onnxruntime): the outputs of predict.py.

    python infer.py --model_file export/bottle/model.json --params_file export/bottle/model.pdiparams \
        --input_file images/
    python infer.py --use_gpu=False      # every export in ./output/inference, on its demo test images

--model_file also takes an export folder, or a folder of export folders (what export_model.py writes
for a folder of checkpoints: one per category), each then scored into SAVE_PATH/<category>/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from core.device import check_gpu
from core.errors import ConfigError, InputError
from core.inference import PredictorOptions, check_run_precision
from core.script import finite_float, non_negative_int, positive_int, run_main, str2bool
from datasets.synthetic import DEMO_ROOT
from deploy.benchmark import AutoLog, RunInfo, StageLog, StageTimes, open_log
from deploy.manifest import MANIFEST, Manifest
from deploy.report import BadInputs, Reporter, collect_images, output_names, report_all
from deploy.runner import BACKENDS, DeployedModel

DEFAULT_SAVE_DIR = "./output/inference"
"""export_model.py's default --save_dir."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_file", default=DEFAULT_SAVE_DIR,
                        help="model.json, model.pdmodel or model.onnx of an export, its folder, or a "
                             f"folder of export folders (default {DEFAULT_SAVE_DIR})")
    parser.add_argument("--model_name", default=None,
                        help="stem of the model file in the export folder (the reproduction's "
                             "argument; export_model.py writes 'model')")
    parser.add_argument("--params_file", default=None,
                        help="model.pdiparams (default: the one beside the model file)")
    parser.add_argument("--stats", default=None,
                        help="stats.npz of a --no-fuse export (default: the one beside the model)")
    parser.add_argument("--input_file", default=None,
                        help=f"an image file or a folder of images (default: the test images of the "
                             f"export's category in the demo data, {DEMO_ROOT}/<category>/test/*/)")
    parser.add_argument("--batch_size", type=positive_int, default=1, help="images per batch (default 1)")
    parser.add_argument("--use_gpu", type=str2bool, default=False, help="run on a GPU (default False)")
    parser.add_argument("--gpu_mem", type=positive_int, default=4000, help="initial GPU memory pool, MB")
    parser.add_argument("--gpu_id", type=non_negative_int, default=0, help="GPU device id (default 0)")
    parser.add_argument("--use_tensorrt", type=str2bool, default=False,
                        help="TensorRT subgraphs on the GPU (default False)")
    parser.add_argument("--precision", default="fp32",
                        help="fp32 (default); fp16 with --use_gpu True; bf16 on a CPU with bfloat16 "
                             "instructions: a --split export's features graph in bfloat16 (oneDNN, or "
                             "the OpenVINO engine with --use_openvino True), its head in float32")
    parser.add_argument("--use_openvino", type=str2bool, default=False,
                        help="CPU: run the graph in Paddle Inference's OpenVINO engine (a legacy-IR "
                             "export without compiled operators, or a --split export's features)")
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
                            use_openvino=args.use_openvino,
                            max_batch_size=args.batch_size)


def check_arguments(args: argparse.Namespace) -> None:
    """Stop on arguments that cannot run, before anything is loaded."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.precision == "int8":
        raise ConfigError("--precision int8: needs a quantised (calibrated int8) model, which "
                          "export_model.py does not make; use --precision fp32, fp16 with --use_gpu True, "
                          "or bf16 on the CPU")
    check_run_precision(options_from(args))  # the precisions core.inference knows, and bf16's needs
    if args.use_gpu and args.backend == "paddle":
        check_gpu(args.gpu_id)


def export_folders(model_file: Path) -> list[Path]:
    """The exports ``model_file`` names: itself (a model file or an export folder), or each
    sub-folder holding a deploy.json when it is a folder of exports."""
    if not model_file.is_dir() or (model_file / MANIFEST).is_file():
        return [model_file]
    return sorted(p.parent for p in model_file.glob(f"*/{MANIFEST}")) or [model_file]


def named_model(model_file: Path, model_name: str | None) -> Path:
    """``model_file``, or with --model_name the file of that stem in the export folder."""
    if model_name is None:
        return model_file
    if not model_file.is_dir():
        if model_file.stem != model_name:
            raise ConfigError(f"--model_name {model_name}: --model_file {model_file} has the stem "
                              f"{model_file.stem}; drop one of them")
        return model_file
    for suffix in (".json", ".pdmodel", ".onnx"):
        if (model_file / f"{model_name}{suffix}").is_file():
            return model_file / f"{model_name}{suffix}"
    raise InputError(f"{model_file}: holds no {model_name}.json, .pdmodel or .onnx; --model_name is the "
                     "model file's stem (export_model.py writes 'model'): drop it or fix it")


def demo_inputs(category: str) -> list[str]:
    """The demo data's test folders of ``category`` (infer.py without --input_file)."""
    test = DEMO_ROOT / category / "test"
    if not test.is_dir():
        raise InputError(f"{test}: no demo test images of category {category!r} (the export's); "
                         "pass the images to score with --input_file")
    return [str(folder) for folder in sorted(test.iterdir()) if folder.is_dir()]


def open_reporter(args: argparse.Namespace, save_path: Path, manifest: Manifest, source: Path) -> Reporter:
    """predict.py's reporter writing into ``save_path``, with --threshold or the exported one and the
    exported ``score_min`` (for the normalised score; ``source`` names the export)."""
    threshold = args.threshold if args.threshold is not None else manifest.threshold
    if threshold is None:
        raise ConfigError(f"{args.model_file}: deploy.json holds no threshold (the checkpoint was "
                          "never calibrated); pass --threshold")
    reporter = Reporter(str(save_path), threshold, manifest.score_min, f"{source} (deploy.json)")
    try:
        reporter.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--save_path {save_path}: cannot create it ({exc.strerror}); "
                          "pass a writable folder") from exc
    return reporter


def open_benchmark(args: argparse.Namespace, deployed: DeployedModel) -> StageLog | AutoLog:
    """Warm the model up on one blank image (untimed) and open the benchmark log."""
    manifest, size = deployed.manifest, deployed.manifest.image_size
    deployed.score(np.zeros((1, 3, size, size), np.float32))
    name = f"{manifest.run_name}_{manifest.category}"
    return open_log(RunInfo(name, args.precision, args.batch_size, [-1, 3, size, size],
                            deployed.status, args.gpu_id if args.use_gpu else None))


def infer_export(args: argparse.Namespace, model_file: Path, save_path: Path,
                 given: list[Path] | None) -> int:
    """Score ``given`` images (default: the export's demo test images) with one export.

    Returns the exit status: 0, or 3 when --skip_bad skipped images.
    """
    deployed = DeployedModel.load(named_model(model_file, args.model_name), args.params_file,
                                  args.stats, options_from(args), args.backend)
    paths = given if given is not None else collect_images(demo_inputs(deployed.manifest.category))
    reporter = open_reporter(args, save_path, deployed.manifest, model_file)
    names = dict(zip(paths, output_names(paths), strict=True))
    log = open_benchmark(args, deployed) if args.enable_benchmark else None
    timer = log.times if log else StageTimes()
    bad = BadInputs(args.skip_bad)
    status = report_all(deployed.results(paths, args.batch_size, timer, bad), reporter, names, bad)
    if log:
        log.report(len(reporter.records))
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_arguments(args)
    given = collect_images([args.input_file]) if args.input_file else None
    exports = export_folders(Path(args.model_file))
    nested = exports != [Path(args.model_file)]  # a folder of exports: one output folder each
    if nested and (args.params_file or args.stats):
        raise ConfigError(f"--model_file {args.model_file} holds {len(exports)} exports; --params_file "
                          "and --stats name one export's files: pass that export's folder as --model_file")
    save_path = Path(args.save_path)
    return max(infer_export(args, folder, save_path / folder.name if nested else save_path, given)
               for folder in exports)


if __name__ == "__main__":
    run_main(main)
