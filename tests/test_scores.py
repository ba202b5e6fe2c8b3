"""The normalised score: definition, what calibrate stores, and predict.py / infer.py output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.scores import normalized_score
from datasets import AnomalyDataset, BatchLoader, Preprocess, list_samples
from models import build_model, model_config
from models.checkpoint import read_npz, write_npz

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)


@pytest.mark.parametrize(("score", "expected"), [
    (2.0, 0.0),     # the lowest training score
    (6.0, 0.5),     # the threshold
    (4.0, 0.25),    # half way between
    (8.0, 0.75),
    (10.0, 1.0),    # the reference maximum 2 * 6 - 2
    (13.0, 1.0),    # clipped above
    (0.5, 0.0),     # clipped below
])
def test_normalized_score_hand_values(score, expected):
    assert normalized_score(score, 2.0, 6.0) == pytest.approx(expected)


def test_normalized_score_without_scale():
    got = normalized_score(np.array([1.0, 3.0, 5.0]), 3.0, 3.0)
    np.testing.assert_array_equal(got, [0.0, 0.5, 1.0])


@pytest.fixture(scope="module")
def checkpoint(demo_root, tmp_path_factory) -> tuple[Path, float, float]:
    """An ortho checkpoint of "tiles" (64 px, random backbone) and its calibration min / max."""
    model = build_model(model_config("ortho", image_size=64, resize=64, pretrained="none"))
    train = AnomalyDataset(list_samples(demo_root, "tiles", "train"), Preprocess(64))
    model.fit(BatchLoader(train, batch_size=4))
    scores = np.concatenate(list(model.calibration_scores(BatchLoader(train, batch_size=4))))
    assert model.calibrate(BatchLoader(train, batch_size=4)) == pytest.approx(scores.max())
    assert model.score_min == pytest.approx(scores.min())
    assert model.score_min < model.threshold
    model.category = "tiles"
    path = tmp_path_factory.mktemp("scores") / "tiles.npz"
    model.save(str(path))
    return path, float(scores.min()), float(scores.max())


def _lines(stdout: str) -> list[tuple[float, float]]:
    """(score, normalized) of each ``PATH score=S normalized=N anomalous=...`` line."""
    found = []
    for line in stdout.splitlines():
        if " score=" in line:
            fields = dict(part.split("=") for part in line.split()[1:])
            found.append((float(fields["score"]), float(fields["normalized"])))
    return found


def test_predict_reports_normalized_score(checkpoint, images_dir, tmp_path):
    path, low, high = checkpoint
    proc = run("predict.py", images_dir, "--model_path", path, "--save_path", tmp_path / "p")
    assert proc.returncode == 0, proc.stderr
    assert "stores no minimum" not in proc.stderr
    lines = _lines(proc.stdout)
    records = [json.loads(x) for x in (tmp_path / "p" / "predict" / "results.jsonl").read_text().splitlines()]
    assert len(lines) == len(records) == 5
    for (score, normalized), record in zip(lines, records, strict=True):
        assert score == pytest.approx(record["score"], abs=1e-5)
        expected = float(np.clip(0.5 + 0.5 * (record["score"] - high) / (high - low), 0, 1))
        assert record["normalized_score"] == pytest.approx(expected)
        assert normalized == pytest.approx(expected, abs=1e-4)
        assert (normalized > 0.5) == (record["label"] == "anomalous")


@pytest.mark.bad_input
def test_old_checkpoint_falls_back_to_zero_minimum(checkpoint, images_dir, tmp_path):
    path, _, high = checkpoint
    meta, arrays = read_npz(str(path))
    del meta["score_min"]  # as written before the minimum was recorded
    old = tmp_path / "old.npz"
    write_npz(str(old), meta, arrays)
    proc = run("predict.py", images_dir, "--model_path", old, "--save_path", tmp_path / "p")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(f"note: {old} stores no minimum training score") == 1
    for score, normalized in _lines(proc.stdout):
        assert normalized == pytest.approx(min(max(0.5 * score / high, 0.0), 1.0), abs=1e-4)


def test_export_and_infer_carry_the_minimum(checkpoint, images_dir, tmp_path):
    path, low, high = checkpoint
    export = tmp_path / "export"
    proc = run("export_model.py", "--method", "ortho", "--model_path", path, "--save_dir", export,
               "--img_size", 64)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((export / "deploy.json").read_text())
    assert manifest["score_min"] == pytest.approx(low)
    proc = run("infer.py", "--model_file", export / "model.json", "--input_file", images_dir,
               "--save_path", tmp_path / "i")
    assert proc.returncode == 0, proc.stderr
    for score, normalized in _lines(proc.stdout):
        expected = np.clip(0.5 + 0.5 * (score - high) / (high - low), 0, 1)
        assert normalized == pytest.approx(expected, abs=2e-4)
    del manifest["score_min"]  # an export made before the minimum was recorded
    (export / "deploy.json").write_text(json.dumps(manifest))
    proc = run("infer.py", "--model_file", export / "model.json", "--input_file", images_dir,
               "--save_path", tmp_path / "j")
    assert proc.returncode == 0, proc.stderr
    assert "stores no minimum training score" in proc.stderr
    for score, normalized in _lines(proc.stdout):
        assert normalized == pytest.approx(min(0.5 * score / high, 1.0), abs=2e-4)
