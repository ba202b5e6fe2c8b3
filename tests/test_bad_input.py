"""Hostile input to the scripts: bad numbers, eps, tampered checkpoints, paths out of the roots,
changed --resume arguments, checkpoints of another category, a full disk.

Every case goes through a script's ``main`` under ``run_main`` (as ``python train.py ...`` runs it)
and must end with exit status 2 and exactly one ``error:`` line, no traceback. Models are fitted
on the generated demo data with a random-initialised resnet18 at 64 px.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import eval as eval_script
import export_model
import infer
import predict
import train
from core.errors import CheckpointError, ConfigError
from core.runtime import compile_layer
from core.script import run_main
from deploy.export import export_model as export_to
from deploy.manifest import MANIFEST, sha256_file
from deploy.postprocess import GaussianHead
from deploy.stats import Stats
from models import METHODS, Runtime, build_model, load_model, model_config
from models.components.gaussian_model import GaussianModel

FAST = ["--pretrained", "none", "--arch", "resnet18", "--k", "16", "--resize", "64",
        "--batch_size", "4", "--num_workers", "0", "--cpu_threads", "2", "--engine", "dynamic"]
SIZE = 64


def error_line(main: Callable[[list[str] | None], int], argv: list[str],
               capsys: pytest.CaptureFixture) -> str:
    """Run ``main(argv)`` the way the scripts do (run_main); the one ``error:`` line it printed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda _: main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


def fitted(method: str, calibrate: bool = True) -> object:
    """A small fitted model of ``method`` (k 8 where it has one), calibrated unless told not to."""
    config = model_config(method, strict=False, k=8, image_size=SIZE, resize=SIZE, pretrained="none",
                         coreset_ratio=0.5)
    model = build_model(config, Runtime(engine="dynamic"))
    model.category = "tiles"
    model.fit([images(4, 1), images(4, 2)])
    if calibrate:
        model.calibrate([images(2, 3)])
    return model


@pytest.fixture(scope="module")
def trained(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.py output for tiles and disc: the checkpoint folder."""
    out = tmp_path_factory.mktemp("trained")
    assert train.main(["--data_path", str(demo_root), "--category", "tiles,disc", *FAST,
                       "--save_path", str(out)]) == 0
    return out / "ortho_resnet18_16"


# -- item 10: numeric arguments are checked when parsed --------------------------------------
PARSE_CASES = [
    ("train", "--batch_size", "0"), ("train", "--num_workers", "-1"), ("train", "--save_every", "-1"),
    ("train", "--eps", "nan"), ("train", "--eps", "inf"), ("train", "--eps", "0"), ("train", "--eps", "-1"),
    ("train", "--resize", "0"), ("train", "--resize", "1000000000"), ("train", "--crop_size", "0"),
    ("train", "--k", "0"), ("train", "--calib_images", "-1"), ("train", "--coreset_ratio", "0"),
    ("train", "--coreset_ratio", "1.5"), ("train", "--cpu_threads", "0"), ("train", "--seed", "-3"),
    ("train", "--projection_dim", "0"), ("train", "--num_neighbors", "0"), ("train", "--k", "x"),
    ("eval", "--batch_size", "0"), ("eval", "--num_workers", "-2"),
    ("predict", "--batch_size", "0"), ("predict", "--threshold", "nan"),
    ("predict", "--cpu_threads", "-1"),
    ("export", "--k", "0"), ("export", "--img_size", "0"), ("export", "--img_size", "99999"),
    ("infer", "--batch_size", "0"), ("infer", "--cpu_threads", "0"), ("infer", "--gpu_mem", "0"),
    ("infer", "--gpu_id", "-1"), ("infer", "--threshold", "inf"),
]


@pytest.mark.parametrize(("script", "option", "value"), PARSE_CASES)
@pytest.mark.bad_input
def test_numeric_argument_refused(script: str, option: str, value: str, demo_root: Path,
                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = ["--data_path", str(demo_root), "--category", "tiles", "--save_path", str(tmp_path)]
    base = {
        "train": (train.main, [*data, *FAST]),
        "eval": (eval_script.main, [*data, *FAST, "--model_path", str(tmp_path)]),
        "predict": (predict.main, [str(tmp_path), "--model_path", str(tmp_path / "m.npz")]),
        "export": (export_model.main, ["--model_path", str(tmp_path / "m.npz"),
                                       "--save_dir", str(tmp_path / "e")]),
        "infer": (infer.main, ["--model_file", str(tmp_path), "--input_file", str(tmp_path)]),
    }
    main, argv = base[script]
    line = error_line(main, [*argv, option, value], capsys)
    # argparse names an option with aliases by all of them: "argument --img_size/--crop_size: "
    assert re.search(rf"argument {option}(/--\w+)*: ", line) and value in line


# -- item 1: eps, and NaN statistics never score 0 -------------------------------------------
@pytest.mark.bad_input
def test_eps_must_be_finite_and_positive_in_the_api() -> None:
    for eps in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ConfigError, match="--eps"):
            build_model(model_config("ortho", k=8, image_size=SIZE, resize=SIZE, eps=eps,
                                    pretrained="none"))


@pytest.mark.bad_input
def test_rank_deficient_covariance_is_one_line(demo_root: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """A positive eps too small for 8 images in 16 dimensions: one line, no LinAlgError."""
    argv = ["--data_path", str(demo_root), "--category", "disc", *FAST, "--eps", "1e-300",
            "--save_path", str(tmp_path)]
    line = error_line(train.main, argv, capsys)
    assert "--eps 1e-300" in line and "not positive definite" in line


@pytest.mark.parametrize("method", ["ortho", "padim"])
def test_nan_statistics_propagate_on_both_paths(method: str) -> None:
    """The fused graph (Paddle Inference) and the unfused numpy tail both give NaN where the
    statistics are NaN (the fused graph's clip used to turn it into 0), and agree elsewhere."""
    model = fitted(method)
    model.mean[5, 0] = np.nan
    batch = images(2, 4)
    amap, scores = compile_layer(model.fused_layer(), SIZE, Runtime(engine="inference"))(batch)
    embedding = compile_layer(model.feature_layer(), SIZE, Runtime(engine="dynamic"))(batch)[0]
    meta = {"grid": list(model.grid), "image_size": SIZE, "sigma": model.config.sigma}
    arrays = {"mean": model.mean, "inv_cov": model.inv_cov, **model.embedding_arrays()}
    maps_np, scores_np = GaussianHead(Stats(meta, arrays))(embedding)
    assert np.isnan(amap).any() and np.isnan(scores).all()
    np.testing.assert_array_equal(np.isnan(amap[:, 0]), np.isnan(maps_np))
    finite = ~np.isnan(maps_np)
    np.testing.assert_allclose(amap[:, 0][finite], maps_np[finite], rtol=1e-3, atol=1e-3)
    assert np.isnan(scores_np).all()


@pytest.mark.bad_input
def test_nan_statistics_refused_at_score_fit_save_and_export(tmp_path: Path) -> None:
    model = fitted("ortho")
    model.inv_cov[0, 1, 1] = np.nan
    model._scorer = None
    with pytest.raises(CheckpointError, match="NaN or inf anomaly scores"):
        model.score(images(1))
    path = tmp_path / "nan.npz"
    model.save(str(path))
    with pytest.raises(CheckpointError, match=f"{path}: array inv_cov contains NaN"):
        load_model(str(path))
    with pytest.raises(CheckpointError, match="array inv_cov contains NaN"):
        export_to(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    # A fit whose statistics come out NaN is refused at its end.
    state = fitted("ortho", calibrate=False)
    state.fitted = False
    fold = state.folds[0].state()
    fold["mean"][3, 2] = np.nan
    state.folds[0].load_state(fold)
    with pytest.raises(CheckpointError, match="fit of tiles: array mean contains NaN"):
        state.finalize()


@pytest.mark.bad_input
def test_infer_refuses_nan_statistics_in_an_export(tmp_path: Path, images_dir: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """stats.npz edited to hold a NaN (and deploy.json's hash updated to match): infer.py stops
    with one line instead of writing scores."""
    export = tmp_path / "export"
    export_to(fitted("ortho"), export, fuse=False)
    stats = export / "stats.npz"
    with np.load(stats) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["mean"][0, 0] = np.nan
    np.savez(stats, **arrays)
    manifest = json.loads((export / MANIFEST).read_text())
    manifest["files"]["stats.npz"] = sha256_file(stats)
    (export / MANIFEST).write_text(json.dumps(manifest))
    line = error_line(infer.main, ["--model_file", str(export), "--input_file", str(images_dir),
                                   "--save_path", str(tmp_path / "out")], capsys)
    assert str(export) in line and "NaN or inf anomaly scores" in line


# -- item 5: predict.py on a checkpoint without a threshold ----------------------------------
@pytest.mark.bad_input
def test_predict_needs_a_threshold_and_a_final_checkpoint(tmp_path: Path, images_dir: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    uncalibrated = tmp_path / "uncalibrated.npz"
    fitted("ortho", calibrate=False).save(str(uncalibrated))
    argv = [str(images_dir), "--save_path", str(tmp_path / "out"), "--engine", "dynamic"]
    line = error_line(predict.main, [*argv, "--model_path", str(uncalibrated)], capsys)
    assert str(uncalibrated) in line and "no threshold" in line and "--threshold" in line
    assert predict.main([*argv, "--model_path", str(uncalibrated), "--threshold", "1"]) == 0
    state = build_model(model_config("ortho", k=8, image_size=SIZE, resize=SIZE,
                                    pretrained="none"))
    state.partial_fit(images(2))
    state_path = tmp_path / "state.npz"
    state.save(str(state_path))
    line = error_line(predict.main, [*argv, "--model_path", str(state_path), "--threshold", "1"], capsys)
    assert str(state_path) in line and "unfinished fit" in line


# -- item 6: tampered checkpoints ------------------------------------------------------------
def rewrite(path: Path, out: Path, arrays: dict | None = None, meta: dict | None = None) -> Path:
    """Copy checkpoint ``path`` to ``out`` with some arrays and metadata fields replaced."""
    with np.load(path) as data:
        contents = {name: data[name] for name in data.files}
    record = json.loads(str(contents["__meta__"]))
    record.update(meta or {})
    contents["__meta__"] = np.array(json.dumps(record))
    contents.update(arrays or {})
    np.savez(out, **contents)
    return out


MAIN_ARRAY = {"ortho": "mean", "padim": "inv_cov", "spade": "gallery_layer2", "patchcore": "bank"}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.bad_input
def test_tampered_checkpoint_is_one_line(method: str, tmp_path: Path, images_dir: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    good = tmp_path / "good.npz"
    fitted(method).save(str(good))
    with np.load(good) as data:
        main = data[MAIN_ARRAY[method]]
    wrong_shape = np.zeros((*main.shape[:-1], main.shape[-1] + 1), main.dtype)
    cases = {
        "shape": ({MAIN_ARRAY[method]: wrong_shape}, {}, f"array {MAIN_ARRAY[method]} has shape"),
        "dtype": ({MAIN_ARRAY[method]: main.astype(np.int64)}, {}, "has dtype int64"),
        "nan": ({MAIN_ARRAY[method]: np.full_like(main, np.nan)}, {}, "contains NaN"),
        "missing": ({}, {}, None),
        "float size": ({}, {"image_size": 1e9}, "metadata field image_size is 1000000000.0"),
        "huge size": ({}, {"image_size": 10**9, "resize": 10**9}, "image_size=1000000000"),
        "threshold": ({}, {"threshold": "high"}, "metadata field threshold"),
        "sigma": ({}, {"sigma": -4.0}, "metadata sigma=-4.0: the blur needs a finite number > 0"),
        "arch": ({}, {"arch": ["resnet18"]}, "metadata field arch"),
        "meta list": ({"__meta__": np.array("[1, 2]")}, {}, "metadata is not a JSON object"),
        "trunk dtype": ({"backbone.stem.0.weight": np.zeros((64, 3, 7, 7), np.int32)}, {},
                        "stem.0.weight has shape (64, 3, 7, 7) and dtype int32"),
    }
    if "k" in METHODS[method].Options.name_fields:  # patchcore has no k: a k in its metadata is ignored
        cases["k type"] = ({}, {"k": "8"}, "metadata field k is '8'")
    argv = [str(images_dir), "--save_path", str(tmp_path / "out"), "--engine", "dynamic"]
    for name, (arrays, meta, expected) in cases.items():
        bad = rewrite(good, tmp_path / f"{name.replace(' ', '_')}.npz", arrays, meta)
        if name == "missing":
            with np.load(bad) as data:
                kept = {n: data[n] for n in data.files if n != MAIN_ARRAY[method]}
            np.savez(bad, **kept)
            expected = f"has no array {MAIN_ARRAY[method]}"
        line = error_line(predict.main, [*argv, "--model_path", str(bad)], capsys)
        assert f"{bad}: " in line and expected in line, (name, line)
    assert predict.main([*argv, "--model_path", str(good)]) == 0


@pytest.mark.bad_input
def test_checkpoint_of_another_k_and_bad_padim_channels(tmp_path: Path) -> None:
    """Arrays of a k=8 model under metadata claiming k=12; PaDiM channel indices out of range."""
    good = tmp_path / "padim.npz"
    fitted("padim").save(str(good))
    with pytest.raises(CheckpointError, match="array channels has shape"):
        load_model(str(rewrite(good, tmp_path / "k.npz", meta={"k": 12})))
    with np.load(good) as data:
        channels = data["channels"].copy()
    channels[-1] = 10**6
    with pytest.raises(CheckpointError, match="distinct indices below 448"):
        load_model(str(rewrite(good, tmp_path / "c.npz", arrays={"channels": channels})))


@pytest.mark.parametrize("method", ["ortho", "spade"])
@pytest.mark.bad_input
def test_tampered_fit_state(method: str, tmp_path: Path) -> None:
    state = build_model(model_config(method, strict=False, k=8, image_size=SIZE, resize=SIZE,
                                    pretrained="none"))
    state.partial_fit(images(3))
    path = tmp_path / "state.npz"
    state.save(str(path))
    name = "fold0_scatter" if method == "ortho" else "fit_layer1_0"
    with np.load(path) as data:
        array = data[name]
    bad = rewrite(path, tmp_path / "bad.npz", {name: array[..., :-1]})
    with pytest.raises(CheckpointError, match=f"{bad}: array {name} has shape"):
        load_model(str(bad))
    assert load_model(str(path)).n_train == 3


# -- item 7: category names ------------------------------------------------------------------
@pytest.mark.parametrize("category", ["../tiles", "/etc", "tiles/../disc", ".."])
@pytest.mark.bad_input
def test_category_is_one_folder_name(category: str, demo_root: Path, tmp_path: Path, images_dir: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    argv = ["--data_path", str(demo_root / "tiles"), "--category", category, *FAST,
            "--save_path", str(tmp_path)]
    line = error_line(train.main, argv, capsys)
    assert f"--category {category}: " in line
    assert not list(tmp_path.rglob("*.npz"))
    line = error_line(predict.main, [str(images_dir), "--model_path", str(tmp_path),
                                     "--category", category], capsys)
    assert f"--category {category}: " in line


# -- item 8: --resume refuses changed arguments ----------------------------------------------
@pytest.mark.bad_input
def test_resume_refuses_changed_arguments(demo_root: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    argv = ["--data_path", str(demo_root), "--category", "disc", *FAST, "--save_path", str(tmp_path),
            "--save_every", "4"]

    def interrupted(self: GaussianModel) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(GaussianModel, "finalize", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train.main(argv)
    state = tmp_path / "ortho_resnet18_16" / "disc.fitstate.npz"
    assert load_model(str(state)).n_train == 8
    line = error_line(train.main, [*argv, "--resume", "--seed", "3", "--eps", "0.5"], capsys)
    assert str(state) in line and "eps=0.01, seed=0" in line and "eps=0.5, seed=3" in line
    line = error_line(train.main, [*argv, "--resume", "--pretrained", "imagenet"], capsys)
    assert "pretrained=none" in line and "pretrained=imagenet" in line
    assert train.main([*argv, "--resume"]) == 0
    assert "resuming after 8 images" in capsys.readouterr().err


# -- item 9: eval.py checks the checkpoint's category ----------------------------------------
@pytest.mark.bad_input
def test_eval_checks_the_category(trained: Path, demo_root: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    argv = ["--data_path", str(demo_root), *FAST, "--save_path", str(tmp_path)]
    tiles = trained / "tiles.npz"
    line = error_line(eval_script.main, [*argv, "--category", "disc", "--model_path", str(tiles)], capsys)
    assert str(tiles) in line and "category tiles" in line and "--category disc" in line
    line = error_line(eval_script.main, [*argv, "--category", "tiles,disc", "--model_path", str(tiles)],
                      capsys)
    assert "one checkpoint" in line and "2 categories" in line
    renamed = tmp_path / "models"
    renamed.mkdir()
    shutil.copy(tiles, renamed / "disc.npz")
    line = error_line(eval_script.main, [*argv, "--category", "disc", "--model_path", str(renamed)],
                      capsys)
    assert str(renamed / "disc.npz") in line and "category tiles" in line
    assert eval_script.main([*argv, "--category", "tiles", "--model_path", str(tiles)]) == 0


# -- item 10: a full disk --------------------------------------------------------------------
@pytest.mark.bad_input
def test_disk_full_keeps_the_last_fit_state(demo_root: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    """The second fit-state save hits ENOSPC: one "disk full" line, the first save intact."""
    import models.checkpoint

    real_savez, calls = np.savez, []

    def savez(file: object, **arrays: np.ndarray) -> None:
        calls.append(1)
        if len(calls) == 2:
            file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_savez(file, **arrays)

    monkeypatch.setattr(models.checkpoint.np, "savez", savez)
    argv = ["--data_path", str(demo_root), "--category", "disc", *FAST, "--save_path", str(tmp_path),
            "--save_every", "4"]
    line = error_line(train.main, argv, capsys)
    folder = tmp_path / "ortho_resnet18_16"
    state = folder / "disc.fitstate.npz"
    assert str(state) in line and "disk full" in line and "previous file is kept" in line
    monkeypatch.setattr(models.checkpoint.np, "savez", real_savez)
    assert load_model(str(state)).n_train == 4
    assert sorted(p.name for p in folder.iterdir()) == ["disc.fitstate.npz"]


@pytest.mark.bad_input
def test_disk_full_while_writing_results_keeps_the_previous_table(demo_root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """eval.py's results.csv hits ENOSPC half-written: one "disk full" line naming it (not a
    traceback), the table of the run before intact, no temporary left."""
    argv = ["--data_path", str(demo_root), "--category", "disc", *FAST, "--save_path", str(tmp_path)]
    assert train.main([*argv, "--eval"]) == 0
    folder = tmp_path / "ortho_resnet18_16"
    before = (folder / "results.csv").read_text()
    real_write = Path.write_text

    def write_text(path: Path, text: str, *args: object, **kwargs: object) -> int:
        if path.name.startswith(".results.csv.tmp-"):
            real_write(path, text[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    line = error_line(eval_script.main, argv, capsys)
    assert f"error: {folder / 'results.csv'}: cannot write it: disk full (the previous file is kept); " \
           "free space or pass another output folder" in line
    assert (folder / "results.csv").read_text() == before
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name]
