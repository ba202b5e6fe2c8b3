"""Fit a model per category on defect-free images; optionally evaluate it.

    python train.py --data_path PATH/TO/MVTec --category all --method ortho --arch wide_resnet50_2 \
        --k 300 --eval --eval_PRO
    python train.py --category all --method=ortho --k=300 --eval --inc --save_pic=True   # reproduction
    python -m paddle.distributed.launch --nproc_per_node 2 train.py ...   # one fit, 2 processes
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from engine.cli import (
    add_eval_args,
    model_dir,
    non_negative_int,
    run_main,
    script_parser,
)
from engine.distributed import current_world
from engine.errors import ConfigError
from engine.evaluate import write_results
from engine.workflow import (
    categories,
    data_root,
    evaluate_category,
    fit_category,
    fit_state_path,
    runtime_from,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = script_parser(__doc__.splitlines()[0])
    parser.add_argument("--save_path", default="./output",
                        help="checkpoints go to SAVE_PATH/<method>_<arch>_<k>/ (default ./output)")
    parser.add_argument("--calib_images", type=non_negative_int, default=200,
                        help="training images scored to set the default threshold (0 = all)")
    parser.add_argument("--save_every", type=non_negative_int, default=0,
                        help="save the fit state every N images for --resume (default 0: never)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted fit from its saved fit state")
    parser.add_argument("--eval", action="store_true", help="evaluate on the test split after fitting")
    parser.add_argument("--inc", action="store_true",
                        help="the reference reproduction's incremental mean and covariance: accepted, "
                             "the fit here is always incremental (streaming)")
    add_eval_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.save_pic and not args.eval:
        raise ConfigError("--save_pic True draws the test images that --eval scores: add --eval")
    world = current_world()
    root = data_root(args)
    names = categories(args, root)
    runtime = runtime_from(args, world)
    folder = model_dir(args.save_path, args.method, args.arch, args.k)
    rows = []
    quiet = len(names) < 2 or not world.is_main
    for category in tqdm(names, desc="categories", unit="cat", disable=quiet):
        model = fit_category(args, root, category, runtime, world)
        if model is None:  # not the main process: its statistics went to rank 0
            continue
        path = folder / f"{category}.npz"
        model.save(str(path))
        fit_state_path(args, category).unlink(missing_ok=True)
        print(f"{category}: fitted on {model.n_train} images, threshold {model.threshold:.4f}, "
              f"saved {path}")
        if args.eval:
            rows.append(evaluate_category(args, root, category, model, folder))
    if args.eval and world.is_main:
        write_results(folder, rows)
    return 0


if __name__ == "__main__":
    run_main(main)
