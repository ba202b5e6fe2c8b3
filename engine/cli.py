"""Argument groups shared by the scripts, and the plans, model config and runtime built from them."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from core.device import parse_device, select_device
from core.distributed import World
from core.runtime import CPU_THREADS, Runtime
from core.script import (
    image_side,
    non_negative_int,
    positive_int,
    str2bool,
)
from datasets import Preprocess
from datasets.synthetic import DEMO_ROOT, generate
from engine.workflow import DataPlan, EvalPlan, FitPlan
from models import METHODS, ModelConfig, method_class, model_config

DEFAULT_SAVE_PATH = "./output"
METHOD_ALIASES = {"sample": "padim", "coreset": "patchcore"}
"""Method names of the reference Paddle reproduction and the method each one is here."""


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
    group.add_argument("--batch_size", type=positive_int, default=32,
                       help="images per batch (default 32); a trained method's step reads one batch "
                            "(cutpaste: images read, before augmentation into 2 or 3 samples each)")
    group.add_argument("--num_workers", type=non_negative_int, default=2,
                       help="image-loading threads, 0 = load in the main thread (default 2)")


def method_option_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Every registered method's option fields by name: {name: [(method, field), ...]}."""
    fields: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for method, cls in METHODS.items():
        for field in dataclasses.fields(cls.Options):
            fields.setdefault(field.name, []).append((method, field))
    return fields


def _option_help(owners: list[tuple[str, dataclasses.Field]]) -> str:
    """"m1/m2: help (default d); m3: ..." for the methods that share an option name."""
    parts: dict[tuple[str, str], list[str]] = {}
    for method, field in owners:
        default = "off" if field.default is False else field.default
        parts.setdefault((field.metadata.get("help", ""), str(default)), []).append(method)
    return "; ".join(f"{'/'.join(methods)}: {text} (default {default})"
                     for (text, default), methods in parts.items())


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--method, --arch, --seed, --pretrained, and every method's options (``--k``, ``--eps``,
    PatchCore's, SPADE's, ...) as the methods declare them (models.base.MethodOptions)."""
    group = parser.add_argument_group("model")
    group.add_argument("--method", default="ortho", type=method_name,
                       help=f"{', '.join(METHODS)} (default ortho); the reproduction's sample and "
                            "coreset mean padim and patchcore")
    group.add_argument("--arch", default="resnet18",
                       help="resnet18, resnet50 or wide_resnet50_2 (default resnet18)")
    group.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed of every random draw (projection, channels, random init)")
    group.add_argument("--pretrained", default="imagenet",
                       help="imagenet (Paddle's download and cache), PATH.pdparams, or none")
    options = parser.add_argument_group("method options (each method reads its own; default: the method's)")
    for name, owners in method_option_fields().items():
        field = owners[0][1]
        if field.type in (bool, "bool"):
            options.add_argument(f"--{name}", action="store_true", default=None, help=_option_help(owners))
        else:
            options.add_argument(f"--{name}", type=_option_type(field), default=None,
                                 help=_option_help(owners))


def _option_type(field: dataclasses.Field) -> Any:
    """The argparse type of a method option: its ``parse``, else its field type."""
    kind = {"int": int, "float": float, "str": str}.get(str(field.type), type(field.default))
    return field.metadata.get("parse") or kind


def name_fields() -> dict[str, dataclasses.Field]:
    """The options that name run folders (``name_fields``) besides k: ``--size``, ``--variant``, ..."""
    return {name: owners[0][1] for name, owners in method_option_fields().items()
            if name != "k" and any(name in METHODS[method].Options.name_fields for method, _ in owners)}


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """--device, --engine, --cpu_threads, --enable_mkldnn."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N (default cpu)")
    group.add_argument("--engine", default="inference", choices=("inference", "dynamic"),
                       help="inference: Paddle Inference predictor (fast, default); "
                            "dynamic: eager Paddle")
    group.add_argument("--cpu_threads", type=positive_int, default=CPU_THREADS,
                       help="CPU threads of the predictor and of training (default: the cores, at most 8)")
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
    """--eval_PRO, --non_partial_AUC, --test_batch_size, --save_pic, --plots."""
    parser.add_argument("--eval_PRO", action="store_true", help="also compute the PRO score")
    parser.add_argument("--non_partial_AUC", action="store_true",
                        help="AUROC by the midpoint-rectangle rule of the reference reproduction")
    parser.add_argument("--test_batch_size", type=positive_int, default=None,
                        help="images per batch when scoring the test split (default: --batch_size)")
    parser.add_argument("--save_pic", type=str2bool, default=False,
                        help="True: write the picture of every test image (image, ground truth, heat "
                             "map, mask, boundary) under the results folder, in <category>/ "
                             "(default False)")
    parser.add_argument("--plots", action="store_true",
                        help="also write <category>_roc.png, _pro.png and _hist.png beside results.csv")


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
    for name, field in name_fields().items():
        group.add_argument(f"--{name}", type=_option_type(field), default=None,
                           help=f"{name} of the checkpoint (names its folder, as in train.py)")


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
    if args.k is not None and (not args.method or "k" in method_class(args.method).Options.name_fields):
        wanted["k"] = args.k  # a method without k (patchcore) ignores --k, as train.py does
    for name in name_fields():
        if getattr(args, name, None) is not None and (not args.method or
                                                      name in method_class(args.method).Options.name_fields):
            wanted[name] = getattr(args, name)
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
    given = {name: getattr(args, name, None) for name in method_option_fields()}  # --k, --size, ...
    config = model_config(args.method or "ortho", strict=False, arch=args.arch or "resnet18", **given)
    return Path(save_path or DEFAULT_SAVE_PATH) / config.run_name


def config_from(args: argparse.Namespace, method: str | None = None) -> ModelConfig:
    """The model configuration the model and data arguments describe (options the method does
    not have, and options not given, are left to the method)."""
    method = method or args.method
    given = {name: getattr(args, name, None) for name in method_option_fields()}
    preprocess = preprocess_from(args)
    return model_config(method, strict=False, arch=args.arch, seed=args.seed,
                        pretrained=args.pretrained, image_size=preprocess.size,
                        resize=preprocess.resize, **given)


def data_root(args: argparse.Namespace) -> Path:
    """The dataset root: --data_path, or the demo data (generated on first use)."""
    if args.data_path:
        return Path(args.data_path)
    if not (DEMO_ROOT / ".synthetic.json").is_file():
        print(f"no --data_path: generating the demo dataset in {DEMO_ROOT}", file=sys.stderr)
    return generate(DEMO_ROOT)


def preprocess_from(args: argparse.Namespace) -> Preprocess:
    """Preprocessing from --resize / --crop_size."""
    return Preprocess(resize=args.resize, crop_size=args.crop_size)


def data_plan_from(args: argparse.Namespace) -> DataPlan:
    """The data arguments as a plan (the demo data is generated if no --data_path is given)."""
    preprocess = None if args.resize is None else preprocess_from(args)  # eval.py: the checkpoint's
    return DataPlan(data_root(args), preprocess, args.batch_size, args.num_workers)


def fit_plan_from(args: argparse.Namespace, data: DataPlan) -> FitPlan:
    """train.py's arguments as a fit plan."""
    return FitPlan(data, config_from(args), Path(args.save_path), args.calib_images,
                   args.save_every, args.resume)


def eval_plan_from(args: argparse.Namespace, data: DataPlan) -> EvalPlan:
    """--eval_PRO / --non_partial_AUC as an evaluation plan."""
    return EvalPlan(data, args.eval_PRO, "midpoint" if args.non_partial_AUC else "trapezoid",
                    args.test_batch_size, args.save_pic, args.plots)


def runtime_from(args: argparse.Namespace, world: World | None = None) -> Runtime:
    """Runtime from --device / --engine / --cpu_threads / --enable_mkldnn (device is checked).

    Launched on GPUs, each process takes the GPU the launcher selected for it.
    """
    device = args.device
    if world is not None and world.size > 1 and parse_device(device)[0] == "gpu":
        device = f"gpu:{os.environ.get('FLAGS_selected_gpus', world.local_rank)}"
    device = select_device(device)
    return Runtime(engine=args.engine, device=device, cpu_threads=args.cpu_threads,
                   enable_mkldnn=args.enable_mkldnn)
