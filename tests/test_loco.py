"""MVTec LOCO: the layout, defects_config.json, the sPRO metric, the generated LOCO demo set, and
train.py / eval.py on it with the per-type columns of results.csv.

sPRO is checked on hand-worked cases, against a slow per-threshold reference, and against PRO
(equal when every saturation area is the region's area); the scripts' columns against a
computation from the checkpoint's scores with regions read here from the mask files.
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
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from core.errors import InputError
from datasets import AnomalyDataset, Preprocess, list_samples, read_mask, resolve_categories
from datasets.loader import BatchLoader
from datasets.mvtec_loco import (
    DefectType,
    defect_regions,
    image_defects,
    is_loco,
    read_defect,
    read_defects_config,
)
from datasets.synthetic_loco import GLOBAL, GREY, LOGICAL, defects_config, render
from engine.evaluate import render_csv, score_batches
from engine.metrics import pro_auc, pro_curve, spro_auc, spro_curve
from models import load_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def slow_spro(scores, normal, regions):
    """The sPRO curve threshold by threshold, straight from the definition."""
    xs, ys = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        above = scores >= t
        xs.append(np.count_nonzero(above & normal) / np.count_nonzero(normal))
        ys.append(np.mean([min(np.count_nonzero(above[i] & r) / s, 1.0) for i, r, s in regions]))
    return np.array(xs), np.array(ys)


# --------------------------------------------------------------------------- sPRO


def test_spro_hand_worked_two_defects_relative_and_absolute():
    # image 0 good, image 1 has defect A (pixels 0, 1; absolute threshold 1 px: s = 1) and
    # defect B (pixels 2, 3; relative threshold 1.0: s = 2).
    scores = np.array([[[1, 2, 3, 4]], [[6, 1.5, 0.5, 7]]], np.float64)
    normal = np.array([[[1, 1, 1, 1]], [[0, 0, 0, 0]]], bool)
    a, b = np.array([[1, 1, 0, 0]], bool), np.array([[0, 0, 1, 1]], bool)
    fpr, spro = spro_curve(scores, normal, [(1, a, 1.0), (1, b, 2.0)])
    # thresholds 7, 6, 4, 3, 2, 1.5, 1, 0.5: B half found at 7, A saturated at 6
    np.testing.assert_allclose(fpr, [0, 0, 0, .25, .5, .75, .75, 1, 1])
    np.testing.assert_allclose(spro, [0, .25, .75, .75, .75, .75, .75, .75, 1])
    assert spro_auc(scores, normal, [(1, a, 1.0), (1, b, 2.0)], fpr_limit=0.5) == pytest.approx(0.75)
    # s = the region's area (PRO): A counts half until its second pixel (1.5, at FPR 0.75)
    assert spro_auc(scores, normal, [(1, a, 2.0), (1, b, 2.0)], fpr_limit=0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spro_matches_the_definition(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 12, (4, 5, 6)).astype(np.float64)  # many ties
    normal = np.zeros(scores.shape, bool)
    normal[:2] = True  # images 0, 1 good
    first, second, third = (np.zeros((5, 6), bool) for _ in range(3))
    first[1:4, 1:3] = True  # 6 px, relative 0.5 -> s = 3
    second[0:2, 3:6] = True  # 6 px, absolute 2 px -> s = 2
    third[2:5, 2:5] = True  # 9 px, overlaps the first; relative 1.0
    regions = [(2, first, 3.0), (2, second, 2.0), (3, third, 9.0), (3, first, 6.0)]
    fpr, spro = spro_curve(scores, normal, regions)
    slow_fpr, slow_spro_values = slow_spro(scores, normal, regions)
    np.testing.assert_allclose(fpr, slow_fpr, atol=1e-12)
    np.testing.assert_allclose(spro, slow_spro_values, atol=1e-12)
    # the area by the trapezoid rule, the curve cut at 0.3 by linear interpolation
    x = np.linspace(0, 0.3, 30001)
    dense = np.interp(x, slow_fpr, slow_spro_values)
    assert spro_auc(scores, normal, regions, 0.3) == pytest.approx(np.trapezoid(dense, x) / 0.3, abs=1e-4)


def test_spro_with_region_areas_is_pro():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(3, 16, 16))
    masks = np.zeros(scores.shape, bool)
    masks[0, 2:6, 2:9] = masks[0, 10:14, 10:12] = masks[2, 4:12, 3:5] = True
    regions = []
    for image, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image, labels == i, float(np.count_nonzero(labels == i))) for i in range(1, count + 1)]
    fpr, spro = spro_curve(scores, ~masks, regions)
    pro_fpr, pro = pro_curve(masks, scores)
    np.testing.assert_allclose(fpr, pro_fpr, atol=1e-12)
    np.testing.assert_allclose(spro, pro, atol=1e-12)
    for limit in (0.05, 0.3):
        expected = pro_auc(masks, scores, limit)
        assert spro_auc(scores, ~masks, regions, limit) == pytest.approx(expected, abs=1e-12)


def test_spro_refuses_what_it_cannot_compute():
    scores, normal = np.zeros((1, 2, 2)), np.ones((1, 2, 2), bool)
    with pytest.raises(ValueError, match="at least one defect region"):
        spro_curve(scores, normal, [])
    with pytest.raises(ValueError, match="saturation > 0"):
        spro_curve(scores, normal, [(0, np.ones((2, 2), bool), 0.0)])
    with pytest.raises(ValueError, match="fpr_limit"):
        spro_auc(scores, normal, [(0, np.ones((2, 2), bool), 1.0)], fpr_limit=0)


# --------------------------------------------------------------------------- layout and config


def write_config(folder: Path, entries) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "defects_config.json").write_text(json.dumps(entries))
    return folder


ENTRIES = [
    {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 4, "relative_saturation": False},
    {"defect_name": "scratch", "pixel_value": 100, "saturation_threshold": 0.5, "relative_saturation": True},
]


def test_saturation_fraction():
    assert DefectType("a", 1, 0.5, True).saturation_fraction(100) == 0.5
    assert DefectType("a", 1, 40, False).saturation_fraction(100) == 0.4
    assert DefectType("a", 1, 400, False).saturation_fraction(100) == 1.0


def test_defect_regions_resize_keeps_the_saturation_share(tmp_path):
    config = read_defects_config(write_config(tmp_path, ENTRIES))
    folder = tmp_path / "gt" / "000"
    folder.mkdir(parents=True)
    missing = np.zeros((8, 8), np.uint8)
    missing[0:4, 0:4] = 255  # 16 px, absolute 4 px: a quarter of it
    scratch = np.zeros((8, 8), np.uint8)
    scratch[4:8, 2:8] = 100  # 24 px, relative 0.5
    Image.fromarray(missing).save(folder / "000.png")
    Image.fromarray(scratch).save(folder / "001.png")
    regions = defect_regions(folder, config, Preprocess(4))
    assert [int(r.sum()) for r, _ in regions] == [4, 6]
    assert [s for _, s in regions] == [pytest.approx(1.0), pytest.approx(3.0)]
    assert image_defects(folder, config) == ["missing", "scratch"]
    # the folder is read as the union of its masks (pixel AUROC, PRO)
    np.testing.assert_array_equal(read_mask(folder), (missing > 0) | (scratch > 0))


@pytest.mark.bad_input
@pytest.mark.parametrize("text, message", [
    ("{not json", "not readable JSON"),
    ("[]", "must be a non-empty JSON list of defect types"),
    (json.dumps([{"defect_name": "a", "pixel_value": 3}]), "entry 0 is not an object with the four fields"),
    (json.dumps([{**ENTRIES[0], "pixel_value": "255"}]), "entry 0 has pixel_value='255'"),
    (json.dumps([{**ENTRIES[1], "saturation_threshold": 1.5}]), "saturation_threshold 1.5"),
    (json.dumps([ENTRIES[0], {**ENTRIES[1], "pixel_value": 255}]),
     "pixel_value 255 is given to missing and scratch"),
])
def test_bad_defects_config_names_the_file_and_the_fix(tmp_path, text, message):
    (tmp_path / "defects_config.json").write_text(text)
    with pytest.raises(InputError, match=message) as caught:
        read_defects_config(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'defects_config.json'}: ")
    assert "\n" not in str(caught.value)


@pytest.mark.bad_input
def test_missing_defects_config_and_unknown_grey_value(tmp_path):
    with pytest.raises(InputError, match="not found; an MVTec LOCO category needs its defects_config.json"):
        read_defects_config(tmp_path)
    config = read_defects_config(write_config(tmp_path, ENTRIES))
    mask = np.zeros((4, 4), np.uint8)
    mask[1, 1] = 77
    Image.fromarray(mask).save(tmp_path / "000.png")
    with pytest.raises(InputError, match=r"000.png: grey value\(s\) 77 not in .*defects_config.json "
                                         r"\(it has 100, 255\); fix the mask or add the defect type"):
        read_defect(tmp_path / "000.png", config)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "001.png")
    with pytest.raises(InputError, match="001.png: mask is empty"):
        read_defect(tmp_path / "001.png", config)


@pytest.mark.bad_input
def test_mask_folder_without_masks_or_of_mixed_sizes(tmp_path):
    folder = tmp_path / "000"
    folder.mkdir()
    with pytest.raises(InputError, match="000: mask folder holds no .png masks; put the image's"):
        read_mask(folder)
    Image.fromarray(np.full((4, 6), 255, np.uint8)).save(folder / "000.png")
    Image.fromarray(np.full((4, 5), 255, np.uint8)).save(folder / "001.png")
    with pytest.raises(InputError, match="001.png: mask is 5x4 but 000.png beside it is 6x4; give every"):
        read_mask(folder)


# --------------------------------------------------------------------------- the generated set


@pytest.fixture(scope="module")
def loco(tmp_path_factory) -> Path:
    """The exact command users type; small counts so train.py + eval.py take seconds."""
    dst = tmp_path_factory.mktemp("loco") / "loco"
    proc = run("-m", "datasets.synthetic_loco", "--dst", str(dst), "--n_train", "12", "--n_validation", "3",
               "--n_test_good", "4", "--n_logical", "6", "--n_structural", "3", "--size", "48", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    return dst


def test_synthetic_loco_layout(loco: Path):
    base = loco / "tray"
    assert is_loco(base) and not is_loco(ROOT / "datasets")
    assert resolve_categories(loco, "all") == ["tray"]
    assert len(list((base / "validation" / "good").glob("*.png"))) == 3
    samples = list_samples(loco, "tray", "test")
    folders = ["good"] * 4 + ["logical_anomalies"] * 6 + ["structural_anomalies"] * 3
    assert [s.defect for s in samples] == folders
    image = np.asarray(Image.open(samples[0].path))
    assert image.shape == (48, 60, 3)  # not square
    config = read_defects_config(base)
    assert {d.name: d.pixel_value for d in config.types.values()} == GREY
    assert json.loads((base / "defects_config.json").read_text()) == defects_config(48)
    kinds = [image_defects(s.mask_path, config) for s in samples if s.label == 1]
    assert kinds[:6] == [["missing_object"], ["extra_object"], ["wrong_colour"], ["missing_object"],
                         ["extra_object"], ["wrong_colour", "wrong_colour"]]
    assert kinds[6:] == [["scratch"], ["scratch", "scratch"], ["scratch"]]
    # a mask folder is the union of its masks, aligned with the image
    union = read_mask(samples[9].mask_path)
    assert union.shape == image.shape[:2] and union.any()


def count_discs(image: np.ndarray) -> tuple[int, int]:
    """(red, blue) discs: connected components of strongly red / blue pixels."""
    rgb = image.astype(int)
    red = (rgb[..., 0] - rgb[..., 2]) > 60
    blue = (rgb[..., 2] - rgb[..., 0]) > 60
    return ndimage.label(red)[1], ndimage.label(blue)[1]


def test_global_rules_change_only_the_count():
    assert set(GLOBAL) <= set(LOGICAL)
    for index in range(4):
        assert count_discs(render("good", index, 96, 0)[0]) == (2, 2)
    counts = {LOGICAL[i % 3]: sum(count_discs(render("logical_anomalies", i, 96, 0)[0])) for i in range(3)}
    assert counts == {"missing_object": 3, "extra_object": 5, "wrong_colour": 4}
    wrong = render("logical_anomalies", 5, 96, 0)[0]  # odd: one wrong colour in each half
    red_left = count_discs(wrong[:, : wrong.shape[1] // 2])[0]
    assert red_left == 1
    # same arguments, same pixels
    np.testing.assert_array_equal(render("train", 3, 96, 0)[0], render("train", 3, 96, 0)[0])


@pytest.mark.bad_input
def test_synthetic_loco_refuses_bad_sizes(tmp_path):
    proc = run("-m", "datasets.synthetic_loco", "--dst", str(tmp_path / "d"), "--size", "20", cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: synthetic LOCO dataset: need --size >= 48 and at least one image per folder")


# --------------------------------------------------------------------------- the scripts


def expected_loco_columns(root: Path, checkpoint: Path) -> dict[str, float]:
    """The LOCO columns from the checkpoint's own scores, regions read from the mask files here."""
    model = load_model(str(checkpoint))
    samples = list_samples(root, "tray", "test")
    preprocess = Preprocess(SIZE)
    scored = score_batches(model, BatchLoader(AnomalyDataset(samples, preprocess), 8, 0))
    config = json.loads((root / "tray" / "defects_config.json").read_text())
    by_grey = {entry["pixel_value"]: entry for entry in config}
    regions = []  # (image index, region, saturation area)
    for index, sample in enumerate(samples):
        for path in sorted(sample.mask_path.glob("*.png")) if sample.label else []:
            values = np.asarray(Image.open(path))
            entry = by_grey[int(values.max())]
            full = int(np.count_nonzero(values))
            share = (entry["saturation_threshold"] if entry["relative_saturation"]
                     else min(entry["saturation_threshold"], full) / full)
            binary = Image.fromarray((values > 0).astype(np.uint8))
            small = np.asarray(binary.resize((SIZE, SIZE), Image.Resampling.NEAREST))
            regions.append((index, small.astype(bool), share * np.count_nonzero(small)))
    kinds = np.array([s.defect for s in samples])
    good = kinds == "good"
    out = {}
    for name, chosen in (("logical", good | (kinds == "logical_anomalies")),
                         ("structural", good | (kinds == "structural_anomalies")), ("", np.ones_like(good))):
        if name:
            out[f"image_auroc_{name}"] = roc_auc_score(scored.labels[chosen], scored.scores[chosen])
        index = np.flatnonzero(chosen)
        where = {old: new for new, old in enumerate(index)}
        picked = [(where[i], r, s) for i, r, s in regions if i in where]
        normal = np.repeat(good[index, None, None], SIZE * SIZE).reshape(index.size, SIZE, SIZE)
        out["spro_" + name if name else "spro"] = spro_auc(scored.maps[index], normal, picked, 0.05)
    out["image_auroc"] = roc_auc_score(scored.labels, scored.scores)
    return out


@pytest.mark.parametrize("method", ["padim", "ortho", "spade", "patchcore"])
def test_train_and_eval_on_a_loco_root(loco: Path, tmp_path: Path, method: str):
    out = tmp_path / "out"
    extra = {"padim": ["--k", "16"], "ortho": ["--k", "16"], "spade": ["--k", "3"], "patchcore": []}[method]
    proc = run(str(ROOT / "train.py"), "--data_path", str(loco), "--category", "all", "--method", method,
               "--pretrained", "none", "--eval", "--eval_PRO", "--resize", str(SIZE), "--save_path", str(out),
               "--batch_size", "8", *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (folder,) = out.iterdir()
    rows = read_csv(folder / "results.csv")
    assert list(rows[0]) == ["category", "image_auroc", "pixel_auroc", "pro", "image_auroc_logical",
                             "image_auroc_structural", "spro_logical", "spro_structural", "spro"]
    assert [r["category"] for r in rows] == ["tray", "mean"]
    assert all(0.0 <= float(value) <= 1.0 for value in list(rows[0].values())[1:])
    if method == "padim":
        expected = expected_loco_columns(loco, folder / "tray.npz")
        for key, value in expected.items():
            assert float(rows[0][key]) == pytest.approx(value, abs=1e-5), key
    proc = run(str(ROOT / "eval.py"), "--data_path", str(loco), "--category", "all",
               "--model_path", str(folder), "--save_path", str(tmp_path / "eval"), "--eval_PRO", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_csv(tmp_path / "eval" / folder.name / "results.csv") == rows


@pytest.mark.bad_input
def test_eval_on_a_loco_root_with_a_bad_config_is_one_line(loco: Path, tmp_path: Path):
    root = tmp_path / "root"
    shutil.copytree(loco / "tray", root / "tray")
    out = tmp_path / "out"
    proc = run(str(ROOT / "train.py"), "--data_path", str(root), "--category", "tray", "--method", "padim",
               "--k", "16", "--pretrained", "none", "--resize", str(SIZE), "--save_path", str(out),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = root / "tray" / "defects_config.json"
    entries = json.loads(config.read_text())
    config.write_text(json.dumps(entries[1:]))  # the grey value of missing_object is gone
    proc = run(str(ROOT / "eval.py"), "--data_path", str(root), "--category", "tray",
               "--model_path", str(out / "padim_resnet18_16"), "--eval_PRO", cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "grey value(s) 255 not in" in errors[0]
    assert "fix the mask or add the defect type there" in errors[0]
    assert str(config) in errors[0] and "000.png" in errors[0]


def test_results_columns_stay_on_mvtec_rows():
    mvtec = [{"category": "disc", "image_auroc": 1.0, "pixel_auroc": 0.5, "pro": None}]
    assert render_csv(mvtec).splitlines()[0] == "category,image_auroc,pixel_auroc,pro"
    loco_row = {**mvtec[0], "category": "tray", "image_auroc_logical": 0.25, "image_auroc_structural": None,
                "spro_logical": None, "spro_structural": None, "spro": 0.5}
    lines = render_csv([*mvtec, loco_row]).splitlines()
    assert lines[0].endswith(",image_auroc_logical,image_auroc_structural,spro_logical,spro_structural,spro")
    assert lines[1] == "disc,1.000000,0.500000,,,,,,"
    assert lines[2] == "tray,1.000000,0.500000,,0.250000,,,,0.500000"
