"""EfficientAD and PUAD: networks, losses, map normalisation, the PUAD score, resume, export, and
the user's commands (distil, train, eval, predict, export, infer) through the real scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from helpers import assert_served_matches_dynamic
from sklearn.covariance import LedoitWolf

from core.errors import CheckpointError
from datasets import AnomalyDataset, Preprocess, list_samples, validation_split
from models import load_model, model_config
from models.checkpoint import read_npz, write_npz
from models.components.backbone import build_trunk
from models.efficientad import distill
from models.efficientad.images import ImageFolder
from models.efficientad.model import EfficientADModel, hard_loss, jitter
from models.efficientad.networks import Autoencoder, pdn
from models.efficientad.puad import PuadModel
from models.efficientad.teacher import ChannelMoments, read_teacher

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64


def run(cwd: Path, script: str, *args: object) -> subprocess.CompletedProcess:
    """``python script args`` (a script path, or ``-m module``) in ``cwd`` with the repository on the path."""
    command = [sys.executable, *(["-m", script[3:]] if script.startswith("-m ") else [str(ROOT / script)])]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=900)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a refused run (exit status 2)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def teacher(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PDN-S distilled (3 steps) from a random resnet18 on the demo's training images, as a user
    runs it: ``python -m models.efficientad.distill``."""
    out = tmp_path_factory.mktemp("teacher") / "pdn_s.npz"
    ok(run(ROOT, "-m models.efficientad.distill", "--arch", "resnet18", "--pretrained", "none",
           "--images", demo_root / "tiles" / "train", "--image_size", SIZE, "--steps", 3, "--batch_size", 2,
           "--norm_images", 4, "--out", out))
    return out


def batches(root: Path, category: str, names: list[Path] | None = None, size: int = 4) -> list[np.ndarray]:
    """Images of the training split (or the files ``names``) in batches of ``size``."""
    samples = list_samples(root, category, "train")
    if names is not None:
        samples = [s for s in samples if s.path in names]
    dataset = AnomalyDataset(samples, Preprocess(resize=SIZE))
    items = np.stack([dataset[i]["image"] for i in range(len(dataset))])
    return [items[i:i + size] for i in range(0, len(items), size)]


def fitted(method: str, teacher: Path, root: Path, steps: int = 3, **options: object) -> EfficientADModel:
    """A model fitted through the API as train.py fits it: prepare, steps, validation."""
    config = model_config(method, teacher=str(teacher), steps=steps, image_size=SIZE, resize=SIZE,
                          **options)
    model = {"efficientad": EfficientADModel, "puad": PuadModel}[method].create(config)
    train, held = validation_split(root, "tiles", list_samples(root, "tiles", "train"))
    train_batches = batches(root, "tiles", [s.path for s in train], size=2)
    model.fit(train_batches)
    model.fit_validation(train_batches, batches(root, "tiles", [s.path for s in held]))
    return model


def test_pdn_and_autoencoder_shapes() -> None:
    """256 px -> 56 x 56 x 384 for PDN-S and PDN-M, the student's 768 channels, the autoencoder."""
    x = paddle.zeros([1, 3, 256, 256])
    assert pdn("s")(x).shape == [1, 384, 56, 56]
    assert pdn("m")(x).shape == [1, 384, 56, 56]
    assert pdn("s", 768)(x).shape == [1, 768, 56, 56]
    assert Autoencoder(256)(paddle.zeros([2, 3, 256, 256])).shape == [2, 384, 56, 56]
    assert Autoencoder(SIZE)(paddle.zeros([2, 3, SIZE, SIZE])).shape == [2, 384, 8, 8]


def test_hard_loss_hand_computed() -> None:
    """q0.999 of 0..999 is 998.001 (linear interpolation): only 999 is at or above it. Of 0..1999
    q0.999 = 1997.001: the mean of 1998 and 1999."""
    values = paddle.arange(2000, dtype="float32")
    assert float(hard_loss(values[:1000].reshape([10, 100]))) == pytest.approx(999.0)
    assert float(hard_loss(values.reshape([2, 10, 100]))) == pytest.approx(1998.5)


def test_jitter_matches_the_adjustments() -> None:
    """Brightness, contrast, saturation by the drawn factors, on [0, 1] pixels, clipped."""
    rng = np.random.default_rng(7)
    images = rng.normal(size=(6, 3, 5, 5)).astype(np.float32)
    out = jitter(images, np.random.default_rng(0))
    draws = np.random.default_rng(0)
    kinds, factors = draws.integers(0, 3, size=6), draws.uniform(0.8, 1.2, size=6)
    mean = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    for image, result, kind, f in zip(images, out, kinds, factors, strict=True):
        pixels = image * std + mean
        grey = 0.299 * pixels[0] + 0.587 * pixels[1] + 0.114 * pixels[2]
        base = [np.zeros_like(pixels), np.full_like(pixels, grey.mean()),
                np.broadcast_to(grey, pixels.shape)][kind]
        expected = (np.clip(f * pixels + (1 - f) * base, 0, 1) - mean) / std
        np.testing.assert_allclose(result, expected, atol=1e-5)
    assert set(kinds) == {0, 1, 2}


def test_teacher_file_and_target_statistics(teacher: Path) -> None:
    """The distilled teacher is an npz with 384 positive target deviations and its metadata."""
    loaded = read_teacher(str(teacher))
    identity = (loaded.size, loaded.arch, loaded.meta["steps"], loaded.meta["pretrained"])
    assert identity == ("s", "resnet18", 3, "none")
    assert loaded.mean.shape == loaded.std.shape == (384,) and (loaded.std > 0).all()
    with np.load(teacher, allow_pickle=False) as data:
        assert "net.0.weight" in data.files


def test_quantile_normalisation_and_scores(teacher: Path, demo_root: Path) -> None:
    """Quantiles are q0.9/q0.995 of the validation maps; the fused score is max over the grid of
    0.05 (M_st - qa_st) / (qb_st - qa_st) + 0.05 (M_ae - qa_ae) / (qb_ae - qa_ae), from numpy."""
    model = fitted("efficientad", teacher, demo_root)
    train, held = validation_split(demo_root, "tiles", list_samples(demo_root, "tiles", "train"))
    map_st, map_ae, _, _ = model.raw_outputs(batches(demo_root, "tiles", [s.path for s in held]))
    expected = [np.quantile(m.astype(np.float64), q) for m in (map_st, map_ae) for q in (0.9, 0.995)]
    np.testing.assert_allclose(model.quantiles, expected, rtol=1e-6)
    test = batches(demo_root, "tiles", size=8)[0]
    raw = model.raw_outputs([test])
    q = np.asarray(expected)
    amap = 0.05 * (raw[0] - q[0]) / (q[1] - q[0]) + 0.05 * (raw[1] - q[2]) / (q[3] - q[2])
    maps, scores = model.score(test)
    np.testing.assert_allclose(scores, amap.reshape(len(amap), -1).max(axis=1), rtol=1e-4, atol=1e-5)
    assert maps.shape == (len(test), SIZE, SIZE)


@pytest.mark.parametrize("extractor", ["student", "teacher"])
def test_puad_score_against_numpy(teacher: Path, demo_root: Path, extractor: str) -> None:
    """PUAD = standardised EfficientAD score + standardised Mahalanobis distance to a Ledoit-Wolf
    Gaussian (scikit-learn) of the grid-averaged outputs of the training images."""
    model = fitted("puad", teacher, demo_root, feature_extractor=extractor)
    train, held = validation_split(demo_root, "tiles", list_samples(demo_root, "tiles", "train"))
    pick = 2 if extractor == "teacher" else 3
    features = model.raw_outputs(batches(demo_root, "tiles", [s.path for s in train]))[pick]
    lw = LedoitWolf().fit(features.astype(np.float64))
    precision = np.linalg.inv(lw.covariance_)

    def parts(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        raw = model.raw_outputs(images)
        diff = raw[pick] - lw.location_
        return model.grid_scores(raw[0], raw[1]), np.sqrt(np.einsum("nd,de,ne->n", diff, precision, diff))

    val_e, val_d = parts(batches(demo_root, "tiles", [s.path for s in held]))
    test = batches(demo_root, "tiles", size=8)[0]
    e, d = parts([test])
    expected = (e - val_e.mean()) / val_e.std(ddof=1) + (d - val_d.mean()) / val_d.std(ddof=1)
    np.testing.assert_allclose(model.score(test)[1], expected, rtol=1e-3, atol=1e-3)


def test_resume_equals_an_uninterrupted_fit(teacher: Path, demo_root: Path, tmp_path: Path) -> None:
    """2 steps, a fit state on disk, 2 more steps after loading it: the weights of 4 straight
    steps within 1e-5 (jitter, penalty draws and dropout come from (seed, step))."""
    config = model_config("efficientad", teacher=str(teacher), steps=4, image_size=SIZE, resize=SIZE,
                          penalty_images=str(demo_root / "disc" / "train"))
    data = batches(demo_root, "tiles", size=2)[:4]
    whole = EfficientADModel.create(config)
    whole.prepare(data)
    for batch in data:
        whole.partial_fit(batch)
    half = EfficientADModel.create(config)
    half.prepare(data)
    for batch in data[:2]:
        half.partial_fit(batch)
    half.save(str(tmp_path / "state.npz"))
    resumed = load_model(str(tmp_path / "state.npz"))
    for batch in data[2:]:
        resumed.partial_fit(batch)
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    assert whole.last_figures[4] > 0  # the penalty term was on
    for name, value in whole.network.state_dict().items():
        np.testing.assert_allclose(resumed.network.state_dict()[name].numpy(), value.numpy(), atol=1e-5,
                                   err_msg=name)


def test_validation_split(demo_root: Path, tmp_path: Path) -> None:
    """Without validation/good: 2 of the 8 training images (15 %, at least 2), seeded, left out of
    training; with the folder: all 8 train, the folder validates."""
    train = list_samples(demo_root, "tiles", "train")
    kept, held = validation_split(demo_root, "tiles", train, seed=0)
    assert (len(kept), len(held)) == (6, 2)
    assert not {s.path for s in kept} & {s.path for s in held}
    assert validation_split(demo_root, "tiles", train, seed=0) == (kept, held)
    assert validation_split(demo_root, "tiles", train, seed=1) != (kept, held)
    (tmp_path / "c" / "validation").mkdir(parents=True)
    (tmp_path / "c" / "validation" / "good").symlink_to(demo_root / "disc" / "train" / "good")
    kept, held = validation_split(tmp_path, "c", train)
    assert kept == train and len(held) == 8


def test_commands_distil_train_eval_predict_export_infer(teacher: Path, demo_root: Path,
                                                        tmp_path: Path) -> None:
    """The user's chain for both methods; the export (Paddle and ONNX) checked against the dynamic
    graph; infer.py (Paddle Inference, oneDNN) scores as predict.py."""
    common = ["--data_path", demo_root, "--category", "tiles", "--resize", SIZE, "--num_workers", 0]
    images = demo_root / "tiles" / "test" / "spot"
    for method, folder in (("efficientad", "efficientad_resnet18_s"), ("puad", "puad_resnet18_s_teacher")):
        extra = ["--feature_extractor", "teacher"] if method == "puad" else []
        proc = ok(run(tmp_path, "train.py", "--method", method, "--teacher", teacher, "--steps", 3,
                      "--batch_size", 2, *common, *extra))
        assert "map quantiles" in proc.stderr
        ok(run(tmp_path, "eval.py", "--method", method, *common, *extra))
        rows = (tmp_path / "output" / folder / "results.csv").read_text().splitlines()
        assert rows[0].startswith("category,image_auroc") and rows[1].startswith("tiles,")
        ok(run(tmp_path, "predict.py", images, "--method", method, "--category", "tiles", *extra))
        predicted = [json.loads(x) for x in (tmp_path / "output" / "predict" / "results.jsonl")
                     .read_text().splitlines()]
        ok(run(tmp_path, "export_model.py", "--model_path", tmp_path / "output" / folder / "tiles.npz",
               "--save_dir", tmp_path / "exp" / method, "--onnx"))
        verified = json.loads((tmp_path / "exp" / method / "deploy.json").read_text())["verified"]
        assert max(verified["paddle_max_rel_diff"], verified["onnx_max_rel_diff"]) <= 1e-4
        ok(run(tmp_path, "infer.py", "--model_file", tmp_path / "exp" / method, "--input_file", images,
               "--enable_mkldnn", "True", "--save_path", tmp_path / "inf" / method))
        inferred = [json.loads(x) for x in
                    (tmp_path / "inf" / method / "results.jsonl").read_text().splitlines()]
        by_name = {Path(r["path"]).name: r["score"] for r in inferred}
        assert len(by_name) == len(predicted) == 3
        for record in predicted:
            assert by_name[Path(record["path"]).name] == pytest.approx(record["score"], abs=1e-4, rel=1e-4)


@pytest.mark.bad_input
def test_train_without_teacher_names_the_distill_command(demo_root: Path, tmp_path: Path) -> None:
    line = error_line(run(tmp_path, "train.py", "--method", "efficientad", "--data_path", demo_root,
                          "--category", "tiles", "--resize", SIZE, "--steps", 1))
    assert "needs --teacher PATH" in line and "python -m models.efficientad.distill" in line


@pytest.mark.bad_input
def test_teacher_of_another_backbone_or_size(teacher: Path, demo_root: Path, tmp_path: Path) -> None:
    line = error_line(run(tmp_path, "train.py", "--method", "puad", "--teacher", teacher, "--size", "m",
                          "--arch", "resnet50", "--data_path", demo_root, "--category", "tiles",
                          "--resize", SIZE, "--steps", 1))
    assert "distilled from resnet18: pass --size s --arch resnet18" in line


@pytest.mark.bad_input
def test_not_a_teacher_file(demo_root: Path, tmp_path: Path) -> None:
    """A checkpoint of another kind (here an ortho-like npz of ours) given as --teacher."""
    write_npz(str(tmp_path / "other.npz"), {"method": "ortho", "stage": "final"}, {"mean": np.zeros(3)})
    other = tmp_path / "other.npz"
    line = error_line(run(tmp_path, "train.py", "--method", "efficientad", "--teacher", other,
                          "--data_path", demo_root, "--category", "tiles", "--resize", SIZE, "--steps", 1))
    assert "not an EfficientAD teacher file" in line and "python -m models.efficientad.distill" in line


@pytest.mark.bad_input
def test_distill_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = error_line(run(tmp_path, "-m models.efficientad.distill", "--images", tmp_path / "empty",
                          "--pretrained", "none", "--arch", "resnet18"))
    assert "no images found" in line and "pass a folder of images" in line


@pytest.mark.bad_input
def test_distill_on_a_gpu_with_a_cpu_build(tmp_path: Path) -> None:
    """The user's command with ``--device gpu`` on a CPU-only Paddle: one line naming the GPU
    requirements, before any image is read; and no runpy warning (the package does not import the
    distill module the command runs)."""
    proc = run(tmp_path, "-m models.efficientad.distill", "--device", "gpu", "--images", tmp_path / "none",
               "--pretrained", "none", "--arch", "resnet18")
    line = error_line(proc)
    assert "CPU-only" in line and "requirements-gpu.txt" in line
    assert "RuntimeWarning" not in proc.stderr and "found in sys.modules" not in proc.stderr


@pytest.mark.bad_input
def test_too_few_training_images_for_validation(teacher: Path, demo_root: Path, tmp_path: Path) -> None:
    good = tmp_path / "root" / "few" / "train" / "good"
    good.mkdir(parents=True)
    for path in sorted((demo_root / "tiles" / "train" / "good").iterdir())[:3]:
        (good / path.name).symlink_to(path)
    line = error_line(run(tmp_path, "train.py", "--method", "efficientad", "--teacher", teacher,
                          "--data_path", tmp_path / "root", "--category", "few", "--resize", SIZE,
                          "--steps", 1))
    assert "would be held out for validation" in line and "add a validation/good folder" in line


@pytest.mark.bad_input
def test_bad_size_and_feature_extractor(tmp_path: Path) -> None:
    assert "--size x: choose s or m" in error_line(
        run(tmp_path, "train.py", "--method", "efficientad", "--size", "x", "--steps", 1))
    assert "--feature_extractor both: choose student or teacher" in error_line(
        run(tmp_path, "train.py", "--method", "puad", "--feature_extractor", "both", "--steps", 1))


@pytest.mark.bad_input
def test_tampered_checkpoint(teacher: Path, demo_root: Path, tmp_path: Path) -> None:
    """A saved efficientad model with NaN quantiles, or a student weight of another shape, is
    refused at load with one line naming the file."""
    good = tmp_path / "good.npz"
    fitted("efficientad", teacher, demo_root, steps=1).save(str(good))
    meta, arrays = read_npz(str(good))
    nan = tmp_path / "nan.npz"
    write_npz(str(nan), meta, {**arrays, "net.quantiles": np.full(4, np.nan, np.float32)})
    with pytest.raises(CheckpointError, match="array net.quantiles contains NaN or inf"):
        load_model(str(nan))
    shape = tmp_path / "shape.npz"
    write_npz(str(shape), meta, {**arrays, "net.student.0.weight": np.zeros((2, 3, 4, 4), np.float32)})
    with pytest.raises(CheckpointError, match="network weight student.0.weight has shape"):
        load_model(str(shape))
    assert load_model(str(good)).fitted


def test_medium_size(demo_root: Path, tmp_path: Path) -> None:
    """PDN-M: a teacher distilled with --size m, a student trained a step, the fused export's scores
    equal the dynamic graph's (and the grid map's maximum)."""
    teacher_m = tmp_path / "pdn_m.npz"
    ok(run(ROOT, "-m models.efficientad.distill", "--arch", "resnet18", "--pretrained", "none", "--size", "m",
           "--images", demo_root / "tiles" / "train", "--image_size", SIZE, "--steps", 1, "--batch_size", 2,
           "--norm_images", 2, "--out", teacher_m))
    model = fitted("efficientad", teacher_m, demo_root, steps=1, size="m")
    assert model.config.run_name == "efficientad_resnet18_m"
    assert model.network.student[-1].weight.shape == [768, 768, 1, 1]
    test = batches(demo_root, "tiles", size=4)[0]
    raw = model.raw_outputs([test])
    np.testing.assert_allclose(model.score(test)[1], model.grid_scores(raw[0], raw[1]), rtol=1e-4, atol=1e-5)
    assert_served_matches_dynamic(model, test, tmp_path)


def distill_args(demo_root: Path) -> list[str]:
    """A 4-step distillation on the demo's training images that saves its state every 2 steps."""
    return ["--arch", "resnet18", "--pretrained", "none", "--images", str(demo_root / "tiles" / "train"),
            "--image_size", str(SIZE), "--steps", "4", "--batch_size", "2", "--norm_images", "4",
            "--save_every", "2"]


def interrupt_distill(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run distill.main(args) and stop it with Ctrl-C when it draws its third batch (step 3)."""
    draw, calls = ImageFolder.draw, []

    def interrupted(self: ImageFolder, rng: np.random.Generator, count: int) -> np.ndarray:
        calls.append(count)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return draw(self, rng, count)

    monkeypatch.setattr(ImageFolder, "draw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill.main(args)
    monkeypatch.setattr(ImageFolder, "draw", draw)


def test_distill_resumes_to_the_same_teacher(demo_root: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A distillation interrupted (Ctrl-C) at step 3 of 4, with a state saved after step 2, ends
    with --resume at the weights of an uninterrupted run (within 1e-5)."""
    args = distill_args(demo_root)
    assert distill.main([*args, "--out", str(tmp_path / "whole.npz")]) == 0
    interrupt_distill([*args, "--out", str(tmp_path / "half.npz")], monkeypatch)
    assert read_npz(str(tmp_path / "half.fitstate.npz"))[0]["steps"] == 2
    assert distill.main([*args, "--out", str(tmp_path / "half.npz"), "--resume"]) == 0
    assert not (tmp_path / "half.fitstate.npz").exists()
    whole, resumed = read_npz(str(tmp_path / "whole.npz"))[1], read_npz(str(tmp_path / "half.npz"))[1]
    assert sorted(whole) == sorted(resumed)
    for name, value in whole.items():
        np.testing.assert_allclose(resumed[name], value, atol=1e-5, err_msg=name)


def test_channel_moments_equal_numpy() -> None:
    """Teacher normalisation and distillation targets: per-channel mean/std over batches and positions."""
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(5, 384, 4, 3)).astype(np.float32)
    moments = ChannelMoments()
    moments.add(paddle.to_tensor(x[:2]))
    moments.add(paddle.to_tensor(x[2:]))
    mean, std = moments.result()
    flat = x.transpose(1, 0, 2, 3).reshape(384, -1).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(std, flat.std(axis=1), rtol=1e-5)


@pytest.mark.bad_input
def test_missing_teacher_file_names_the_distill_command(demo_root: Path, tmp_path: Path) -> None:
    line = error_line(run(tmp_path, "train.py", "--method", "efficientad", "--teacher", tmp_path / "none.npz",
                          "--data_path", demo_root, "--category", "tiles", "--resize", SIZE, "--steps", 1))
    assert "none.npz: no such file; distil one with: python -m models.efficientad.distill" in line


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["std", "losses", "optimizer"])
def test_distill_resume_refuses_a_damaged_state(demo_root: Path, tmp_path: Path, damage: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume on a distillation state whose target std, step losses or optimizer moments were
    changed stops with one line naming the state file, not a traceback."""
    args = [*distill_args(demo_root), "--out", str(tmp_path / "t.npz")]
    interrupt_distill(args, monkeypatch)
    state = tmp_path / "t.fitstate.npz"
    meta, arrays = read_npz(str(state))
    if damage == "std":
        arrays["std"] = np.zeros_like(arrays["std"])
    elif damage == "losses":
        del arrays["losses"]
    else:
        moment = next(name for name in arrays if name.startswith("opt.") and ":" in name)
        arrays[moment.replace(moment.split(":")[0], "opt.no.such.param")] = arrays.pop(moment)
    write_npz(str(state), meta, arrays)
    proc = run(tmp_path, "-m models.efficientad.distill", *args, "--resume")
    line = error_line(proc)
    assert "t.fitstate.npz" in line and "delete it to start over" in line
    expected = {"std": "mean/std must be 384 finite values (std > 0)", "losses": "no finite step losses",
                "optimizer": "the optimizer state does not fit the network"}[damage]
    assert expected in line


def test_distill_from_a_paddle_vision_weight_file(demo_root: Path, tmp_path: Path) -> None:
    """The teacher's targets come from the backbone the user gives: a file written the way Paddle's
    own ImageNet weights are (``paddle.save(paddle.vision.models.resnet18().state_dict())``),
    through the distill command; its target statistics are those of that backbone, not of a
    random one."""
    paddle.seed(5)
    weights = tmp_path / "resnet18.pdparams"
    paddle.save(paddle.vision.models.resnet18().state_dict(), str(weights))
    out = tmp_path / "pdn_s.npz"
    images = demo_root / "tiles" / "train"
    ok(run(ROOT, "-m models.efficientad.distill", "--arch", "resnet18", "--pretrained", weights,
           "--images", images, "--image_size", SIZE, "--steps", 1, "--batch_size", 2,
           "--norm_images", 4, "--out", out))
    teacher = read_teacher(str(out))
    extractor = distill.TargetFeatures(build_trunk("resnet18", ("layer2", "layer3"), str(weights), 0), SIZE)
    mean, std = distill.channel_stats(extractor, ImageFolder(str(images), SIZE, "--images"), 4, 0, 2)
    np.testing.assert_allclose(teacher.mean, mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(teacher.std, std, rtol=1e-4, atol=1e-6)
    random = distill.TargetFeatures(build_trunk("resnet18", ("layer2", "layer3"), "none", 0), SIZE)
    other, _ = distill.channel_stats(random, ImageFolder(str(images), SIZE, "--images"), 4, 0, 2)
    assert not np.allclose(other, mean, rtol=1e-2)
