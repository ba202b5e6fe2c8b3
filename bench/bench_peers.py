"""Our PaDiM export against anomalib's PaDiM, on the same images in one run (issue #12, goal 2).

    python bench/bench_peers.py --setup [--venv .venv-peers]   # once: the peers' own venv
    python bench/bench_peers.py [--venv .venv-peers] [--configs resnet18 wide_resnet50_2]
        [--networks active:0 active:1 active:2 timm:0]

``--setup`` creates a separate venv (default ``.venv-peers`` in the repo, git-ignored) and installs
torch, torchvision, anomalib, openvino, onnxruntime, onnx and onnxscript there from PyPI; none of
them enters requirements*.txt. PyPI has no CPU-only torch (the ``+cpu`` builds live on PyTorch's
own index), so the default wheel comes with its CUDA libraries (about 3 GB, unused here); without
them (``pip install --no-deps torch``) ``import torch`` fails on the missing libcudnn.

A run, per configuration (resnet18 with k=100 on every training image, wide_resnet50_2 with k=300
on 100), 256 px, batch 1, 2 threads, both sides on one network: anomalib's random-initialised
backbone (the first of ``--networks``: torch seed, and "timm" for timm's initialisation, whose
``zero_init_last`` makes every residual block start as its shortcut, or "active" for that last
BatchNorm scale set to 1, as torchvision and Paddle initialise it), which bench/peer_worker.py
writes as a torchvision state dict and ours converts as ``python -m models.convert_weights`` does
and loads as ``--pretrained``, with anomalib's channel choice and covariance regulariser:

- ours: ``--method padim`` fitted in this venv on the training images (in memory, batches of 32,
  the ``model.fit`` that train.py runs), exported fused (export_model.py's ``export_model``,
  model.json) with each ``--head`` (matmul, the default, and kernel) and with ``--head kernel
  --head_precision fp16``, and run by Paddle Inference (oneDNN), as infer.py's inference stage
  does; the two kernel exports again with ``--split``, run as ``infer.py --use_openvino True``
  runs them (features in Paddle Inference's OpenVINO engine, head with oneDNN), and the fp16
  split export with ``infer.py --use_openvino True --precision bf16`` (features in bfloat16); the
  runs and the trunk alone (oneDNN, OpenVINO engine in float32 and bf16) take turns on every test
  image, at batch 1 and in batches of 8; then every magnetic-tile test image is scored by the
  reduced-precision runs, the default export and our whole fused graph run by the OpenVINO engine
  at bf16 (what OpenVINO's default precision makes of it): map errors against the default export,
  and image AUROC, pixel AUROC and PRO of the default export and the two bf16 runs;
- the limit of each run: our trunk alone (layer1-3, exported the same way; in the OpenVINO
  engine, at the run's precision, for the split exports) plus the time to read its statistics
  once (its params minus the trunk's) at the bandwidth of a numpy copy;
- anomalib's PaDiM (``n_features=k``, ``pre_trained=False``) fitted on the same images, then eager
  PyTorch, ONNX Runtime and OpenVINO (f32 hint and default precision), and its backbone's layer1-3
  alone on OpenVINO f32 (what our "trunk alone" is to our exports), in the peer venv through
  bench/peer_worker.py; its OpenVINO f32 and default maps of every test image give its map error
  and accuracy, and the distance of our float32 maps from its own on the same network.

Each further entry of ``--networks`` is another network and channel choice on both sides, fitted
and scored on every test image without the timings (the bf16 accuracy changes and their spread).
Every side scores the same preprocessed test images; ms/image is the median after warm-up. Prints
a Markdown section and writes it to docs/benchmarks.md (``--no_doc``: print only).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import load_note, machine, update_section  # noqa: E402
from core.inference import Predictor, PredictorOptions  # noqa: E402
from core.runtime import Runtime, save_static  # noqa: E402
from datasets import AnomalyDataset, Preprocess, list_samples  # noqa: E402
from datasets.magnetic_tile import CATEGORY, convert  # noqa: E402
from deploy import export_model  # noqa: E402
from deploy.export import ir_guard  # noqa: E402
from deploy.runner import DeployedModel  # noqa: E402
from engine.evaluate import ScoredSet, metrics  # noqa: E402
from engine.workflow import calibration_indices  # noqa: E402
from models import build_model, convert_weights, model_config  # noqa: E402
from models.base import ModelConfig  # noqa: E402

SIZE, THREADS, BATCH = 256, 2, 32
EXPORTS = {"matmul": ("matmul", "fp32", False), "kernel": ("kernel", "fp32", False),
           "kernel_fp16": ("kernel", "fp16", False), "split": ("kernel", "fp32", True),
           "split_fp16": ("kernel", "fp16", True)}
"""Our exports: name -> (--head, --head_precision, --split); a split export runs its features graph
in Paddle Inference's OpenVINO engine (infer.py --use_openvino True)."""
RUNS = {**{name: (name, "fp32") for name in EXPORTS}, "split_bf16": ("split_fp16", "bf16")}
"""What is timed: name -> (export, infer.py --precision); split_bf16 runs split_fp16's features graph
in bfloat16 (infer.py --use_openvino True --precision bf16)."""
BATCHED = ("kernel", "split", "split_bf16", "trunk", "trunk_ov")
"""The runs also timed at batch :data:`BATCH_LARGE` (the trunks on their own predictors)."""
BATCH_LARGE = 8
ACCURACY = ("matmul", "split_bf16", "whole_ov_bf16")
"""The runs whose image AUROC, pixel AUROC and PRO are measured on every test image (matmul: the
float32 reference; whole_ov_bf16: our fused export whole in the OpenVINO engine at bf16)."""
BORDER = int(4 * ModelConfig.sigma + 0.5)
"""The blur's radius (16 px at the default sigma 4): our maps follow scipy's "reflect" border (half-sample,
as PaDiM's reference code's ``gaussian_filter``), anomalib's kornia blur mirrors about the edge pixel;
beyond this many pixels from the border the two conventions agree."""
SCORED = ("matmul", "kernel_fp16", "split_fp16", "split_bf16", "whole_ov_bf16")
"""The runs scored on every test image (map error against matmul's maps)."""
PEER_PACKAGES = ("torch", "torchvision", "anomalib[core]", "openvino", "onnxruntime", "onnx", "onnxscript")
CONFIGS = {"resnet18": (100, 0), "wide_resnet50_2": (300, 100)}
"""backbone: (k, training images; 0 = all)."""
NETWORK_TEXT = {"active": "timm's initialisation with the last BatchNorm scale of every residual block "
                           "set to 1, as torchvision and Paddle initialise it",
                "timm": "timm's initialisation, whose `zero_init_last` zeroes that scale, so every "
                        "residual block starts as its shortcut"}
"""bench/peer_worker.py's ``network`` kinds."""
NETWORKS = tuple(NETWORK_TEXT)
ANOMALIB_EPS = 0.01 + 1e-5
"""anomalib's covariance regulariser (0.01 I in its fit, 1e-5 I more before the inverse), given to
ours as ``--eps`` so that both sides fit the same Gaussian."""
SOURCE = ROOT.parent / "shared" / "data" / "magnetic_tile"
WORKER = ROOT / "bench" / "peer_worker.py"


def network_kind(text: str) -> tuple[str, int]:
    """``KIND:SEED`` of ``--networks`` -> (kind, seed)."""
    kind, _, seed = text.partition(":")
    if kind not in NETWORKS or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND:SEED, KIND one of {', '.join(NETWORKS)}")
    return kind, int(seed)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create the peer venv and install the peers")
    parser.add_argument("--venv", default=str(ROOT / ".venv-peers"),
                        help="the peer venv (default .venv-peers in the repo)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--data_path", default="data/mtd",
                        help="converted magnetic-tile root (made from ../shared/data if missing)")
    parser.add_argument("--fit_images", type=int, default=None,
                        help="training images for both fits (default: all for resnet18, 100 for wrn50)")
    parser.add_argument("--images", type=int, default=35, help="timed test images (default 35)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed test images first (default 5)")
    parser.add_argument("--networks", type=network_kind, nargs="+", default=[("active", 0)],
                        help="KIND:SEED, KIND 'active' or 'timm' (see the docstring): everything on the "
                             "first, the bf16 accuracy on each (default active:0)")
    parser.add_argument("--fit_only", action="store_true",
                        help="time the fits only: ours as train.py runs it (fit pass, threshold, "
                             "inverse covariances) against anomalib's fit; section bench_peers_fit")
    parser.add_argument("--no_doc", action="store_true", help="print only, leave docs/ alone")
    return parser.parse_args()


def setup(venv: Path) -> None:
    """Create ``venv`` and pip-install the peer packages into it."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *PEER_PACKAGES], check=True)


def load_images(root: Path, split: str, count: int) -> np.ndarray:
    """``count`` images of a split spread evenly over it (0 = all), preprocessed: (N, 3, S, S)."""
    samples = list_samples(root, CATEGORY, split)
    if count:
        samples = [samples[i] for i in np.linspace(0, len(samples) - 1, count).round().astype(int)]
    dataset = AnomalyDataset(samples, Preprocess(SIZE))
    return np.stack([dataset[i]["image"] for i in range(len(dataset))]).astype(np.float32)


def in_turns(runs: dict[str, tuple[Callable[[np.ndarray], object], list[np.ndarray]]],
             warmup: int) -> dict[str, np.ndarray]:
    """Milliseconds of each call of each run on its own inputs (lists of equal length) after the
    first ``warmup`` inputs, run untimed; the runs take turns on every input (in a rotating order),
    so a slower or faster spell of the machine falls on all of them alike."""
    names = list(runs)
    count = len(runs[names[0]][1])
    for step in range(min(warmup, count)):
        for name in names:
            run, inputs = runs[name]
            run(inputs[step])
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(warmup, count):
        turn = (step - warmup) % len(names)
        for name in names[turn:] + names[:turn]:
            run, inputs = runs[name]
            start = time.perf_counter()
            run(inputs[step])
            times[name].append(1000.0 * (time.perf_counter() - start))
    return {name: np.asarray(values) for name, values in times.items()}


def per_image_ms(runs: dict[str, Callable[[np.ndarray], object]], images: np.ndarray,
                 warmup: int, batch: int = 1) -> dict[str, np.ndarray]:
    """Milliseconds per image of each of ``runs`` on each batch of ``batch`` images after ``warmup``
    untimed batches, the runs taking turns (:func:`in_turns`)."""
    batches = [images[first : first + batch] for first in range(0, len(images) - batch + 1, batch)]
    times = in_turns({name: (run, batches) for name, run in runs.items()}, warmup)
    return {name: ms / batch for name, ms in times.items()}


def copy_bandwidth(megabytes: int = 512) -> float:
    """Bytes per second moved by ``np.copyto`` of a large float32 array (read + write), best of 5."""
    src = np.ones(megabytes * 2**18, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def shared_model(arch: str, k: int, folder: Path, seed: int):
    """Our PaDiM on the peer's network: the ``network.pth`` that bench/peer_worker.py wrote
    (torchvision's layout) converted by ``python -m models.convert_weights``'s main (its "wrote"
    line to stderr) and given as ``--pretrained``, with the peer's channels (sorted: the distances
    do not depend on their order) and regulariser (:data:`ANOMALIB_EPS`)."""
    weights = folder / "network.pdparams"
    with contextlib.redirect_stdout(sys.stderr):
        convert_weights.main([str(folder / "network.pth"), str(weights), "--arch", arch])
    config = model_config("padim", arch=arch, k=k, image_size=SIZE, resize=SIZE, pretrained=str(weights),
                          seed=seed, eps=ANOMALIB_EPS)
    model = build_model(config, Runtime(cpu_threads=THREADS))
    model.channels = np.sort(np.load(folder / "channels.npy", allow_pickle=False))
    model.category = CATEGORY
    return model


def ours(arch: str, k: int, train: np.ndarray, test: np.ndarray, warmup: int, folder: Path,
         test_set: TestSet, seed: int, timed: bool) -> dict:
    """Our PaDiM on the peer's network (:func:`shared_model`): fit seconds; with ``timed``, ms per
    image of our runs and the trunk alone (taking turns; batch 1, and batch :data:`BATCH_LARGE` for
    :data:`BATCHED`) and statistics bytes of each export; from the :data:`SCORED` runs on every test
    image, each one's largest map deviation from the default export (``<run>_map_error``), the
    accuracy of :data:`ACCURACY` and the default export's maps (N, S, S) (``maps``). Without
    ``timed`` only the runs of :data:`ACCURACY` are built."""
    model = shared_model(arch, k, folder, seed)
    start = time.perf_counter()
    model.fit([train[i : i + BATCH] for i in range(0, len(train), BATCH)])
    out: dict = {"fit_seconds": time.perf_counter() - start}
    model.calibrate([train[:16]])
    options = PredictorOptions(cpu_threads=THREADS, enable_mkldnn=True, max_batch_size=1)
    openvino = dataclasses.replace(options, use_openvino=True)
    graphs: dict[str, Callable[[np.ndarray], list[np.ndarray]]] = {}
    if timed:
        trunk_file = save_static(model.trunk, [None, 3, SIZE, SIZE], str(folder / "trunk" / "model"))
        with ir_guard("pdmodel"):
            trunk_ov = save_static(model.trunk, [None, 3, SIZE, SIZE], str(folder / "trunk_ov" / "model"))
        out["trunk_bytes"] = (folder / "trunk" / "model.pdiparams").stat().st_size
        trunk_ov_params = str(folder / "trunk_ov" / "model.pdiparams")
        graphs = {"trunk": Predictor(trunk_file, str(folder / "trunk" / "model.pdiparams"), options).run,
                  "trunk_ov": Predictor(trunk_ov, trunk_ov_params, openvino).run,
                  "trunk_ov_bf16": Predictor(trunk_ov, trunk_ov_params,
                                             dataclasses.replace(openvino, precision="bf16")).run}
    runs = RUNS if timed else {name: RUNS[name] for name in ACCURACY if name in RUNS}
    for name in dict.fromkeys(export for export, _ in runs.values()):
        head, precision, split = EXPORTS[name]
        export_model(model, folder / name, "json", head=head, head_precision=precision, split=split)
        if timed:
            params = sum(path.stat().st_size for path in (folder / name).glob("*.pdiparams"))
            out[f"{name}_statistics_bytes"] = params - out["trunk_bytes"]
    for name, (export, precision) in runs.items():
        base = openvino if EXPORTS[export][2] else options
        graphs[name] = DeployedModel.load(folder / export, options=dataclasses.replace(
            base, precision=precision)).forward
    export_model(model, folder / "whole", "pdmodel")
    graphs["whole_ov_bf16"] = Predictor(str(folder / "whole" / "model.pdmodel"),
                                        str(folder / "whole" / "model.pdiparams"),
                                        dataclasses.replace(openvino, precision="bf16")).run
    if timed:
        out.update({f"{name}_ms": ms for name, ms in per_image_ms(graphs, test, warmup).items()})
        out.update({f"{name}_batch_ms": ms for name, ms in per_image_ms(
            {name: graphs[name] for name in BATCHED}, test, 1, BATCH_LARGE).items()})
    scored = {name: score_set(graphs[name], test_set.images) for name in SCORED if name in graphs}
    out["accuracy"] = {name: accuracy(*scored[name], test_set) for name in ACCURACY}
    out["maps"] = scored.pop("matmul")[0]
    for name, (maps, _) in scored.items():
        out[f"{name}_map_error"] = map_error(maps, out["maps"])
    return out


@dataclasses.dataclass(frozen=True)
class TestSet:
    """Every magnetic-tile test image, preprocessed (N, 3, S, S) float32, its label (N,) and its
    defect mask (N, S, S) bool."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


def load_test_set(root: Path) -> TestSet:
    """Every magnetic-tile test image under ``root``, in list_samples' order."""
    dataset = AnomalyDataset(list_samples(root, CATEGORY, "test"), Preprocess(SIZE))
    items = [dataset[index] for index in range(len(dataset))]
    return TestSet(np.stack([item["image"] for item in items]).astype(np.float32),
                   np.asarray([item["label"] for item in items]),
                   np.stack([item["mask"] > 0 for item in items]))


def score_set(run: Callable[[np.ndarray], list[np.ndarray]],
              images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps (N, S, S) and image scores (N,) of a fused run (outputs: maps (1, 1, S, S), scores (1,)),
    one image per call."""
    maps, scores = [], []
    for image in images:
        amap, score = run(image[None])[:2]
        maps.append(amap[0, 0])
        scores.append(float(np.asarray(score).reshape(-1)[0]))
    return np.stack(maps), np.asarray(scores)


def map_error(maps: np.ndarray, reference: np.ndarray) -> float:
    """Largest deviation of ``maps`` from ``reference`` (both (N, S, S)) over the largest |reference|."""
    return float(np.abs(maps - reference).max() / np.abs(reference).max())


def accuracy(maps: np.ndarray, scores: np.ndarray, test_set: TestSet) -> dict[str, float]:
    """Image AUROC, pixel AUROC and PRO of maps (N, S, S) and scores (N,) of ``test_set``."""
    scored = ScoredSet(scores, test_set.labels, maps, test_set.masks)
    row = metrics(scored, CATEGORY, eval_pro=True, rule="trapezoid")
    return {key: float(row[key]) for key in ("image_auroc", "pixel_auroc", "pro")}


def our_fit(arch: str, k: int, train: np.ndarray) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of our PaDiM fit as train.py runs it, phase by phase: the fit pass
    (the training images named as files, the calibration images' features kept), the threshold
    from up to 200 of them (train.py's default) and the inverse covariances (formed on save)."""
    config = model_config("padim", arch=arch, k=k, image_size=SIZE, resize=SIZE, pretrained="none", seed=0)
    model = build_model(config, Runtime(cpu_threads=THREADS))
    names = [f"train/{i:04d}.png" for i in range(len(train))]
    picked = calibration_indices(len(train), 200)
    model.keep_for_calibration([names[i] for i in picked])

    def batches(indices: list[int]) -> list[dict]:
        return [{"images": np.stack([train[i] for i in indices[first : first + BATCH]]),
                 "paths": [names[i] for i in indices[first : first + BATCH]]}
                for first in range(0, len(indices), BATCH)]

    phases, mark = {}, (time.perf_counter(), time.process_time())
    for phase, work in (("fit", lambda: model.fit(batches(list(range(len(train)))))),
                        ("threshold", lambda: model.calibrate(batches(picked))),
                        ("inverse", lambda: model.inv_cov)):
        work()
        now = (time.perf_counter(), time.process_time())
        phases[phase] = (now[0] - mark[0], now[1] - mark[1])
        mark = now
    return phases


def peers(venv: Path, arch: str, k: int, arrays: dict[str, Path], warmup: int, folder: Path,
          network: tuple[str, int] = ("timm", 0), fit_only: bool = False, timed: bool = True) -> dict:
    """anomalib's figures from bench/peer_worker.py run by the peer venv's python (its maps of
    ``arrays["score"]``, when given, in folder; see the worker's docstring)."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"error: {python} not found; create the peer venv first: "
                         "python bench/bench_peers.py --setup")
    spec = {"backbone": arch, "n_features": k, "threads": THREADS, "warmup": warmup,
            "train": str(arrays["train"]), "test": str(arrays["test"]),
            "out": str(folder / "peers.json"), "folder": str(folder), "fit_only": fit_only,
            "network": network[0], "seed": network[1], "timed": timed,
            "score": str(arrays.get("score", ""))}
    (folder / "spec.json").write_text(json.dumps(spec))
    run = subprocess.run([str(python), str(WORKER), str(folder / "spec.json")], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"error: the peer worker failed:\n{run.stderr[-3000:]}")
    return json.loads((folder / "peers.json").read_text())


def measure(arch: str, args: argparse.Namespace, bandwidth: float, test_set: TestSet | None) -> dict:
    """Both sides of one configuration on the same images, one network at a time: every
    measurement on the first of ``args.networks``, the scoring of ``test_set`` on each
    (``networks``)."""
    k, fit_count = CONFIGS[arch]
    fit_count = fit_count if args.fit_images is None else args.fit_images
    root = Path(args.data_path)
    train = load_images(root, "train", fit_count)
    test = load_images(root, "test", args.warmup + args.images)
    result: dict = {"arch": arch, "k": k, "networks": []}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        folder = Path(tmp)
        arrays = {"train": folder / "train.npy", "test": folder / "test.npy"}
        np.save(arrays["train"], train)
        np.save(arrays["test"], test)
        del train
        if args.fit_only:
            peer = peers(Path(args.venv), arch, k, arrays, args.warmup, folder, fit_only=True)
            train = np.load(arrays["train"], mmap_mode="r")
            return {**result, "ours": our_fit(arch, k, train), "peers": peer}
        assert test_set is not None
        arrays["score"] = folder / "score.npy"
        np.save(arrays["score"], test_set.images)
        train = np.load(arrays["train"], mmap_mode="r")
        for index, network in enumerate(args.networks):
            timed = index == 0
            peer = peers(Path(args.venv), arch, k, arrays, args.warmup, folder, network, timed=timed)
            mine = ours(arch, k, train, test, args.warmup, folder, test_set, network[1], timed)
            theirs = {name: np.load(folder / f"maps_{name}.npy")
                      for name in ("openvino_f32", "openvino_default")}
            peer["accuracy"] = {name: accuracy(maps, maps.max(axis=(1, 2)), test_set)
                                for name, maps in theirs.items()}
            peer["default_map_error"] = map_error(theirs["openvino_default"], theirs["openvino_f32"])
            maps, inner = mine.pop("maps"), np.s_[:, BORDER:-BORDER, BORDER:-BORDER]
            mine["vs_anomalib_f32"] = map_error(maps, theirs["openvino_f32"])
            mine["vs_anomalib_f32_inner"] = map_error(maps[inner], theirs["openvino_f32"][inner])
            result["networks"].append({"network": f"{network[0]}:{network[1]}", "ours": mine, "peers": peer})
            if timed:
                result.update(ours=mine, peers=peer)
    mine, limits = result["ours"], {}
    for name, (export, precision) in RUNS.items():
        trunk = ("trunk_ov" if EXPORTS[export][2] else "trunk") + ("_bf16" if precision == "bf16" else "")
        limits[name] = (float(np.median(mine[f"{trunk}_ms"]))
                        + 1000.0 * mine[f"{export}_statistics_bytes"] / bandwidth)
    return {**result, "limit_ms": limits}


def _ms(values: np.ndarray) -> str:
    return f"{np.median(values):.1f}"


def section(results: list[dict], args: argparse.Namespace, bandwidth: float, loads: tuple) -> str:
    """The docs/benchmarks.md section: float32 against the peers, the reduced-precision options,
    and batch 8."""
    lines = [
        "## Against anomalib's PaDiM (bench/bench_peers.py)", "",
        f"Command: `python bench/bench_peers.py --configs {' '.join(args.configs)}"
        f"{'' if args.fit_images is None else f' --fit_images {args.fit_images}'} --images "
        f"{args.images} --warmup {args.warmup} --networks {' '.join(f'{k}:{n}' for k, n in args.networks)}` "
        "(after `--setup`) "
        f"on {machine()}; {load_note(*loads)}.", "",
        "Both sides run one network: anomalib's random-initialised backbone "
        f"(`{args.networks[0][0]}:{args.networks[0][1]}`: {NETWORK_TEXT[args.networks[0][0]]}), "
        "written by the peer worker as a torchvision state dict, converted by `python -m "
        "models.convert_weights` and loaded by ours as `--pretrained`, with anomalib's channel "
        f"choice and regulariser (`--eps {ANOMALIB_EPS}`). "
        f"{SIZE} px magnetic-tile images, {THREADS} threads; median ms "
        f"per image over {args.images} test images after {args.warmup} warm-up images, batch 1, the "
        "same preprocessed images for every side (our runs and trunks taking turns on each image; "
        "the peers in their own process, before ours). `--split` exports run their features graph "
        "in Paddle Inference's OpenVINO engine (`infer.py --use_openvino True`), their head graph "
        "with oneDNN. Limit = the trunk alone (on the same engine, at the same precision) + its "
        "statistics read once at the numpy copy bandwidth (read + write): "
        f"{bandwidth / 1e9:.1f} GB/s.", "",
        "### float32", "",
        "| backbone, k | ours, fused (oneDNN) | its limit | ours, `--head kernel` | its limit "
        "| ours, `--head kernel --split`, OpenVINO engine | its limit "
        "| anomalib eager | anomalib ONNX Runtime | anomalib OpenVINO f32 "
        "| anomalib OpenVINO f32 / ours split "
        "| trunk alone: ours oneDNN / ours OpenVINO engine / anomalib OpenVINO f32 "
        "| fit s: ours / anomalib (images) |",
        "|---" * 13 + "|",
    ]
    for r in results:
        mine, peer = r["ours"], r["peers"]
        cells = [cell for name in ("matmul", "kernel", "split")
                 for cell in (_ms(mine[f"{name}_ms"]), f"{r['limit_ms'][name]:.1f}")]
        cells += [_ms(peer[key]) for key in ("eager_ms", "onnxruntime_ms", "openvino_f32_ms")]
        cells.append(f"{np.median(peer['openvino_f32_ms']) / np.median(mine['split_ms']):.2f}x")
        cells.append(f"{_ms(mine['trunk_ms'])} / {_ms(mine['trunk_ov_ms'])} / "
                     f"{_ms(peer['openvino_f32_trunk_ms'])}")
        cells.append(f"{mine['fit_seconds']:.1f} / {peer['fit_seconds']:.1f} ({peer['train_images']})")
        lines.append(f"| {r['arch']}, k={r['k']} | {' | '.join(cells)} |")
    lines += [
        "", "### Reduced precision", "",
        "Map error: the largest deviation of the maps from our float32 fused export's (anomalib: "
        "from its own OpenVINO f32 maps) over all magnetic-tile test images, as a fraction of the "
        "largest map value. Accuracy: image AUROC / pixel AUROC / PRO on all of them.", "",
        "| backbone, k | run | ms/image | its limit | statistics MiB | map error | accuracy "
        "| anomalib OpenVINO default / this |",
        "|---" * 8 + "|",
    ]
    labels = {"matmul": "ours, fused float32 (the reference)",
              "kernel_fp16": "ours, `--head kernel --head_precision fp16`",
              "split_fp16": "ours, `--head kernel --head_precision fp16 --split`, OpenVINO engine",
              "split_bf16": "ours, `--head kernel --head_precision fp16 --split`, `infer.py "
                            "--use_openvino True --precision bf16`"}
    for r in results:
        mine, peer = r["ours"], r["peers"]
        default_ms = float(np.median(peer["openvino_default_ms"]))
        for name, label in labels.items():
            export = RUNS[name][0]
            scores = mine["accuracy"].get(name)
            lines.append(" | ".join([
                f"| {r['arch']}, k={r['k']}", label, _ms(mine[f"{name}_ms"]), f"{r['limit_ms'][name]:.1f}",
                f"{mine[f'{export}_statistics_bytes'] / 2**20:.0f}",
                "0" if name == "matmul" else f"{mine[f'{name}_map_error']:.2e}",
                " / ".join(f"{v:.4f}" for v in scores.values()) if scores else "",
                f"{default_ms / np.median(mine[f'{name}_ms']):.2f}x |"]))
        whole = " / ".join(f"{v:.4f}" for v in mine["accuracy"]["whole_ov_bf16"].values())
        lines.append(f"| {r['arch']}, k={r['k']} | ours, fused, whole graph in the OpenVINO engine at bf16 "
                     f"(`--format pdmodel`, not offered) | {_ms(mine['whole_ov_bf16_ms'])} | | | "
                     f"{mine['whole_ov_bf16_map_error']:.2e} | {whole} | |")
        theirs = {name: " / ".join(f"{v:.4f}" for v in values.values())
                  for name, values in peer["accuracy"].items()}
        lines.append(f"| {r['arch']}, k={r['k']} | anomalib, OpenVINO f32 | {_ms(peer['openvino_f32_ms'])} "
                     f"| | | 0 | {theirs['openvino_f32']} | |")
        lines.append(f"| {r['arch']}, k={r['k']} | anomalib, OpenVINO default "
                     f"({peer['openvino_default_precision']}) | {default_ms:.1f} | | | "
                     f"{peer['default_map_error']:.2e} | {theirs['openvino_default']} | 1.00x |")
    lines += [
        "", "### bfloat16 on one network, by network", "",
        "Each row is another random network and channel choice (KIND:SEED, torch seed; "
        + "; ".join(f"{kind}: {text}" for kind, text in NETWORK_TEXT.items())
        + "), shared by both sides. float32 maps: the largest deviation of our fused float32 maps from "
        "anomalib's OpenVINO f32 maps, as a fraction of the largest of theirs (the same network, "
        "channels, regulariser and images; anomalib forms and inverts its covariances in float32, "
        "ours in float64), over the whole map / beyond the blur's radius "
        f"({BORDER} px) from the border: within it the blurs' border rules differ (ours scipy's "
        "`reflect`, as PaDiM's reference code; anomalib's kornia mirrors about the edge pixel). "
        "Then, for each bf16 run: its map error "
        "against its own float32 run; image AUROC / pixel AUROC / PRO change from that run's "
        "float32 accuracy; all test images.", "",
        "| backbone, k | network | float32 maps: ours vs anomalib, whole / inner "
        "| PRO float32: ours / anomalib | ours, `--head_precision fp16 --split`, `--precision bf16` "
        "| ours, whole graph, OpenVINO engine bf16 | anomalib, OpenVINO default |",
        "|---" * 7 + "|",
    ]
    for r in results:
        for run in r["networks"]:
            mine, peer = run["ours"], run["peers"]
            cells = [shift(mine[f"{name}_map_error"], mine["accuracy"][name], mine["accuracy"]["matmul"])
                     for name in ("split_bf16", "whole_ov_bf16")]
            cells.append(shift(peer["default_map_error"], peer["accuracy"]["openvino_default"],
                               peer["accuracy"]["openvino_f32"]))
            pro = f"{mine['accuracy']['matmul']['pro']:.4f} / {peer['accuracy']['openvino_f32']['pro']:.4f}"
            lines.append(f"| {r['arch']}, k={r['k']} | {run['network']} | {mine['vs_anomalib_f32']:.1e} / "
                         f"{mine['vs_anomalib_f32_inner']:.1e} | "
                         f"{pro} | {' | '.join(cells)} |")
    lines += [
        "", f"### Batch {BATCH_LARGE}", "",
        f"Median ms per image over batches of {BATCH_LARGE} (after one warm-up batch), against batch 1 "
        "above; the OpenVINO engine gets one image per call (infer.py's rule), the fused oneDNN "
        "export a whole batch when its export checked batches (deploy.json `batched`); `trunk` and "
        "`trunk_ov` are the trunks' own predictors, fed whole batches. Best gain if batched = "
        "batch-1 time / (the trunk's batch time per image + the statistics read once per batch); "
        "for the engine's runs (split) it assumes an engine that took batches.", "",
        f"| backbone, k | run | batch 1 | batch {BATCH_LARGE}, per image | throughput gain "
        "| best gain if batched |",
        "|---" * 6 + "|",
    ]
    for r in results:
        mine = r["ours"]
        for name in BATCHED:
            one, many = float(np.median(mine[f"{name}_ms"])), float(np.median(mine[f"{name}_batch_ms"]))
            best = ""
            if name in RUNS:
                export, precision = RUNS[name]
                trunk = ("trunk_ov" if EXPORTS[export][2] else "trunk")
                floor = (float(np.median(mine[f"{trunk}_batch_ms"])) * (1 if precision == "fp32" else
                         float(np.median(mine["trunk_ov_bf16_ms"]) / np.median(mine["trunk_ov_ms"])))
                         + 1000.0 * mine[f"{export}_statistics_bytes"] / bandwidth / BATCH_LARGE)
                best = f"{one / floor:.2f}x"
            lines.append(f"| {r['arch']}, k={r['k']} | {name} | {one:.1f} | {many:.1f} | {one / many:.2f}x "
                         f"| {best} |")
    peer = results[0]["peers"]
    flags = ", ".join(peer["bf16_flags"]) or "none"
    lines += ["", f"- Peers: torch {peer['torch']}, OpenVINO {peer['openvino']}, ONNX Runtime "
              f"{peer['onnxruntime']}; CPU bf16 flags: {flags}. Fit: both sides from the same "
              f"in-memory images in batches of {BATCH} (anomalib: PadimModel's training forward and "
              "fit(), without Lightning's loop); ours: model.fit as train.py runs it."]
    lines += [f"- {r['arch']}, network {run['network']}: anomalib's fit raised `{run['peers']['fit_error']}` "
              "in torch.linalg.inv; the worker inverted the same covariances with numpy (float64) so "
              "that inference could run (the fit time shown stops at the failure)."
              for r in results for run in r["networks"] if run["peers"].get("fit_error")]
    return "\n".join(lines)


def shift(error: float, scores: dict[str, float], reference: dict[str, float]) -> str:
    """``map error; image AUROC / pixel AUROC / PRO change`` of a reduced-precision run."""
    return f"{error:.2e}; " + " / ".join(f"{scores[key] - reference[key]:+.1e}" for key in reference)


def fit_section(results: list[dict], args: argparse.Namespace, loads: tuple) -> str:
    """The docs/benchmarks.md section of ``--fit_only``."""
    images = f" --fit_images {args.fit_images}" if args.fit_images is not None else ""
    notes: list[str] = []
    lines = [
        "## Fit against anomalib's PaDiM (bench/bench_peers.py --fit_only)", "",
        f"Command: `python bench/bench_peers.py --fit_only --configs {' '.join(args.configs)}{images}` "
        f"(after `--setup`) on {machine()}; {load_note(*loads)}.",
        "",
        f"{SIZE} px magnetic-tile training images held in memory (the same preprocessed arrays on both "
        f"sides), random-initialised backbones, {THREADS} threads, batches of {BATCH}. Ours: PaDiM as "
        "train.py runs it (fit pass with the calibration images' features kept, threshold from up "
        "to 200 of them scored out of fold, inverse covariances); anomalib: PadimModel's training "
        "forward and fit() (mean, covariance and its inverse), without Lightning's loop. Seconds, "
        "wall / process CPU.",
        "",
        "| backbone, k, images | ours: fit pass | threshold | inverse | ours: total | anomalib fit | "
        "anomalib / ours (wall) | (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mine, peer = r["ours"], r["peers"]
        wall = sum(v[0] for v in mine.values())
        cpu = sum(v[1] for v in mine.values())
        cells = [f"{mine[p][0]:.1f} / {mine[p][1]:.1f}" for p in ("fit", "threshold", "inverse")]
        failed = " (failed)" if peer.get("fit_error") else ""
        lines.append(f"| {r['arch']}, k={r['k']}, {peer['train_images']} | {' | '.join(cells)} | "
                     f"{wall:.1f} / {cpu:.1f} | {peer['fit_seconds']:.1f} / {peer['fit_cpu_seconds']:.1f}"
                     f"{failed} | {peer['fit_seconds'] / wall:.2f} | {peer['fit_cpu_seconds'] / cpu:.2f} |")
        if peer.get("fit_error"):
            notes.append(f"{r['arch']}: anomalib's fit raised `{peer['fit_error']}` after the time shown, "
                         "in torch.linalg.inv of its covariances + 0.01 I (smallest eigenvalue at least "
                         "0.01, so not singular; numpy inverts them).")
    lines += ["", *[f"- {note}" for note in notes], f"- Peers: torch {results[0]['peers']['torch']}."]
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    if args.setup:
        setup(Path(args.venv))
        return 0
    if args.images + args.warmup < 2 * BATCH_LARGE:
        raise SystemExit(f"error: --images {args.images} --warmup {args.warmup}: the batch-{BATCH_LARGE} "
                         f"timings need at least {2 * BATCH_LARGE} images in all (one warm-up batch)")
    root = Path(args.data_path)
    if not (root / CATEGORY).is_dir():
        convert(SOURCE, root)
    start_load = os.getloadavg()[0]
    bandwidth = 0.0 if args.fit_only else copy_bandwidth()
    test_set = None if args.fit_only else load_test_set(root)
    results = []
    for arch in args.configs:
        results.append(measure(arch, args, bandwidth, test_set))
        print(f"{arch}: done", file=sys.stderr)
    loads = (start_load, os.getloadavg()[0])
    if args.fit_only:
        body = fit_section(results, args, loads)
        print(body)
        if not args.no_doc:
            update_section("bench_peers_fit", body)
        return 0
    body = section(results, args, bandwidth, loads)
    print(body)
    if not args.no_doc:
        update_section("bench_peers", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
