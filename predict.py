"""Score images with a fitted checkpoint: a line per image and a four-panel PNG.

    python predict.py img1.png folder/ --model_path output/ortho_resnet18_100 --category bottle
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Preprocess
from datasets.mvtec import check_category_name
from engine.cli import add_runtime_args, finite_float, positive_int, run_main
from engine.errors import ConfigError
from engine.predict import Reporter, batches, collect_images, output_names
from engine.workflow import runtime_from
from models import load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--model_path", required=True,
                        help="a checkpoint .npz, or the folder of <category>.npz checkpoints")
    parser.add_argument("--category", default=None,
                        help="category whose checkpoint to use when --model_path is a folder")
    parser.add_argument("--save_path", default="./output/predict",
                        help="folder for the PNGs and results.jsonl (default ./output/predict)")
    parser.add_argument("--threshold", type=finite_float, default=None,
                        help="image-score threshold (default: the one stored at fit time)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per batch (default 8)")
    add_runtime_args(parser)
    return parser.parse_args(argv)


def checkpoint_path(model_path: str, category: str | None) -> Path:
    """The .npz to load: ``model_path`` itself or ``model_path/<category>.npz``."""
    path = Path(model_path)
    if path.suffix == ".npz":
        return path
    if not category:
        raise ConfigError(f"--model_path {path} is a folder: add --category to pick a checkpoint")
    return path / f"{check_category_name(category)}.npz"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = collect_images(args.inputs)
    path = checkpoint_path(args.model_path, args.category)
    model = load_model(str(path), runtime=runtime_from(args), final=True)
    threshold = args.threshold if args.threshold is not None else model.threshold
    if threshold is None:
        raise ConfigError(f"{path}: holds no threshold (the model was never calibrated); "
                          "pass --threshold")
    preprocess = Preprocess(resize=model.config.resize, crop_size=model.config.image_size)
    reporter = Reporter(args.save_path, threshold)
    names = dict(zip(paths, output_names(paths), strict=True))
    for chunk, images in batches(paths, preprocess, args.batch_size):
        amaps, scores = model.score(images, [str(p) for p in chunk])
        for path, image, amap, score in zip(chunk, images, amaps, scores, strict=True):
            reporter.add(path, names[path], image, amap, float(score))
    print(f"wrote {len(paths)} pictures and {reporter.write_jsonl()}")
    return 0


if __name__ == "__main__":
    run_main(main)
