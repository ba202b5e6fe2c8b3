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
from engine.evaluate import write_results
from engine.plots import write_plots
from engine.workflow import categories, category_metrics, config_from, data_root, runtime_from, score_category
from models import load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = script_parser(__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=None,
                        help="folder of <category>.npz checkpoints, or one .npz file "
                             "(default: ./output/<method>_<arch>_<k>)")
    parser.add_argument("--save_path", default=None,
                        help="where results.csv/md go (default: the checkpoint folder)")
    parser.add_argument("--plots", action="store_true",
                        help="also write <category>_roc.png, _pro.png and _hist.png beside results.csv")
    add_eval_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = data_root(args)
    names = categories(args, root)
    runtime = runtime_from(args)
    given = Path(args.model_path) if args.model_path else None
    folder = given or model_dir("./output", args.method, args.arch, args.k)
    expect = config_from(args).identity()
    out = Path(args.save_path) if args.save_path else (folder.parent if folder.suffix else folder)
    rows = []
    for category in tqdm(names, desc="categories", unit="cat", disable=len(names) < 2):
        path = folder if folder.suffix == ".npz" else folder / f"{category}.npz"
        model = load_model(str(path), expect=expect, runtime=runtime)
        scored = score_category(args, root, category, model)
        rows.append(category_metrics(args, category, scored))
        if args.plots:
            written = write_plots(out, category, scored, model.threshold)
            print(f"wrote {', '.join(str(p) for p in written)}")
    write_results(out, rows)
    return 0


if __name__ == "__main__":
    run_main(main)
