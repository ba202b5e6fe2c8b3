"""Tests of engine.metrics against hand-computed values, scikit-learn and slow references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from engine.metrics import auc_midpoint, auc_trapezoid, pro_auc, roc_auc, roc_curve


def slow_roc(labels, scores):
    """ROC points by brute force: one threshold per distinct score, highest first."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    fpr, tpr = [0.0], [0.0]
    for threshold in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= threshold
        tpr.append(np.sum(predicted & labels) / np.sum(labels))
        fpr.append(np.sum(predicted & ~labels) / np.sum(~labels))
    return np.array(fpr), np.array(tpr)


def slow_pro_auc(masks, scores, fpr_limit=0.3):
    """PRO AUC by brute force: binarise at every distinct score, average the region overlaps."""
    masks = np.asarray(masks).astype(bool)
    regions = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        for region in range(1, count + 1):
            regions.append((index, labelled == region))
    normal = ~masks
    fpr, pro = [0.0], [0.0]
    for threshold in sorted(set(scores.ravel().tolist()), reverse=True):
        predicted = scores >= threshold
        overlaps = [predicted[index][region].mean() for index, region in regions]
        pro.append(np.mean(overlaps))
        fpr.append(np.sum(predicted & normal) / np.sum(normal))
    xs, ys = [], []
    for i, (x, y) in enumerate(zip(fpr, pro, strict=True)):
        if x <= fpr_limit:
            xs.append(x)
            ys.append(y)
            continue
        if xs[-1] < fpr_limit:
            x0, y0 = fpr[i - 1], pro[i - 1]
            xs.append(fpr_limit)
            ys.append(y0 + (y - y0) * (fpr_limit - x0) / (x - x0))
        break
    area = sum((xs[k + 1] - xs[k]) * (ys[k + 1] + ys[k]) / 2 for k in range(len(xs) - 1))
    return area / fpr_limit


# ---------------------------------------------------------------------------------------------
# ROC


def test_roc_auc_hand_computed():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    # Descending: 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg), so the curve is
    # (0,0) (0,.5) (.5,.5) (.5,1) (1,1). Trapezoid: .5*.5 + .5*1 = 0.75.
    # Midpoint, y[i] * (x[i+1] - x[i-1]) / 2 with x[-1] = 0 and x[5] = 1:
    # 0*(0-0)/2 + .5*(.5-0)/2 + .5*(.5-0)/2 + 1*(1-.5)/2 + 1*(1-.5)/2
    # = 0 + .125 + .125 + .25 + .25 = 0.75.
    assert roc_auc(labels, scores) == pytest.approx(0.75, abs=1e-15)
    assert roc_auc(labels, scores, rule="midpoint") == pytest.approx(0.75, abs=1e-15)


def test_roc_curve_merges_ties():
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.5, 0.5, 0.2, 0.9])
    fpr, tpr = roc_curve(labels, scores)
    # 0.9 (pos) -> (0, .5); the tie at 0.5 (pos + neg) is one point (.5, 1); 0.2 -> (1, 1).
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0, 1.0])
    # Trapezoid: .5 * (.5 + 1) / 2 + .5 * 1 = 0.875 (= 3.5 of 4 pairs, the tie counting half).
    # Midpoint: 0 + .5*(.5-0)/2 + 1*(1-0)/2 + 1*(1-.5)/2 = .125 + .5 + .25 = 0.875.
    assert roc_auc(labels, scores) == pytest.approx(0.875, abs=1e-15)
    assert roc_auc(labels, scores, rule="midpoint") == pytest.approx(0.875, abs=1e-15)


def test_auc_rules_on_a_partial_curve():
    x = np.array([0.2, 0.6])
    y = np.array([0.5, 1.0])
    # Trapezoid: (.6 - .2) * (.5 + 1) / 2 = 0.3.
    assert auc_trapezoid(x, y) == pytest.approx(0.3)
    # Midpoint: .5 * ((.2 + .6) / 2 - 0) + 1 * (1 - (.2 + .6) / 2) = .2 + .6 = 0.8
    # (= trapezoid .3 + y0 * x0 .1 + y1 * (1 - x1) .4).
    assert auc_midpoint(x, y) == pytest.approx(0.8)


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=(40, 50))
    scores = rng.integers(0, 12, size=(40, 50)) + labels * rng.integers(0, 3, size=(40, 50))
    expected = roc_auc_score(labels.ravel(), scores.ravel())
    assert roc_auc(labels, scores) == pytest.approx(expected, rel=1e-12)
    assert roc_auc(labels, scores, rule="midpoint") == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_sklearn_continuous(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(5000) < 0.2
    scores = rng.normal(size=5000) + labels.astype(np.float32)
    expected = roc_auc_score(labels, scores)
    assert roc_auc(labels, scores) == pytest.approx(expected, rel=1e-12)
    assert roc_auc(labels, scores.astype(np.float32)) == pytest.approx(
        roc_auc_score(labels, scores.astype(np.float32)), rel=1e-12
    )


@pytest.mark.parametrize("seed", range(5))
def test_roc_curve_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=300)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(300) + 0.3 * labels, 1)
    fpr, tpr = roc_curve(labels, scores)
    slow_fpr, slow_tpr = slow_roc(labels, scores)
    np.testing.assert_allclose(fpr, slow_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, slow_tpr, rtol=0, atol=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


@pytest.mark.parametrize("labels", [np.zeros(5, dtype=int), np.ones(5, dtype=int)])
def test_roc_single_class_raises(labels):
    with pytest.raises(ValueError, match="only one class"):
        roc_auc(labels, np.arange(5.0))


def test_roc_non_finite_raises_with_count():
    scores = np.array([0.1, np.nan, 0.3, np.inf])
    with pytest.raises(ValueError, match="2 non-finite"):
        roc_curve(np.array([0, 1, 0, 1]), scores)


def test_roc_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        roc_curve(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        roc_curve(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="rule"):
        roc_auc(np.array([0, 1]), np.array([0.1, 0.2]), rule="simpson")
    with pytest.raises(ValueError, match="non-decreasing"):
        auc_trapezoid(np.array([0.5, 0.2]), np.array([0.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# PRO


def test_pro_auc_single_region_by_hand():
    masks = np.array([[[1, 1], [0, 0]]])
    scores = np.array([[[0.9, 0.2], [0.5, 0.1]]])
    # Descending: .9 (region, PRO .5), .5 (normal, FPR .5), .2 (region, PRO 1), .1 (normal).
    # Curve (0,0) (0,.5) (.5,.5) (.5,1) (1,1): PRO = .5 on [0, .3], area .15, / .3 = 0.5.
    assert pro_auc(masks, scores) == pytest.approx(0.5)
    # Over the whole FPR range: .5 * .5 + .5 * 1 = 0.75.
    assert pro_auc(masks, scores, fpr_limit=1.0) == pytest.approx(0.75)


def test_pro_auc_averages_over_regions_not_pixels():
    # One 1x7 image: region A = pixel 0 (size 1), region B = pixels 2..4 (size 3), 3 normals.
    masks = np.array([[[1, 0, 1, 1, 1, 0, 0]]])
    scores = np.array([[[0.9, 0.8, 0.7, 0.6, 0.5, 0.2, 0.1]]])
    # .9 covers all of A: PRO = (1 + 0) / 2 = .5 (pixel-wise it would be 1/4); then .8 is a
    # normal pixel (FPR 1/3) before any of B is found. PRO = .5 on [0, .3], so PRO AUC = 0.5.
    assert pro_auc(masks, scores) == pytest.approx(0.5)
    # Full range: .5 * 1/3 + 1 * 2/3 = 5/6.
    assert pro_auc(masks, scores, fpr_limit=1.0) == pytest.approx(5 / 6)


def test_pro_auc_interpolates_at_the_limit():
    # Region = pixel 0; the tie at .5 adds the region and one of two normals at once, so the
    # curve is (0,0) -> (.5,1) -> (1,1). At FPR .3 PRO = .6: area .3 * .6 / 2 = .09, / .3 = 0.3.
    masks = np.array([[[1, 0, 0]]])
    scores = np.array([[[0.5, 0.5, 0.1]]])
    assert pro_auc(masks, scores) == pytest.approx(0.3)


def test_pro_auc_does_not_connect_regions_across_images():
    # Stacked as a volume these would touch diagonally and form one region of 3 pixels.
    masks = np.array([[[0, 0], [1, 1]], [[1, 0], [0, 0]]])
    scores = np.array([[[0.5, 0.4], [0.05, 0.05]], [[0.9, 0.3], [0.2, 0.1]]])
    # .9 covers the 1-pixel region of image 1: PRO = (0 + 1) / 2 = .5 (1/3 if merged); then all
    # five normal pixels come before image 0's region, so PRO = .5 on [0, .3].
    assert pro_auc(masks, scores) == pytest.approx(0.5)


def test_pro_auc_perfect_detector_is_one():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 16, 16)) < 0.2
    masks[0, 0, 0] = True
    scores = masks + rng.random(masks.shape) * 0.5
    assert pro_auc(masks, scores) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_pro_auc_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 7, 9)) < 0.3
    masks[0, 0, 0], masks[0, -1, -1] = True, False
    tied = rng.integers(0, 6, size=masks.shape) + masks * rng.integers(0, 3, size=masks.shape)
    continuous = rng.random(masks.shape) + 0.4 * masks
    for scores in (tied.astype(np.float64), continuous):
        for limit in (0.3, 0.05, 1.0):
            value = pro_auc(masks, scores, fpr_limit=limit)
            assert value == pytest.approx(slow_pro_auc(masks, scores, limit), abs=1e-12)
            assert 0.0 <= value <= 1.0 + 1e-12


def test_pro_auc_errors():
    masks = np.zeros((1, 3, 3), dtype=bool)
    scores = np.zeros((1, 3, 3))
    with pytest.raises(ValueError, match="region"):
        pro_auc(masks, scores)
    with pytest.raises(ValueError, match="normal pixels"):
        pro_auc(~masks, scores)
    masks[0, 1, 1] = True
    scores[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        pro_auc(masks, scores)
    with pytest.raises(ValueError, match="shape"):
        pro_auc(masks, np.zeros((1, 3, 4)))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pro_auc(masks[0], np.zeros((3, 3)))
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_auc(masks, np.zeros((1, 3, 3)), fpr_limit=0.0)
