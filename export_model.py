"""Export a fitted checkpoint to a Paddle Inference folder (deploy.json beside the model) for infer.py.

    python export_model.py --method ortho --arch resnet18 --k 100 \
        --model_path output/ortho_resnet18_100/bottle.npz --save_dir export/bottle
    python export_model.py --method patchcore --model_path output/patchcore_resnet18/bottle.npz \
        --save_dir export/bottle_patchcore

Every method (ortho, padim, spade, patchcore) exports fused; --no-fuse is ortho's and padim's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deploy.export import FORMATS, export_model
from engine.cli import image_side, positive_int, run_main
from engine.runtime import Runtime
from models import load_model, resolve_k


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ortho",
                        help="method of the checkpoint: ortho (default), padim, spade or patchcore")
    parser.add_argument("--arch", default="resnet18", help="backbone of the checkpoint (default resnet18)")
    parser.add_argument("--k", type=positive_int, default=None,
                        help="k of the checkpoint (default: the method's, ortho/padim 100, spade 50; "
                             "patchcore has none)")
    parser.add_argument("--model_path", required=True, help="the checkpoint .npz written by train.py")
    parser.add_argument("--save_dir", required=True,
                        help="folder for model.*, model.pdiparams, deploy.json (and stats.npz, model.onnx)")
    parser.add_argument("--img_size", type=image_side, default=256,
                        help="network input side of the checkpoint (default 256)")
    parser.add_argument("--format", default="json", choices=FORMATS,
                        help="json: PIR model.json (Paddle 3, default); pdmodel: legacy model.pdmodel")
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                        help="one graph for the whole pipeline (default); --no-fuse: backbone and "
                             "embedding graph plus stats.npz, finished in numpy by infer.py")
    parser.add_argument("--onnx", action="store_true",
                        help="also write model.onnx with paddle2onnx (requirements-deploy.txt)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    expect = {"method": args.method, "arch": args.arch, "k": resolve_k(args.method, args.k),
              "image_size": args.img_size}
    model = load_model(args.model_path, expect=expect, runtime=Runtime(engine="dynamic"), final=True)
    save_dir = Path(args.save_dir)
    manifest = export_model(model, save_dir, args.format, args.fuse, args.onnx, args.model_path)
    layout = "fused" if manifest.fused else "unfused"
    k = f" k={manifest.k}" if manifest.k else ""  # patchcore has no k
    print(f"exported {layout} {manifest.method} {manifest.arch}{k} "
          f"({manifest.category or 'no category'}) to {save_dir}: {', '.join(manifest.files)}, deploy.json")
    return 0


if __name__ == "__main__":
    run_main(main)
