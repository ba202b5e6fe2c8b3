"""Export fitted checkpoints to Paddle Inference folders (deploy.json beside the model) for infer.py.

    python export_model.py                 # every checkpoint of the default train.py run
    python export_model.py --model_path output/ortho_resnet18_100/bottle.npz --save_dir export/bottle
    python export_model.py --model_path output/patchcore_resnet18 --category bottle --save_dir export

A .npz is exported into --save_dir; a folder of checkpoints (default: train.py's
SAVE_PATH/<method>_<arch>_<k>) into --save_dir/<category>/, one export per checkpoint.
Method, arch, k and input size come from the checkpoint; the ones given are checked against it.
Every method (ortho, padim, spade, patchcore) exports fused; --no-fuse is ortho's and padim's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.errors import ConfigError, InputError
from core.kernels import FACTOR_DTYPES
from core.runtime import Runtime
from core.script import run_main
from deploy.export import FORMATS, HEADS, export_model
from engine.cli import (
    add_checkpoint_args,
    add_identity_args,
    checkpoint_folder,
    expected_identity,
)
from models import load_model

DEFAULT_SAVE_DIR = "./output/inference"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_args(parser, "train.py's --save_path, where the default checkpoints are",
                        "with a folder of checkpoints: a category or a comma list (default: all)")
    parser.add_argument("--save_dir", default=DEFAULT_SAVE_DIR,
                        help="export folder: model.*, model.pdiparams, deploy.json (and stats.npz, "
                             f"model.onnx); one sub-folder per category for a folder of checkpoints "
                             f"(default {DEFAULT_SAVE_DIR})")
    parser.add_argument("--format", default="json", choices=FORMATS,
                        help="json: PIR model.json (Paddle 3, default); pdmodel: legacy model.pdmodel")
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                        help="one graph for the whole pipeline (default); --no-fuse: backbone and "
                             "embedding graph plus stats.npz, finished in numpy by infer.py")
    parser.add_argument("--head", default="matmul", choices=HEADS,
                        help="fused scoring head: matmul (standard Paddle ops: CPU, GPU, TensorRT, "
                             "ONNX; default) or kernel (a compiled CPU operator, built with g++ on "
                             "first use: ortho/padim's distance over the packed Cholesky factor, about "
                             "2.4x faster; patchcore's nearest-patch search in one pruned sweep, "
                             "about 4x faster)")
    parser.add_argument("--head_precision", default="fp32", choices=list(FACTOR_DTYPES),
                        help="how --head kernel stores its statistics: fp32 (default), or fp16 / bf16 "
                             "(half the bytes read per image; the map moves by about 1e-4 / 1e-3 "
                             "relative, recorded in deploy.json)")
    parser.add_argument("--split", action="store_true",
                        help="cut the fused graph in two (ortho, padim): model.pdmodel, images to the "
                             "embedding in standard ops (legacy IR), which infer.py --use_openvino True "
                             "runs in Paddle Inference's OpenVINO engine (--precision bf16: in "
                             "bfloat16); head.json|pdmodel scores it")
    parser.add_argument("--onnx", action="store_true",
                        help="also write model.onnx with paddle2onnx (requirements-deploy.txt)")
    add_identity_args(parser, size_flags=("--img_size", "--crop_size"))
    return parser.parse_args(argv)


def export_jobs(source: Path, category: str | None, save_dir: Path) -> list[tuple[Path, Path]]:
    """(checkpoint, export folder) pairs: a .npz -> ``save_dir``; a folder -> ``save_dir/<category>``."""
    if source.suffix == ".npz":
        if category:
            raise ConfigError(f"--category {category}: picks from a folder of checkpoints, but "
                              f"--model_path {source} is one file; drop one of them")
        return [(source, save_dir)]
    if not source.is_dir():
        raise InputError(f"{source}: no such checkpoint folder; run train.py first, or pass "
                         "--model_path (or the --method/--arch/--k/--save_path of the training run)")
    if category:
        paths = [source / f"{name.strip()}.npz" for name in category.split(",")]
    else:
        paths = sorted(p for p in source.glob("*.npz") if not p.name.endswith(".fitstate.npz"))
        if not paths:
            raise InputError(f"{source}: holds no checkpoint (<category>.npz); train one first")
    return [(path, save_dir / path.stem) for path in paths]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = checkpoint_folder(args.model_path, args.save_path, args)
    expect = expected_identity(args, side="img_size")
    for path, save_dir in export_jobs(source, args.category, Path(args.save_dir)):
        model = load_model(str(path), expect=expect, runtime=Runtime(engine="dynamic"), final=True)
        manifest = export_model(model, save_dir, args.format, args.fuse, args.onnx, str(path),
                                args.head, args.head_precision, args.split)
        layout = "split" if manifest.head_file else "fused" if manifest.fused else "unfused"
        print(f"exported {layout} {manifest.run_name} "
              f"({manifest.category or 'no category'}) to {save_dir}: {', '.join(manifest.files)}, "
              "deploy.json")
        if "fp32_max_rel_diff" in manifest.verified:
            print(f"  {args.head_precision} head: maps and scores within "
                  f"{manifest.verified['fp32_max_rel_diff']:.1e} (relative) of the fp32 head "
                  "on the probe images")
    return 0


if __name__ == "__main__":
    run_main(main)
