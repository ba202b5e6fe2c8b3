"""eval.py --plots and engine.plots: files written, and the curves drawn are the metrics' own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.evaluate import ScoredSet
from engine.metrics import pro_auc, pro_curve, roc_curve
from engine.plots import HIST_BINS, plot_histogram, plot_pro, plot_roc, write_plots

ROOT = Path(__file__).resolve().parents[1]


def _is_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.size[0] > 100


def test_roc_plot_draws_the_metric_points(tmp_path):
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    x, y = plot_roc(labels, scores, tmp_path / "roc.png", "roc")
    fpr, tpr = roc_curve(labels, scores)
    np.testing.assert_array_equal(x, fpr)
    np.testing.assert_array_equal(y, tpr)
    # Hand-worked: descending scores 0.9(1) 0.8(1) 0.4(0) 0.35(1) 0.2(0) 0.1(0).
    np.testing.assert_allclose(x, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(y, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    assert _is_png(tmp_path / "roc.png")


def test_pro_plot_draws_the_metric_points(tmp_path):
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 4:7, 5:7] = True
    maps = rng.random((2, 8, 8)) + masks
    x, y = plot_pro(masks, maps, tmp_path / "pro.png", "pro")
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_array_equal(x, fpr)
    np.testing.assert_array_equal(y, pro)
    assert (x[0], y[0], x[-1], y[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert _is_png(tmp_path / "pro.png")


def test_pro_curve_hand_case():
    # One image, one 2-pixel region scored 0.9 and 0.5, two normal pixels scored 0.7 and 0.1.
    masks = np.array([[[True, True, False, False]]])
    maps = np.array([[[0.9, 0.5, 0.7, 0.1]]])
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])
    # pro_auc integrates that curve to FPR 0.3: 0.5 over [0, 0.3] -> 0.5.
    assert pro_auc(masks, maps) == pytest.approx(0.5)


def test_histogram_counts_and_threshold(tmp_path):
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([1.0, 2.0, 2.0, 5.0, 9.0])
    drawn = plot_histogram(labels, scores, 4.0, tmp_path / "hist.png", "hist")
    assert drawn["edges"][0] == 1.0 and drawn["edges"][-1] == 9.0 and len(drawn["edges"]) == HIST_BINS + 1
    np.testing.assert_array_equal(drawn["good"], np.histogram([1.0, 2.0, 2.0], bins=drawn["edges"])[0])
    np.testing.assert_array_equal(drawn["defective"], np.histogram([5.0, 9.0], bins=drawn["edges"])[0])
    assert drawn["good"].sum() == 3 and drawn["defective"].sum() == 2
    # The threshold widens the common range when it lies outside the scores.
    wide = plot_histogram(labels, scores, 12.0, tmp_path / "wide.png", "hist")
    assert wide["edges"][-1] == 12.0
    assert _is_png(tmp_path / "hist.png")


def test_write_plots_skips_what_cannot_be_drawn(tmp_path, capsys):
    scored = ScoredSet(scores=np.array([1.0, 2.0]), labels=np.array([0, 0]),
                       maps=np.zeros((2, 4, 4), np.float32), masks=None)
    written = write_plots(tmp_path, "cat", scored, 1.5)
    assert written == [tmp_path / "cat_hist.png"]
    err = capsys.readouterr().err
    assert "ROC plot skipped" in err and "PRO plot skipped" in err


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True)


def test_train_and_eval_plots_write_the_same_pngs_beside_results(demo_root, tmp_path):
    """train.py --eval --plots draws from the model it just fitted, eval.py --plots from the saved
    checkpoint: the same pictures (pixel for pixel but for anti-aliasing noise), beside results.csv."""
    common = ["--data_path", str(demo_root), "--category", "tiles", "--resize", "64",
              "--pretrained", "none", "--engine", "dynamic", "--num_workers", "0"]
    models = tmp_path / "models"
    fit = _run("train.py", *common, "--save_path", str(models), "--eval", "--plots")
    assert fit.returncode == 0, fit.stderr
    trained = models / "ortho_resnet18_100"
    report = tmp_path / "report"
    run = _run("eval.py", *common, "--model_path", str(trained), "--save_path", str(report), "--plots")
    assert run.returncode == 0, run.stderr
    out = report / "ortho_resnet18_100"  # eval.py --save_path: SAVE_PATH/<run_name>/
    assert (out / "results.csv").read_text() == (trained / "results.csv").read_text()
    for kind in ("roc", "pro", "hist"):
        for folder, proc in ((out, run), (trained, fit)):
            assert _is_png(folder / f"tiles_{kind}.png"), (folder, kind)
            assert str(folder / f"tiles_{kind}.png") in proc.stdout
        with Image.open(out / f"tiles_{kind}.png") as a, Image.open(trained / f"tiles_{kind}.png") as b:
            a, b = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
        assert a.shape == b.shape and (a != b).any(axis=-1).mean() < 1e-3, kind


@pytest.mark.bad_input
def test_train_plots_without_eval_stops(demo_root, tmp_path):
    run = _run("train.py", "--data_path", str(demo_root), "--category", "tiles", "--pretrained", "none",
               "--save_path", str(tmp_path), "--plots")
    assert run.returncode == 2
    assert "error: --plots draws the test scores that --eval computes: add --eval" in run.stderr
    assert not any(tmp_path.iterdir())  # stopped before fitting
