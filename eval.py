"""Evaluate saved checkpoints on the test split: image AUROC, pixel AUROC and PRO.

    python eval.py --data_path PATH/TO/MVTec --category all --method ortho --arch resnet18 --k 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from core.script import run_main
from datasets import resolve_categories
from engine.cli import add_eval_args, config_from, data_plan_from, eval_plan_from, runtime_from, script_parser
from engine.evaluate import write_results
from engine.workflow import evaluate_category
from models import load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = script_parser(__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=None,
                        help="folder of <category>.npz checkpoints, or one .npz file "
                             "(default: ./output/<method>_<arch>_<k>)")
    parser.add_argument("--save_path", default=None,
                        help="where results.csv/md go (default: the checkpoint folder)")
    add_eval_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = data_plan_from(args)
    plan = eval_plan_from(args, data)
    names = resolve_categories(data.root, args.category)
    runtime = runtime_from(args)
    config = config_from(args)
    given = Path(args.model_path) if args.model_path else None
    folder = given or Path("./output") / config.run_name
    rows = []
    for category in tqdm(names, desc="categories", unit="cat", disable=len(names) < 2):
        path = folder if folder.suffix == ".npz" else folder / f"{category}.npz"
        model = load_model(str(path), expect=config.identity(), runtime=runtime)
        rows.append(evaluate_category(plan, category, model))
    out = Path(args.save_path) if args.save_path else (folder.parent if folder.suffix else folder)
    write_results(out, rows)
    return 0


if __name__ == "__main__":
    run_main(main)
