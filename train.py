"""Fit a model per category on defect-free images; optionally evaluate it.

    python train.py --data_path PATH/TO/MVTec --category all --method ortho --arch wide_resnet50_2 \
        --k 300 --eval --eval_PRO
    python train.py --category all --method=ortho --k=300 --eval --inc --save_pic=True   # reproduction
    python -m paddle.distributed.launch --nproc_per_node 2 train.py ...   # one fit, 2 processes
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from core.distributed import current_world
from core.errors import ConfigError
from core.script import non_negative_int, run_main
from datasets import resolve_categories
from engine.cli import (
    add_eval_args,
    data_plan_from,
    eval_plan_from,
    fit_plan_from,
    runtime_from,
    script_parser,
)
from engine.evaluate import write_results
from engine.workflow import evaluate_category, train_category


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
    if args.plots and not args.eval:
        raise ConfigError("--plots draws the test scores that --eval computes: add --eval")
    world = current_world()
    data = data_plan_from(args)
    plan = fit_plan_from(args, data)
    evaluation = eval_plan_from(args, data) if args.eval else None
    names = resolve_categories(data.root, args.category)
    runtime = runtime_from(args, world)
    rows = []
    quiet = len(names) < 2 or not world.is_main
    for category in tqdm(names, desc="categories", unit="cat", disable=quiet):
        model = train_category(plan, category, runtime, world)
        if model is not None and evaluation is not None:
            rows.append(evaluate_category(evaluation, category, model, plan.folder))
    if evaluation is not None and world.is_main:
        write_results(plan.folder, rows)
    return 0


if __name__ == "__main__":
    run_main(main)
