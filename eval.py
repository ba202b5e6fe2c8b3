"""Evaluate saved checkpoints on the test split: image AUROC, pixel AUROC and PRO.

    python eval.py --data_path PATH/TO/MVTec --category all --method ortho --arch resnet18 --k 100
    python eval.py --data_path PATH/TO/MVTec --category carpet --model_path output/ortho_resnet18_100 \
        --eval_PRO --save_pic=True

Method, arch, k and input size come from each checkpoint; the ones given are checked against it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from core.errors import CheckpointError, ConfigError
from core.script import run_main
from datasets import resolve_categories
from engine.cli import (
    add_eval_args,
    checkpoint_folder,
    data_plan_from,
    eval_plan_from,
    expected_identity,
    runtime_from,
    script_parser,
)
from engine.evaluate import write_results
from engine.workflow import evaluate_category
from models import AnomalyModel, load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = script_parser(__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=None,
                        help="folder of <category>.npz checkpoints, or one .npz file "
                             "(default: SAVE_PATH/<method>_<arch>_<k>, train.py's layout)")
    parser.add_argument("--save_path", default=None,
                        help="root as in train.py: checkpoints are read from, and results.csv/md and "
                             "pictures written to, SAVE_PATH/<method>_<arch>_<k> (default ./output; "
                             "with --model_path, results go beside the checkpoints)")
    parser.add_argument("--model_dir", dest="save_path", default=argparse.SUPPRESS,
                        help="the CutPaste PyTorch re-implementation's name for --save_path")
    parser.add_argument("--density", choices=("torch", "sklearn"), default=None,
                        help="the CutPaste re-implementation's choice of density code: accepted; both "
                             "are the Gaussian with Ledoit-Wolf shrinkage this toolkit fits (equal to "
                             "scikit-learn's LedoitWolf)")
    add_eval_args(parser)
    # Read from the checkpoint; given ones are checked (the folder lookup uses train.py's defaults).
    parser.set_defaults(method=None, arch=None, resize=None)
    return parser.parse_args(argv)


def results_folder(args: argparse.Namespace, folder: Path, model: AnomalyModel) -> Path:
    """SAVE_PATH/<method>_<arch>_<k> of the checkpoint with --save_path, else the checkpoint folder."""
    if args.save_path:
        return Path(args.save_path) / model.config.run_name
    return folder.parent if folder.suffix == ".npz" else folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = data_plan_from(args)
    plan = eval_plan_from(args, data)
    names = resolve_categories(data.root, args.category)
    runtime = runtime_from(args)
    folder = checkpoint_folder(args.model_path, args.save_path, args)
    if folder.suffix == ".npz" and len(names) > 1:
        raise ConfigError(f"--model_path {folder} is one checkpoint but --category names "
                          f"{len(names)} categories; pass one category or the checkpoint folder")
    expect = expected_identity(args)
    rows, out = [], None
    for category in tqdm(names, desc="categories", unit="cat", disable=len(names) < 2):
        path = folder if folder.suffix == ".npz" else folder / f"{category}.npz"
        model = load_model(str(path), expect=expect, runtime=runtime, final=True)
        if model.category and model.category != category:
            raise CheckpointError(f"{path}: checkpoint of category {model.category} but --category "
                                  f"{category} was asked for; pass that category's checkpoint")
        # One table: every checkpoint of this run must have the first one's configuration.
        expect = model.config.identity()
        out = out or results_folder(args, folder, model)
        rows.append(evaluate_category(plan, category, model, out))
    write_results(out, rows)
    return 0


if __name__ == "__main__":
    run_main(main)
