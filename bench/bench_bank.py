"""Where PatchCore's per-image scoring time goes, on a bank of the size of coreset ratio 0.1.

    python -m datasets.magnetic_tile --src ../shared/data/magnetic_tile --dst data/mtd
    python bench/bench_bank.py [--data_path data/mtd] [--images 8] [--arch resnet18]
                               [--pretrained none] [--no_doc]

PatchCore (``--arch``, default resnet18; random init, seed 0, 256 px, 2 threads) fitted with
coreset ratio 1 on 76 magnetic-tile training images: a bank of 77,824 real patch features (384
wide for resnet18, 1,536 for wide_resnet50_2, the users' backbone), the size of the ratio-0.1 bank
of the full training set (78,028) without its minutes of coreset selection. Times,
per image (median of ``--images`` test images, wall and process CPU time), of three searches in the
same run, the images taking turns: brute force, the exact search pruned by principal-axis lower
bounds (``models.components.knn.HEAD`` leading coordinates) in standard Paddle ops, and the same
pruned search as one compiled CPU operator (``export_model.py --head kernel``):

- the fused scoring graph under Paddle Inference + oneDNN (the graph export_model.py writes and
  infer.py runs; ``model.score``: train.py --eval, predict.py; the compiled search only in exports
  made with ``--head kernel``);
- its parts: the patch features alone (trunk + local average), and the distance product alone (one
  numpy float32 matrix product of the 1,024 patches by the bank, the arithmetic floor of a brute-force
  search);
- the held-out score of a training image (threshold calibration, numpy), and the preparation of
  the bank it searches (centred, turned rows, norms, bounds), paid once per fit;
- the pruning rate: rows measured exactly per patch by the numpy search, of the bank's rows;
- the largest differences between the searches' maps and scores (the results must not change).

Writes the bench_bank section of docs/benchmarks.md (bench_bank_<arch> for another ``--arch``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import load_note, machine, update_section  # noqa: E402
from core.runtime import compile_layer  # noqa: E402
from datasets import AnomalyDataset, Preprocess, list_samples  # noqa: E402
from datasets.magnetic_tile import CATEGORY, convert  # noqa: E402
from models import Runtime, build_model, model_config  # noqa: E402
from models.components.knn import HEAD, PreparedBank  # noqa: E402
from models.patchcore.model import PatchCoreModel, PatchCoreScorer  # noqa: E402

SIZE, THREADS, FIT_IMAGES = 256, 2, 76
KERNEL = "kernel"
"""Key of the compiled search (PatchCoreModel.kernel_layer) among the searches timed."""
SOURCE = ROOT.parent / "shared" / "data" / "magnetic_tile"


def clocked(run: Callable[[int], object], count: int) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds of ``run(i)``, i < count, after one untimed call."""
    run(0)
    wall, cpu = [], []
    for i in range(count):
        start, start_cpu = time.perf_counter(), time.process_time()
        run(i)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1000.0 * float(np.median(wall)), 1000.0 * float(np.median(cpu))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="data/mtd")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "wide_resnet50_2"])
    parser.add_argument("--pretrained", default="none",
                        help="backbone weights: none (default), imagenet or PATH.pdparams")
    parser.add_argument("--no_doc", action="store_true", help="print only, leave docs/ alone")
    args = parser.parse_args()
    root = Path(args.data_path)
    if not (root / CATEGORY).is_dir():
        convert(SOURCE, root)
    load = os.getloadavg()[0]
    preprocess = Preprocess(SIZE)
    train = AnomalyDataset(list_samples(root, CATEGORY, "train")[:FIT_IMAGES], preprocess)
    test = AnomalyDataset(list_samples(root, CATEGORY, "test")[: args.images + 1], preprocess)
    images = np.stack([test[i]["image"] for i in range(len(test))])
    config = model_config("patchcore", arch=args.arch, image_size=SIZE, resize=SIZE,
                          pretrained=args.pretrained, seed=0, coreset_ratio=1.0)
    weights = "" if args.pretrained == "none" else f" --pretrained {args.pretrained}"
    arch = "" if args.arch == "resnet18" else f" --arch {args.arch}"
    model = build_model(config, Runtime(cpu_threads=THREADS))
    model.fit([np.stack([train[i]["image"] for i in range(j, min(j + 32, len(train)))])
               for j in range(0, len(train), 32)])
    patches = [next(model.extract(images[i : i + 1]))[1][0][0] for i in range(len(images))]
    bank = model.bank
    graphs = {head: compile_layer(scorer(model, head), SIZE, Runtime(cpu_threads=THREADS))
              for head in (0, HEAD)}
    graphs[KERNEL] = compile_layer(model.kernel_layer(), SIZE, Runtime(cpu_threads=THREADS))
    banks = {0: PreparedBank(bank, head=0), HEAD: PreparedBank(bank)}
    outputs = {head: [run(images[i : i + 1]) for i in range(len(images))] for head, run in graphs.items()}
    held_out = {}
    for head, prepared in banks.items():
        model._prepared = prepared
        held_out[head] = [model._image_score(patches[i], model.bank_owner == i) for i in range(args.images)]
    pruned = banks[HEAD].bounds
    pruned.searched = pruned.measured = 0
    for rows in patches:
        banks[HEAD].search(rows, 1)
    rate = pruned.measured / pruned.searched
    timed = {}
    for head in (0, HEAD):
        model._prepared = banks[head]
        timed[f"graph{head}"] = clocked(lambda i, h=head: graphs[h](images[i : i + 1]), args.images)
        timed[f"held{head}"] = clocked(lambda i: model._image_score(patches[i], model.bank_owner == i),
                                       args.images)
    timed[f"graph{KERNEL}"] = clocked(lambda i: graphs[KERNEL](images[i : i + 1]), args.images)
    timed["features"] = clocked(lambda i: next(model.extract(images[i : i + 1])), args.images)
    timed["product"] = clocked(lambda i: patches[i] @ bank.T, args.images)
    timed["prepare0"] = clocked(lambda i: PreparedBank(bank, head=0), 2)
    timed[f"prepare{HEAD}"] = clocked(lambda i: PreparedBank(bank), 2)
    map_diff, score_diff = {}, {}
    for search, reference in ((HEAD, 0), (KERNEL, 0), ("same", HEAD)):
        pairs = list(zip(outputs[KERNEL if search == "same" else search], outputs[reference], strict=True))
        map_diff[search] = max(float(np.abs(a[0] - b[0]).max() / np.abs(b[0]).max()) for a, b in pairs)
        score_diff[search] = max(abs(float(a[1][0] / b[1][0]) - 1.0) for a, b in pairs)
    held_diff = max(abs(a / b - 1.0) for a, b in zip(held_out[HEAD], held_out[0], strict=True))

    def row(name: str, *keys: str) -> str:
        cells = [f"{timed[key][0]:.0f} | {timed[key][1]:.0f}" for key in keys]
        cells += [" | "] * (3 - len(keys))
        return f"| {name} | {' | '.join(cells)} |"

    lines = [
        f"## PatchCore scoring time by part (bench/bench_bank.py{arch})", "",
        f"Command: `python bench/bench_bank.py --images {args.images}{arch}{weights}` on {machine()}; "
        f"{load_note(load, os.getloadavg()[0])}. PatchCore, {args.arch} "
        f"({weights.strip() or 'random init'}), "
        "256 px, 2 threads, bank of "
        f"{len(bank):,} x {bank.shape[1]} real patch features (coreset ratio 1 on {FIT_IMAGES} "
        "training images: the size of the ratio-0.1 bank of all 762); medians over "
        f"{args.images} test images. Brute force; pruned: the exact search pruned with lower bounds "
        f"from the first {HEAD} principal coordinates, in standard Paddle ops; compiled: the same "
        "search as one CPU operator (core/csrc/nearest_row.cc, `export_model.py --head kernel`).", "",
        "| part (ms per image) | brute force: wall | CPU | pruned: wall | CPU | compiled: wall | CPU |",
        "|---|---|---|---|---|---|---|",
        row("fused scoring graph, Paddle Inference + oneDNN (export_model.py / infer.py, model.score; "
            "compiled: `--head kernel` exports)", "graph0", f"graph{HEAD}", f"graph{KERNEL}"),
        row("&nbsp;&nbsp;patch features alone (trunk + 3x3 average)", "features"),
        row(f"&nbsp;&nbsp;brute-force distance product alone (numpy, 1,024 x {bank.shape[1]} by "
            f"{bank.shape[1]} x M)", "product"),
        row("held-out score of a training image (threshold, numpy)", "held0", f"held{HEAD}"),
        row("bank preparation, once per fit (ms per bank; both turn it into its principal axes)",
            "prepare0", f"prepare{HEAD}"),
        "",
        f"Pruning (numpy search, the same rule as the graph's): {rate:.1f} bank rows measured exactly "
        f"per patch on average, {rate / len(bank):.2e} of the bank (brute force measures all "
        f"{len(bank):,}). Results unchanged: largest relative difference from the brute-force graph's "
        f"maps {map_diff[HEAD]:.1e} (pruned) and {map_diff[KERNEL]:.1e} (compiled), image scores "
        f"{score_diff[HEAD]:.1e} and {score_diff[KERNEL]:.1e}; held-out scores (numpy, pruned) "
        f"{held_diff:.1e}. The compiled search against the standard-op pruned one (the same rule): "
        f"maps {map_diff['same']:.1e}, image scores {score_diff['same']:.1e}.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_doc:
        section = "bench_bank" + arch.replace(" --arch ", "_")
        update_section(section, body)
    return 0


def scorer(model: PatchCoreModel, head: int) -> PatchCoreScorer:
    """The model's fused scoring layer with a search of ``head`` leading coordinates (0: brute force)."""
    return PatchCoreScorer(model.fit_layer(), model.bank, min(model.options.num_neighbors, len(model.bank)),
                           model.grid, SIZE, model.config.sigma, head)


if __name__ == "__main__":
    sys.exit(main())
