"""End-to-end tests of train.py -> eval.py -> predict.py, and of their handling of bad input.

Scripts run as subprocesses (as users run them) with a random-initialised resnet18 on small
generated data; values are checked against the Python API on the same checkpoints.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datasets import AnomalyDataset, Preprocess, list_samples, read_image
from datasets.loader import BatchLoader
from datasets.synthetic import generate
from engine.evaluate import metrics, score_batches
from models import load_model

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--pretrained", "none", "--arch", "resnet18", "--k", "16", "--resize", "64",
        "--batch_size", "8", "--cpu_threads", "2"]


def run(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=600)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e") / "demo"
    return generate(root, n_train=16, n_test_good=4, n_test_defect=4, size=64, seed=1)


@pytest.fixture(scope="module", params=["ortho", "padim"])
def trained(request: pytest.FixtureRequest, data: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    method = request.param
    out = tmp_path_factory.mktemp(f"out-{method}")
    proc = run("train.py", "--data_path", str(data), "--category", "all", "--method", method,
               *FAST, "--save_path", str(out), "--eval", "--eval_PRO")
    assert proc.returncode == 0, proc.stderr
    return method, out / f"{method}_resnet18_16"


def test_train_writes_checkpoints_and_results(trained: tuple[str, Path], data: Path) -> None:
    method, folder = trained
    assert sorted(p.name for p in folder.glob("*.npz")) == ["disc.npz", "tiles.npz"]
    rows = read_csv(folder / "results.csv")
    assert list(rows[0]) == ["category", "image_auroc", "pixel_auroc", "pro"]
    assert [r["category"] for r in rows] == ["disc", "tiles", "mean"]
    for row in rows:
        for key in ("image_auroc", "pixel_auroc", "pro"):
            assert 0.0 <= float(row[key]) <= 1.0
    # The generated defects are strong: even a random backbone separates them.
    assert float(rows[-1]["image_auroc"]) >= 0.9
    assert float(rows[-1]["pixel_auroc"]) >= 0.8
    mean = np.mean([float(r["pro"]) for r in rows[:2]])
    assert float(rows[-1]["pro"]) == pytest.approx(mean, abs=1e-6)
    assert (folder / "results.md").read_text().startswith("| category |")
    # Metrics recomputed through the Python API from the saved checkpoint agree.
    model = load_model(str(folder / "disc.npz"), expect={"method": method, "k": 16})
    dataset = AnomalyDataset(list_samples(data, "disc", "test"), Preprocess(64))
    scored = score_batches(model, BatchLoader(dataset, 8, 0))
    row = metrics(scored, "disc", eval_pro=True, rule="trapezoid")
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert row[key] == pytest.approx(float(rows[0][key]), abs=1e-5)


def test_eval_reproduces_train_results(trained: tuple[str, Path], data: Path,
                                       tmp_path: Path) -> None:
    method, folder = trained
    proc = run("eval.py", "--data_path", str(data), "--category", "disc,tiles", "--method",
               method, *FAST, "--model_path", str(folder), "--save_path", str(tmp_path),
               "--eval_PRO")
    assert proc.returncode == 0, proc.stderr
    # --save_path is a root as in train.py: the results go to SAVE_PATH/<method>_<arch>_<k>/.
    assert read_csv(tmp_path / folder.name / "results.csv") == read_csv(folder / "results.csv")


def test_predict_lines_pictures_and_scores(trained: tuple[str, Path], data: Path,
                                           tmp_path: Path) -> None:
    method, folder = trained
    inputs = [str(data / "tiles" / "test" / "spot"), str(data / "tiles" / "test" / "good" / "000.png")]
    proc = run("predict.py", *inputs, "--model_path", str(folder), "--category", "tiles",
               "--save_path", str(tmp_path), "--engine", "dynamic")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " score=" in line]
    assert len(lines) == 5
    # --save_path is a root as in train.py: the output goes to SAVE_PATH/predict/.
    records = [json.loads(x) for x in (tmp_path / "predict" / "results.jsonl").read_text().splitlines()]
    model = load_model(str(folder / "tiles.npz"))
    paths = [Path(r["path"]) for r in records]
    images = np.stack([Preprocess(64)(read_image(p)) for p in paths])
    _, scores = model.score(images)
    for record, score, line in zip(records, scores, lines, strict=True):
        assert record["score"] == pytest.approx(float(score), rel=1e-4)
        assert record["threshold"] == pytest.approx(model.threshold)
        expected = "yes" if record["score"] > model.threshold else "no"
        assert line.endswith(f"anomalous={expected}")
        assert Path(record["image"]).is_file()
    # The threshold override changes the decision.
    proc = run("predict.py", inputs[1], "--model_path", str(folder / "tiles.npz"),
               "--save_path", str(tmp_path / "t"), "--threshold", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].endswith("anomalous=yes")


def test_same_seed_same_checkpoint(trained: tuple[str, Path], data: Path, tmp_path: Path) -> None:
    method, folder = trained
    proc = run("train.py", "--data_path", str(data), "--category", "disc", "--method", method,
               *FAST, "--save_path", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    with np.load(folder / "disc.npz") as a, np.load(tmp_path / f"{method}_resnet18_16/disc.npz") as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


@pytest.mark.bad_input
def test_corrupt_training_image_fails_cleanly(data: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(data / "disc", root / "disc")
    bad = root / "disc" / "train" / "good" / "003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    out = tmp_path / "out"
    line = _error_line(run("train.py", "--data_path", str(root), "--category", "disc", *FAST,
                           "--save_path", str(out)))
    assert line.startswith(f"error: {bad}: cannot read image (")
    assert not list(out.rglob("*.npz")) and not list(out.rglob("*tmp*"))


@pytest.mark.bad_input
def test_bad_arguments_and_folders(data: Path, tmp_path: Path) -> None:
    line = _error_line(run("train.py", "--data_path", str(data), "--category", "nope", *FAST))
    assert "nope" in line and "category folder not found" in line
    empty = tmp_path / "empty"
    (empty / "cat" / "train" / "good").mkdir(parents=True)
    line = _error_line(run("train.py", "--data_path", str(empty), "--category", "cat", *FAST))
    assert str(empty / "cat" / "train" / "good") in line
    line = _error_line(run("train.py", "--data_path", str(data), "--category", "disc", *FAST,
                           "--device", "gpu"))
    assert "CPU-only" in line


@pytest.mark.bad_input
def test_checkpoint_of_another_configuration(trained: tuple[str, Path], data: Path) -> None:
    method, folder = trained
    args = ["--data_path", str(data), "--category", "disc", "--method", method, *FAST,
            "--model_path", str(folder)]
    line = _error_line(run("eval.py", *args, "--k", "32"))
    assert line.startswith(f"error: {folder / 'disc.npz'}: checkpoint has ") and "was asked for" in line
    assert "k=16" in line and "k=32" in line
    other = "padim" if method == "ortho" else "ortho"
    line = _error_line(run("eval.py", *args, "--method", other))
    assert f"method={method}" in line


def test_missing_masks_skip_pixel_metrics(data: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(data / "tiles", root / "tiles")
    shutil.rmtree(root / "tiles" / "ground_truth" / "spot")
    out = tmp_path / "out"
    proc = run("train.py", "--data_path", str(root), "--category", "tiles", *FAST,
               "--save_path", str(out), "--eval", "--eval_PRO")
    assert proc.returncode == 0, proc.stderr
    assert "pixel metrics skipped" in proc.stderr
    row = read_csv(out / "ortho_resnet18_16" / "results.csv")[0]
    assert row["pixel_auroc"] == "" and row["pro"] == "" and float(row["image_auroc"]) > 0.5


@pytest.mark.bad_input
def test_mask_of_wrong_size_fails_cleanly(data: Path, tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(data / "tiles", root / "tiles")
    mask = root / "tiles" / "ground_truth" / "spot" / "001_mask.png"
    Image.new("L", (10, 12)).save(mask)
    line = _error_line(run("train.py", "--data_path", str(root), "--category", "tiles", *FAST,
                           "--save_path", str(tmp_path / "out"), "--eval"))
    assert line.startswith(f"error: {mask}: mask is 10x12 but image ")
