"""Score images with a fitted checkpoint: a line per image and a four-panel PNG.

    python predict.py img1.png folder/ --model_path output/ortho_resnet18_100 --category bottle
    python predict.py img.png --category carpet --method=ortho --arch=resnet18 --k=300 --save_pic=True

Without --model_path the checkpoint is SAVE_PATH/<method>_<arch>_<k>/<category>.npz (train.py's
layout); method, arch, k and input size come from the checkpoint, the ones given are checked.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from core.script import finite_float, positive_int, run_main, str2bool
from datasets import Preprocess
from datasets.mvtec import check_category_name
from deploy.report import BadInputs, Reporter, Result, batches, collect_images, output_names, report_all
from engine.cli import (
    add_checkpoint_args,
    add_identity_args,
    add_runtime_args,
    checkpoint_folder,
    expected_identity,
    runtime_from,
)
from models import load_model
from models.base import AnomalyModel

OUTPUT_FOLDER = "predict"
"""Sub-folder of --save_path that receives the PNGs and results.jsonl."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    add_checkpoint_args(parser, "root as in train.py: checkpoints under SAVE_PATH/<method>_<arch>_<k>/, "
                                f"PNGs and results.jsonl written to SAVE_PATH/{OUTPUT_FOLDER}/",
                        "category whose checkpoint to use when the checkpoints are a folder")
    parser.add_argument("--save_pic", type=str2bool, default=True,
                        help="False: print the lines and write results.jsonl, but no PNGs (default True)")
    parser.add_argument("--threshold", type=finite_float, default=None,
                        help="image-score threshold (default: the one stored at fit time)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per batch (default 8)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip unreadable images (each named on stderr; exit status 3) "
                             "instead of stopping at the first")
    add_identity_args(parser)
    add_runtime_args(parser)
    return parser.parse_args(argv)


def checkpoint_path(folder: Path, category: str | None) -> Path:
    """The .npz to load: ``folder`` itself or ``folder/<category>.npz``."""
    if folder.suffix == ".npz":
        return folder
    if not category:
        raise ConfigError(f"the checkpoints are the folder {folder}: add --category to pick one")
    return folder / f"{check_category_name(category)}.npz"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = collect_images(args.inputs)
    folder = checkpoint_folder(args.model_path, args.save_path, args)
    path = checkpoint_path(folder, args.category)
    model = load_model(str(path), expect=expected_identity(args), runtime=runtime_from(args), final=True)
    threshold = args.threshold if args.threshold is not None else model.threshold
    if threshold is None:
        raise ConfigError(f"{path}: holds no threshold (the model was never calibrated); "
                          "pass --threshold")
    preprocess = Preprocess(resize=model.config.resize, crop_size=model.config.image_size)
    names = dict(zip(paths, output_names(paths), strict=True))
    bad = BadInputs(args.skip_bad)
    return report_all(scored(model, batches(paths, preprocess, args.batch_size, bad)),
                      Reporter(str(Path(args.save_path) / OUTPUT_FOLDER), threshold, model.score_min,
                               str(path), args.save_pic),
                      names, bad)


def scored(model: AnomalyModel, chunks: Iterable[tuple[list[Path], np.ndarray]]) -> Iterator[Result]:
    """(path, image (3, S, S), map (S, S), score) of each image, scored batch by batch."""
    for chunk, images in chunks:
        amaps, scores = model.score(images, [str(p) for p in chunk])
        for path, image, amap, score in zip(chunk, images, amaps, scores, strict=True):
            yield path, image, amap, float(score)


if __name__ == "__main__":
    run_main(main)
