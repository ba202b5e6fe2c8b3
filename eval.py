"""Evaluate saved checkpoints on the test split: image AUROC, pixel AUROC and PRO.

    python eval.py --data_path PATH/TO/MVTec --category all --method ortho --arch resnet18 --k 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from engine.cli import (
    add_eval_args,
    model_dir,
    run_main,
    script_parser,
)
from engine.errors import CheckpointError, ConfigError
from engine.evaluate import write_results
from engine.workflow import categories, config_from, data_root, evaluate_category, runtime_from
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
    root = data_root(args)
    names = categories(args, root)
    runtime = runtime_from(args)
    given = Path(args.model_path) if args.model_path else None
    folder = given or model_dir("./output", args.method, args.arch, args.k)
    if folder.suffix == ".npz" and len(names) > 1:
        raise ConfigError(f"--model_path {folder} is one checkpoint but --category names "
                          f"{len(names)} categories; pass one category or the checkpoint folder")
    expect = config_from(args).identity()
    rows = []
    for category in tqdm(names, desc="categories", unit="cat", disable=len(names) < 2):
        path = folder if folder.suffix == ".npz" else folder / f"{category}.npz"
        model = load_model(str(path), expect=expect, runtime=runtime, final=True)
        if model.category and model.category != category:
            raise CheckpointError(f"{path}: checkpoint of category {model.category} but --category "
                                  f"{category} was asked for; pass that category's checkpoint")
        rows.append(evaluate_category(args, root, category, model))
    out = Path(args.save_path) if args.save_path else (folder.parent if folder.suffix else folder)
    write_results(out, rows)
    return 0


if __name__ == "__main__":
    run_main(main)
