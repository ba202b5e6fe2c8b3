"""Which parts of the backbone run in bfloat16: time and accuracy of each choice (issue #12, goal 2).

    python bench/bench_bf16_parts.py [--configs wide_resnet50_2 resnet18] [--seeds 0 1 2]
        [--pretrained none|WEIGHTS.pdparams] [--data_path data/mtd] [--images 30] [--warmup 5] [--no_doc]

``infer.py --precision bf16`` runs every convolution of a split export's features graph in bfloat16.
This bench asks whether another choice keeps the magnetic-tile accuracy closer to float32 for less
of the speed. Per configuration (bench_peers' CONFIGS: resnet18 k=100 on every training image,
wide_resnet50_2 k=300 on 100) and per seed (with ``--pretrained none``, the default: that seed's
random network, Paddle's initialisation with every residual block active, and its channels; with a
weights file, that seed's channels on those weights), 256 px, 2 threads:

- PaDiM fitted in float32 (``model.fit``, as train.py fits), exported fused (``--head matmul``: the
  reference maps) and split (``--head kernel --head_precision fp16 --split``);
- ``--precision bf16`` as infer.py runs that split export, in the OpenVINO engine
  (``--use_openvino True``, the fast path) and with oneDNN;
- placements: the trunk cut into its stages (stem, layer1, layer2, layer3), each saved as its own
  legacy-IR graph and run by the OpenVINO engine in float32 or bf16; a placement names the stages
  kept in float32 and runs the stages in turn, then the channel choice and the split export's head;
- statistics fitted on bfloat16 features (the fit's embedding graph in the OpenVINO engine at bf16),
  then scored by ``--precision bf16``: fitting in the precision that is deployed.

Every magnetic-tile test image is scored by each: the largest map deviation from the reference and
the changes of image AUROC, pixel AUROC and PRO. On the first seed, the stages (each precision) and
the two ``--precision bf16`` runs take turns on ``--images`` test images after ``--warmup``: median
ms per image; a placement's time is the OpenVINO run's, less the stages' sum in bf16, plus the
placement's stages' sum. Prints a Markdown section and writes it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import cast

import numpy as np
import paddle
from paddle import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_peers import (  # noqa: E402
    BATCH,
    CONFIGS,
    SIZE,
    SOURCE,
    THREADS,
    TestSet,
    accuracy,
    in_turns,
    load_images,
    load_test_set,
    map_error,
    score_set,
)
from bench.report import load_note, machine, update_section  # noqa: E402
from core.inference import Predictor, PredictorOptions  # noqa: E402
from core.runtime import RunFn, Runtime, save_static  # noqa: E402
from datasets.magnetic_tile import CATEGORY, convert  # noqa: E402
from deploy import export_model  # noqa: E402
from deploy.export import ir_guard  # noqa: E402
from deploy.manifest import HEAD_PARAMS, read_manifest  # noqa: E402
from deploy.runner import DeployedModel  # noqa: E402
from models import build_model, model_config  # noqa: E402
from models.components.gaussian_model import GaussianModel  # noqa: E402

STAGES = ("stem", "layer1", "layer2", "layer3")
PLACEMENTS = {"bf16 everywhere": (), "stem in float32": ("stem",), "layer1 in float32": ("layer1",),
              "layer2 in float32": ("layer2",), "layer3 in float32": ("layer3",),
              "stem and layer1 in float32": ("stem", "layer1"), "float32 everywhere": STAGES}
"""Placement name -> the stages kept in float32 (the others run in bfloat16)."""
RUN_LABELS = {"ov": "`--precision bf16`, OpenVINO engine", "onednn": "`--precision bf16`, oneDNN",
              "fit_bf16": "statistics fitted on bf16 features, `--precision bf16`, OpenVINO engine"}
"""The infer.py runs measured beside the placements."""
RUN_TIMES = {"ov": "ov", "onednn": "onednn", "fit_bf16": "ov"}
"""The timed run whose ms per image each of :data:`RUN_LABELS` shows (fitting on bf16 features does
not change the run's time)."""
METRICS = ("image_auroc", "pixel_auroc", "pro")
BOUND = 1e-3
"""The issue's bound on each accuracy change."""
OPTIONS = PredictorOptions(cpu_threads=THREADS, enable_mkldnn=True, max_batch_size=1)
OPENVINO = dataclasses.replace(OPTIONS, use_openvino=True)
OPENVINO_BF16 = dataclasses.replace(OPENVINO, precision="bf16")
ONEDNN_BF16 = dataclasses.replace(OPTIONS, precision="bf16")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["wide_resnet50_2"], choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="train.py's --seed of each model (the network and the channels with "
                             "--pretrained none, else the channels only); the first is also timed")
    parser.add_argument("--pretrained", default="none",
                        help="train.py's --pretrained: none (random networks, the default) or a "
                             "weights file (.pdparams; convert a torchvision file with "
                             "python -m models.convert_weights)")
    parser.add_argument("--data_path", default="data/mtd",
                        help="converted magnetic-tile root (made from ../shared/data if missing)")
    parser.add_argument("--images", type=int, default=30, help="timed test images (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed test images first (default 5)")
    parser.add_argument("--no_doc", action="store_true", help="print only, leave docs/ alone")
    return parser.parse_args()


def fitted(arch: str, seed: int, pretrained: str, train: np.ndarray,
           fit_graph: tuple[PredictorOptions, Path] | None = None) -> GaussianModel:
    """PaDiM (``--pretrained``, ``--seed``) fitted on ``train`` (N, 3, S, S), without a threshold
    (nothing measured here reads it); with ``fit_graph`` (options, folder), the fit's embedding graph
    (the one layer the fit compiles) is saved in the legacy IR under the folder and runs with those
    options."""
    k = CONFIGS[arch][0]
    config = model_config("padim", arch=arch, k=k, image_size=SIZE, resize=SIZE, pretrained=pretrained,
                          seed=seed)
    model = cast(GaussianModel, build_model(config, Runtime(cpu_threads=THREADS)))
    model.category = CATEGORY
    if fit_graph is not None:
        options, folder = fit_graph
        shape = [None, 3, SIZE, SIZE]
        model.compile = lambda layer: Predictor(*legacy_graph(layer, shape, folder), options).run
    model.fit([train[i : i + BATCH] for i in range(0, len(train), BATCH)])
    return model


def legacy_graph(layer: nn.Layer, shape: list[int | None], folder: Path) -> tuple[str, str]:
    """``layer`` (inputs of ``shape``) saved in the legacy IR, which the OpenVINO engine reads, under
    ``folder``: (model file, params file)."""
    with ir_guard("pdmodel"):
        model_file = save_static(layer, shape, str(folder / "model"))
    return model_file, str(folder / "model.pdiparams")


def stage_runs(model: GaussianModel, folder: Path) -> dict[tuple[str, str], RunFn]:
    """Each trunk stage as its own legacy-IR graph in the OpenVINO engine: (stage, "fp32"|"bf16") ->
    run, inputs (N, C, H, W) as the stage before it gives them (images for the stem)."""
    layers = [model.trunk.stem, *model.trunk.stages]
    x = paddle.zeros([1, 3, SIZE, SIZE])
    runs: dict[tuple[str, str], RunFn] = {}
    for name, layer in zip(STAGES, layers, strict=True):
        files = legacy_graph(layer, [None, *x.shape[1:]], folder / name)
        for precision in ("fp32", "bf16"):
            runs[name, precision] = Predictor(*files, dataclasses.replace(OPENVINO, precision=precision)).run
        with paddle.no_grad():
            x = layer(x)
    return runs


def placement_run(stages: dict[tuple[str, str], RunFn], float32: tuple[str, ...], embedding: nn.Layer,
                  head: RunFn) -> RunFn:
    """Images (1, 3, S, S) -> (map (1, 1, S, S), score (1,)): the stages in turn, each in float32 if
    named in ``float32`` else in bf16, then the channel choice (eager, float32) and the head."""
    def run(images: np.ndarray) -> list[np.ndarray]:
        x, features = images, []
        for name in STAGES:
            x = stages[name, "fp32" if name in float32 else "bf16"](x)[0]
            if name != "stem":
                features.append(x)
        with paddle.no_grad():
            z = embedding([paddle.to_tensor(f) for f in features]).numpy()
        return head(z)
    return run


def stage_inputs(stages: dict[tuple[str, str], RunFn], images: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Each stage's float32 input (1, C, H, W) for each of ``images`` (N, 3, S, S)."""
    out, x = {}, [image[None] for image in images]
    for name in STAGES:
        out[name] = x
        x = [stages[name, "fp32"](item)[0] for item in x]
    return out


def measure(arch: str, seed: int, pretrained: str, train: np.ndarray, test_set: TestSet,
            timed: tuple[int, int] | None, folder: Path) -> dict:
    """The runs of one network fitted on ``train`` (N, 3, S, S): each one's map error and accuracy
    changes on ``test_set``; with ``timed`` (images, warmup), the stages' and the infer.py runs' ms
    per image."""
    model = fitted(arch, seed, pretrained, train)
    for name, head, precision, split in (("matmul", "matmul", "fp32", False),
                                         ("split", "kernel", "fp16", True)):
        export_model(model, folder / name, "json", head=head, head_precision=precision, split=split)
    # loading the split export also loads the compiled operator its head graph runs
    deployed = {"ov": DeployedModel.load(folder / "split", options=OPENVINO_BF16),
                "onednn": DeployedModel.load(folder / "split", options=ONEDNN_BF16)}
    head_file = folder / "split" / str(read_manifest(folder / "split").head_file)
    head = Predictor(str(head_file), str(folder / "split" / HEAD_PARAMS), OPTIONS).run
    stages = stage_runs(model, folder / "stages")
    embedding = model.embedding()
    graphs: dict[str, RunFn] = {name: run.forward for name, run in deployed.items()}
    for name, float32 in PLACEMENTS.items():
        graphs[name] = placement_run(stages, float32, embedding, head)
    out: dict = {}
    if timed is not None:
        count, warmup = timed
        images = test_set.images[np.linspace(0, len(test_set.images) - 1, count + warmup).round().astype(int)]
        inputs = stage_inputs(stages, images)
        turns = {f"{name}_{precision}": (stages[name, precision], inputs[name])
                 for name, precision in stages}
        turns.update({name: (graphs[name], inputs["stem"]) for name in deployed})
        out["ms"] = {name: float(np.median(ms)) for name, ms in in_turns(turns, warmup).items()}
    reference = score_set(DeployedModel.load(folder / "matmul", options=OPTIONS).forward, test_set.images)
    out["reference"] = accuracy(*reference, test_set)
    refit = fitted(arch, seed, pretrained, train, (OPENVINO_BF16, folder / "fit_bf16"))
    export_model(refit, folder / "refit", "json", head="kernel", head_precision="fp16", split=True)
    graphs["fit_bf16"] = DeployedModel.load(folder / "refit", options=OPENVINO_BF16).forward
    for name, run in graphs.items():
        maps, scores = score_set(run, test_set.images)
        scored = accuracy(maps, scores, test_set)
        out[name] = {"map_error": map_error(maps, reference[0]),
                     **{key: scored[key] - out["reference"][key] for key in METRICS}}
        print(f"{arch} seed {seed} {name}: {out[name]}", file=sys.stderr)
    return out


def placement_ms(ms: dict[str, float], float32: tuple[str, ...]) -> float:
    """A placement's ms per image as infer.py would run it: the OpenVINO bf16 run, its stages' bf16
    sum replaced by the placement's stages."""
    chosen = sum(ms[f"{name}_{'fp32' if name in float32 else 'bf16'}"] for name in STAGES)
    return ms["ov"] - sum(ms[f"{name}_bf16"] for name in STAGES) + chosen


def section(results: dict[str, list[dict]], args: argparse.Namespace, loads: tuple[float, float]) -> str:
    """The Markdown section: stage times, then each run's map error and accuracy changes per network."""
    weights = [] if args.pretrained == "none" else ["--pretrained", args.pretrained]
    command = " ".join(["python bench/bench_bf16_parts.py --configs", *results,
                        "--seeds", *map(str, args.seeds), *weights])
    lines = ["## bfloat16, part by part (bench_bf16_parts.py)", "",
             f"Command: `{command}` on {machine()}; {load_note(*loads)}.", "",
             f"Stages alone in the OpenVINO engine, ms per image (seed {args.seeds[0]}, median of "
             f"{args.images} test images after {args.warmup}, taking turns with the two "
             "`--precision bf16` runs):", "",
             "| backbone, k | " + " | ".join(f"{name} float32 / bf16" for name in STAGES)
             + " | `--precision bf16`: OpenVINO engine / oneDNN |",
             "|---|" + "---|" * (len(STAGES) + 1)]
    for arch, rows in results.items():
        ms = rows[0]["ms"]
        lines.append(f"| {arch}, k={CONFIGS[arch][0]} | "
                     + " | ".join(f"{ms[name + '_fp32']:.1f} / {ms[name + '_bf16']:.1f}" for name in STAGES)
                     + f" | {ms['ov']:.1f} / {ms['onednn']:.1f} |")
    for arch, rows in results.items():
        lines += ["", f"{arch}, k={CONFIGS[arch][0]}: map error against the float32 export / image AUROC, "
                  f"pixel AUROC, PRO change, per seed (float32 image AUROC, pixel AUROC, PRO: "
                  + "; ".join("/".join(f"{row['reference'][key]:.4f}" for key in METRICS) for row in rows)
                  + f"); ms per image (placements: estimated); every change within {BOUND:g} on every "
                  "seed:", "",
                  "| run | ms | " + " | ".join(f"seed {seed}" for seed in args.seeds) + " | within |",
                  "|---|---|" + "---|" * len(rows) + "---|"]
        ms = rows[0]["ms"]
        labels = {"ov": RUN_LABELS["ov"], "onednn": RUN_LABELS["onednn"],
                  **{name: name for name in PLACEMENTS}, "fit_bf16": RUN_LABELS["fit_bf16"]}
        for name, label in labels.items():
            time_ms = placement_ms(ms, PLACEMENTS[name]) if name in PLACEMENTS else ms[RUN_TIMES[name]]
            cells = [f"{row[name]['map_error']:.1e} / "
                     + ", ".join(f"{row[name][key]:+.1e}" for key in METRICS) for row in rows]
            within = "yes" if all(abs(row[name][key]) <= BOUND for row in rows for key in METRICS) else "no"
            lines.append(f"| {label} | {time_ms:.1f} | " + " | ".join(cells) + f" | {within} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    root = Path(args.data_path)
    if not (root / CATEGORY).is_dir():
        convert(SOURCE, root)
    start_load = os.getloadavg()[0]
    test_set = load_test_set(root)
    results: dict[str, list[dict]] = {}
    for arch in args.configs:
        train = load_images(root, "train", CONFIGS[arch][1])
        results[arch] = []
        for index, seed in enumerate(args.seeds):
            with tempfile.TemporaryDirectory(prefix="bench-bf16-parts-") as tmp:
                results[arch].append(measure(arch, seed, args.pretrained, train, test_set,
                                             (args.images, args.warmup) if index == 0 else None, Path(tmp)))
    body = section(results, args, (start_load, os.getloadavg()[0]))
    print(body)
    if not args.no_doc:
        update_section("bench_bf16_parts", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
