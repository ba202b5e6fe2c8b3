"""Score images with a fitted checkpoint: a line per image and a four-panel PNG.

    python predict.py img1.png folder/ --model_path output/ortho_resnet18_100 --category bottle
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from datasets import Preprocess
from datasets.mvtec import check_category_name
from engine.cli import add_runtime_args, finite_float, positive_int, run_main
from engine.errors import ConfigError
from engine.predict import BadInputs, Reporter, Result, batches, collect_images, output_names, report_all
from engine.workflow import runtime_from
from models import load_model
from models.base import AnomalyModel


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
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip unreadable images (each named on stderr; exit status 3) "
                             "instead of stopping at the first")
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
    names = dict(zip(paths, output_names(paths), strict=True))
    bad = BadInputs(args.skip_bad)
    return report_all(scored(model, batches(paths, preprocess, args.batch_size, bad)),
                      Reporter(args.save_path, threshold), names, bad)


def scored(model: AnomalyModel, chunks: Iterable[tuple[list[Path], np.ndarray]]) -> Iterator[Result]:
    """(path, image (3, S, S), map (S, S), score) of each image, scored batch by batch."""
    for chunk, images in chunks:
        amaps, scores = model.score(images, [str(p) for p in chunk])
        for path, image, amap, score in zip(chunk, images, amaps, scores, strict=True):
            yield path, image, amap, float(score)


if __name__ == "__main__":
    run_main(main)
