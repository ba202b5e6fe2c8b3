"""Argument groups shared by the scripts, and the top-level error handling they all use."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import ToolkitError
from models import resolve_k

DEMO_ROOT = Path("data/demo")
DEFAULT_SAVE_PATH = "./output"
METHOD_ALIASES = {"sample": "padim", "coreset": "patchcore"}
"""Method names of the reference Paddle reproduction and the method each one is here."""
MAX_SIDE = 8192
"""Largest accepted image side (--resize, --crop_size, --img_size, a checkpoint's sizes)."""


def _number(value: str, kind: type) -> int | float:
    """``value`` as an int or a finite float; an ArgumentTypeError (argparse's one line) if not."""
    try:
        number = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` accepting integers in [low, high] (no upper bound if ``high`` is None)."""

    def parse(value: str) -> int:
        number = _number(value, int)
        if number < low or (high is not None and number > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return number

    return parse


def finite_float(value: str) -> float:
    """An argparse ``type=`` accepting any finite number (not nan or inf)."""
    return _number(value, float)


def positive_float(value: str) -> float:
    """An argparse ``type=`` accepting finite numbers > 0."""
    number = _number(value, float)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return number


def fraction(value: str) -> float:
    """An argparse ``type=`` accepting numbers in (0, 1]."""
    number = _number(value, float)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return number


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
image_side = int_at_least(1, MAX_SIDE)


def str2bool(value: str | bool) -> bool:
    """Parse True/False style flags the way Paddle's tools do (``--use_gpu True``)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "t", "yes", "y", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def method_name(value: str) -> str:
    """``--method`` as given, with the reproduction's names mapped to ours (sample -> padim,
    coreset -> patchcore; a note on stdout says so)."""
    name = value.strip().lower()
    if name in METHOD_ALIASES:
        print(f"--method {name} is {METHOD_ALIASES[name]} here")
        return METHOD_ALIASES[name]
    return name


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """--data_path, --category, --resize, --crop_size, --batch_size, --num_workers."""
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default=None,
                       help=f"dataset root in MVTec AD layout (default: demo data in {DEMO_ROOT})")
    group.add_argument("--category", default="all",
                       help="a category, a comma list, all, textures or objects (default: all)")
    group.add_argument("--resize", type=image_side, default=256, help="square resize side (default 256)")
    group.add_argument("--crop_size", type=image_side, default=None,
                       help="centre crop side, the network input (default: = resize)")
    group.add_argument("--batch_size", type=positive_int, default=32, help="images per batch (default 32)")
    group.add_argument("--num_workers", type=non_negative_int, default=2,
                       help="image-loading threads, 0 = load in the main thread (default 2)")


def add_model_args(parser: argparse.ArgumentParser, with_method: bool = True) -> None:
    """--method, --arch, --k, --eps, --seed, --pretrained, and PatchCore's/SPADE's arguments."""
    group = parser.add_argument_group("model")
    if with_method:
        group.add_argument("--method", default="ortho", type=method_name,
                           help="ortho, padim, spade or patchcore (default ortho); the "
                                "reproduction's sample and coreset mean padim and patchcore")
    group.add_argument("--arch", default="resnet18",
                       help="resnet18, resnet50 or wide_resnet50_2 (default resnet18)")
    group.add_argument("--k", type=positive_int, default=None,
                       help="ortho/padim: embedding dimension (default 100); spade: nearest "
                            "training images (default 50); not used by patchcore")
    group.add_argument("--eps", type=positive_float, default=0.01,
                       help="covariance regulariser eps*I (default 0.01)")
    group.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed of every random draw (projection, channels, random init)")
    group.add_argument("--pretrained", default="imagenet",
                       help="imagenet (Paddle's download and cache), PATH.pdparams, or none")
    group.add_argument("--coreset_ratio", type=fraction, default=0.1,
                       help="patchcore: fraction of training patches kept in the bank, 1 = all "
                            "(default 0.1)")
    group.add_argument("--projection_dim", type=positive_int, default=128,
                       help="patchcore: random-projection size for the coreset selection (default 128)")
    group.add_argument("--num_neighbors", type=positive_int, default=9,
                       help="patchcore: bank patches in the image-score reweighting (default 9)")
    group.add_argument("--half", action="store_true",
                       help="spade/patchcore: store the gallery/bank in float16 (half its size)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """--device, --engine, --cpu_threads, --enable_mkldnn."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N (default cpu)")
    group.add_argument("--engine", default="inference", choices=("inference", "dynamic"),
                       help="inference: Paddle Inference predictor (fast, default); "
                            "dynamic: eager Paddle")
    group.add_argument("--cpu_threads", type=positive_int, default=min(os.cpu_count() or 1, 8),
                       help="CPU math threads of the predictor")
    group.add_argument("--enable_mkldnn", type=str2bool, default=True,
                       help="use oneDNN on the CPU (default True)")


def script_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the data, model and runtime groups shared by train.py and eval.py."""
    parser = argparse.ArgumentParser(description=description)
    add_data_args(parser)
    add_model_args(parser)
    add_runtime_args(parser)
    return parser


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """--eval_PRO, --non_partial_AUC, --test_batch_size, --save_pic."""
    parser.add_argument("--eval_PRO", action="store_true", help="also compute the PRO score")
    parser.add_argument("--non_partial_AUC", action="store_true",
                        help="AUROC by the midpoint-rectangle rule of the reference reproduction")
    parser.add_argument("--test_batch_size", type=int, default=None,
                        help="images per batch when scoring the test split (default: --batch_size)")
    parser.add_argument("--save_pic", type=str2bool, default=False,
                        help="True: write the picture of every test image (image, ground truth, heat "
                             "map, mask, boundary) under the results folder, in <category>/ "
                             "(default False)")


def add_identity_args(parser: argparse.ArgumentParser, size_flags: tuple[str, ...] = ("--crop_size",)
                      ) -> None:
    """--method, --arch, --k, --resize and ``size_flags`` (the input side) as optional checks.

    They are read from the checkpoint; the ones given must match it (see :func:`expected_identity`).
    Without ``--model_path``, --method/--arch/--k also name the checkpoint folder (defaults ortho,
    resnet18, the method's k), as in train.py.
    """
    group = parser.add_argument_group("checks against the checkpoint (read from it when not given)")
    group.add_argument("--method", default=None, type=method_name,
                       help="ortho, padim, spade or patchcore (sample = padim, coreset = patchcore)")
    group.add_argument("--arch", default=None, help="resnet18, resnet50 or wide_resnet50_2")
    group.add_argument("--k", type=positive_int, default=None, help="k of the checkpoint")
    group.add_argument("--resize", type=image_side, default=None, help="resize side of the checkpoint")
    group.add_argument(*size_flags, type=image_side, default=None,
                       help="network input side of the checkpoint")


def add_checkpoint_args(parser: argparse.ArgumentParser, save_path_help: str, category_help: str) -> None:
    """--model_path, --save_path (train.py's root, default ./output) and --category: which checkpoints."""
    parser.add_argument("--model_path", default=None,
                        help="a checkpoint .npz, or a folder of <category>.npz checkpoints "
                             "(default: SAVE_PATH/<method>_<arch>_<k>, train.py's layout)")
    parser.add_argument("--save_path", default=DEFAULT_SAVE_PATH,
                        help=f"{save_path_help} (default {DEFAULT_SAVE_PATH})")
    parser.add_argument("--category", default=None, help=category_help)


def expected_identity(args: argparse.Namespace, side: str = "crop_size") -> dict[str, Any]:
    """The checkpoint fields the user asked for: method, arch, k, resize, image_size (given ones only).

    ``side`` names the attribute holding the input side (export_model.py's is img_size); it
    defaults to --resize when only --resize is given (train.py's rule); k is checked only when
    given (patchcore's is always 0).
    """
    wanted: dict[str, Any] = {}
    for key in ("method", "arch"):
        if getattr(args, key) is not None:
            wanted[key] = getattr(args, key)
    if args.k is not None:
        wanted["k"] = resolve_k(args.method, args.k) if args.method else args.k
    if args.resize is not None:
        wanted["resize"] = args.resize
    if (getattr(args, side) or args.resize) is not None:
        wanted["image_size"] = getattr(args, side) or args.resize
    return wanted


def checkpoint_folder(model_path: str | None, save_path: str | None,
                      args: argparse.Namespace) -> Path:
    """``model_path`` (a folder or a .npz) or train.py's SAVE_PATH/<method>_<arch>_<k>."""
    if model_path:
        return Path(model_path)
    return model_dir(save_path or DEFAULT_SAVE_PATH, args.method or "ortho", args.arch or "resnet18",
                     args.k)


def model_dir(save_path: str, method: str, arch: str, k: int | None) -> Path:
    """Folder of a configuration's checkpoints: SAVE_PATH/<method>_<arch>_<k>.

    ``k`` None means the method's default; patchcore, which has no k, uses SAVE_PATH/patchcore_<arch>.
    """
    k = resolve_k(method, k)
    return Path(save_path) / (f"{method}_{arch}_{k}" if k else f"{method}_{arch}")


def run_main(main: Callable[[list[str] | None], int]) -> None:
    """Run a script's main; a ToolkitError becomes one ``error:`` line and exit status 2."""
    try:
        code = main(None)
    except ToolkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
