"""--method cutpaste (models.cutpaste): training, density against scikit-learn, resume, the
re-implementation's commands through the real scripts, maps, bad input. Random-initialised
resnet18 on the 64 px demo images, read at 32 px to keep the steps cheap."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from sklearn.covariance import LedoitWolf

from core.errors import ConfigError, InputError
from core.runtime import Runtime
from datasets import AnomalyDataset, Preprocess, list_samples
from engine.workflow import DataPlan, FitPlan, train_category
from models import build_model, load_model, model_config
from models.checkpoint import read_npz
from models.components.color import to_inputs, to_pixels
from models.cutpaste import CutPasteModel
from models.cutpaste import model as cutpaste_model
from models.cutpaste.augment import training_batch
from models.cutpaste.model import coverage_matrix, patch_index

ROOT = Path(__file__).resolve().parent.parent
SIZE, BATCH = 32, 2


def config(**fields):
    return model_config("cutpaste", pretrained="none", image_size=fields.pop("size", SIZE),
                        resize=fields.pop("size", SIZE), **{"epochs": 4, **fields})


def train_images(demo_root: Path, size: int = SIZE) -> np.ndarray:
    dataset = AnomalyDataset(list_samples(demo_root, "tiles", "train"), Preprocess(size))
    return np.stack([dataset[i]["image"] for i in range(len(dataset))])


def script(name: str, *args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=900)


def fixed_batch_loss(model: CutPasteModel, images: np.ndarray) -> float:
    """Cross-entropy of the network on one fixed augmented batch of ``images`` (batch statistics,
    as in training: the running ones of a few steps are far from them)."""
    samples, labels = training_batch(to_pixels(images), model.options.variant, np.random.default_rng(99))
    model.network.train()
    with paddle.no_grad():
        logits = model.network(paddle.to_tensor(to_inputs(samples)))
    return float(F.cross_entropy(logits, paddle.to_tensor(labels)).numpy())


def test_training_steps_lower_the_loss(demo_root, monkeypatch):
    """8 steps on the 8 "tiles" images, each step drawing the same augmented batch (seed 99), lower
    that batch's loss: the gradients reach the network and the optimizer steps along them."""
    images = train_images(demo_root)
    settings = config(variant="normal", epochs=8, freeze_backbone=0)
    before = fixed_batch_loss(build_model(settings, Runtime(engine="dynamic")), images)
    def same_batch(pixels, variant, rng, patch):
        return training_batch(pixels, variant, np.random.default_rng(99))

    monkeypatch.setattr(cutpaste_model, "training_batch", same_batch)
    model = build_model(settings, Runtime(engine="dynamic"))  # the same initial weights
    model.fit([images])
    assert len(model.losses) == 8 and model.progress().keys() == {"loss", "accuracy"}
    after = fixed_batch_loss(model, images)
    assert after < 0.7 * before, (before, after)
    assert model.losses[-1] < model.losses[0]


def test_optimizer_and_schedule_are_the_papers():
    model = build_model(config(epochs=10, lr=0.05), Runtime(engine="dynamic"))
    assert isinstance(model.optimizer, paddle.optimizer.Momentum) and model.optimizer._momentum == 0.9
    optimizer = model.optimizer
    assert (optimizer._regularization_method, optimizer._regularization_coeff) == ("l2_decay", 3e-5)
    rates = []
    for _ in range(10):
        rates.append(model.schedule.get_lr())
        model.schedule.step()
    np.testing.assert_allclose(rates, 0.05 * (1 + np.cos(np.pi * np.arange(10) / 10)) / 2, rtol=1e-6)
    head = [layer for layer in model.network.head if isinstance(layer, paddle.nn.Linear)]
    assert [tuple(layer.weight.shape) for layer in head] == [(512, 512), (512, 128)]
    assert tuple(model.network.classifier.weight.shape) == (128, 3)  # 3way by default


def test_frozen_backbone_steps_change_only_the_head(demo_root):
    images = train_images(demo_root)
    model = build_model(config(freeze_backbone=1), Runtime(engine="dynamic"))
    conv = model.trunk.stem[0].weight
    start = conv.numpy().copy()
    model.partial_fit(images)
    np.testing.assert_array_equal(conv.numpy(), start)  # step 1: frozen
    model.partial_fit(images)
    assert np.abs(conv.numpy() - start).max() > 0  # step 2: the whole network trains


@pytest.fixture(scope="module")
def fitted(demo_root):
    """An image-level model trained 2 steps and calibrated on the 8 "tiles" images."""
    images = train_images(demo_root)
    model = build_model(config(epochs=2), Runtime(engine="dynamic"))
    model.fit([images[:4], images[4:]])
    model.calibrate([images])
    return model, images


def test_density_equals_scikit_learn(fitted, demo_root):
    model, images = fitted
    embeddings = model.embeddings(images)[:, 0].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)  # L2-normalised
    assert embeddings.shape == (8, 512)
    reference = LedoitWolf().fit(embeddings)
    np.testing.assert_allclose(model.density.mean, reference.location_, atol=1e-9)
    assert model.density.shrinkage == pytest.approx(reference.shrinkage_, rel=1e-6)
    test = train_images(demo_root)[:0]  # shapes only; score the demo test images below
    dataset = AnomalyDataset(list_samples(demo_root, "tiles", "test"), Preprocess(SIZE))
    test = np.stack([dataset[i]["image"] for i in range(len(dataset))])
    maps, scores = model.score(test)
    expected = np.sqrt(reference.mahalanobis(model.embeddings(test)[:, 0].astype(np.float64)))
    np.testing.assert_allclose(scores, expected, rtol=2e-3)
    # the image-level map is the image score everywhere
    np.testing.assert_allclose(maps, np.broadcast_to(scores[:, None, None], maps.shape), rtol=1e-6)
    # out-of-fold threshold: each half scored by the other half's Gaussian
    even, odd = embeddings[0::2], embeddings[1::2]
    held = np.concatenate([np.sqrt(LedoitWolf().fit(even).mahalanobis(odd)),
                           np.sqrt(LedoitWolf().fit(odd).mahalanobis(even))])
    assert model.threshold == pytest.approx(held.max(), rel=1e-5)
    assert model.score_min == pytest.approx(held.min(), rel=1e-5)


def test_checkpoint_round_trip_scores_the_same(fitted, tmp_path):
    model, images = fitted
    path = tmp_path / "tiles.npz"
    model.save(str(path))
    meta, arrays = read_npz(str(path))
    assert not any(name.startswith("net.trunk.") for name in arrays)  # the trunk is stored once
    assert any(name.startswith("backbone.stages.3.") for name in arrays)  # through layer4
    assert arrays["density_precision"].shape == (512, 512)
    loaded = load_model(str(path), runtime=Runtime(engine="inference"))
    np.testing.assert_allclose(loaded.score(images)[1], model.score(images)[1], rtol=1e-4)


def test_patch_map_spreads_each_score_over_its_window():
    index, side = patch_index(8, 4, 2)
    assert side == 3 and index.shape == (9 * 16,)
    image = np.arange(64).reshape(8, 8)
    np.testing.assert_array_equal(image.reshape(-1)[index].reshape(9, 4, 4)[4], image[2:6, 2:6])
    matrix = coverage_matrix(8, 4, 2, sigma=1e-3)  # no blur: the mean of the covering windows
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(matrix[0], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(matrix[3], [0.5, 0.5, 0], atol=1e-6)  # pixel 3: windows at 0 and 2
    scores = np.zeros((3, 3))
    scores[1, 1] = 1.0
    amap = matrix @ scores @ matrix.T
    assert amap[4, 4] == pytest.approx(0.25) and amap[0, 0] == 0  # window (2..5) shares pixel 4


def test_patch_level_model_scores_the_windows(demo_root):
    images = train_images(demo_root, 64)
    model = build_model(config(size=64, epochs=1, patch_size=32, patch_stride=16), Runtime(engine="dynamic"))
    model.fit([images])
    model.calibrate([images])
    maps, scores = model.score(images[:2])
    windows = model.embeddings(images[:2])
    assert windows.shape == (2, 9, 512)
    raw = model.density.score(windows.reshape(-1, 512)).reshape(2, 3, 3)
    matrix = coverage_matrix(64, 32, 16, model.config.sigma)
    np.testing.assert_allclose(maps, matrix @ raw @ matrix.T, rtol=1e-4)
    np.testing.assert_allclose(scores, maps.reshape(2, -1).max(axis=1), rtol=1e-6)


def train_args(demo_root: Path, save: Path, *extra: object) -> list[object]:
    return ["--method", "cutpaste", "--data_path", demo_root, "--category", "tiles", "--pretrained", "none",
            "--resize", SIZE, "--batch_size", BATCH, "--num_workers", 0, "--engine", "dynamic",
            "--save_path", save, *extra]


def test_resume_equals_an_uninterrupted_run(demo_root, tmp_path, monkeypatch):
    """6 steps of 2 images, backbone frozen for 4: saved after step 3, killed in step 5, resumed by
    train.py --resume: the weights of the uninterrupted run within 1e-5."""
    options = ("--epochs", 6, "--freeze_backbone", 4, "--variant", "union")
    whole = script("train.py", *train_args(demo_root, tmp_path / "whole", *options))
    assert whole.returncode == 0, whole.stderr
    assert "UPDATE STEPS" in script("train.py", "--help").stdout

    plan = FitPlan(DataPlan(demo_root, Preprocess(SIZE), batch_size=BATCH, num_workers=0),
                   config(epochs=6, freeze_backbone=4, variant="union"), tmp_path / "part", save_every=6)
    step = CutPasteModel.partial_fit

    def killed_in_step_5(self, images, paths=None):
        if len(self.losses) == 4:
            raise KeyboardInterrupt
        step(self, images, paths)

    monkeypatch.setattr(CutPasteModel, "partial_fit", killed_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_category(plan, "tiles", Runtime(engine="dynamic"))
    monkeypatch.undo()
    _, state = read_npz(str(plan.fit_state("tiles")))
    assert len(state["train_losses"]) == 3 and state["fit_progress"].tolist() == [0, 6, 0]
    resumed = script("train.py", *train_args(demo_root, tmp_path / "part", *options, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after 6 images" in resumed.stderr
    _, a = read_npz(str(tmp_path / "whole" / "cutpaste_resnet18_union" / "tiles.npz"))
    _, b = read_npz(str(plan.checkpoint("tiles")))
    weights = [name for name in a if name.startswith(("net.", "backbone."))]
    assert len(weights) > 100
    for name in weights:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(b["train_losses"], a["train_losses"], rtol=1e-5)
    # eval.py finds the run by its --variant: SAVE_PATH/cutpaste_resnet18_union/
    proc = script("eval.py", "--method", "cutpaste", "--variant", "union", "--save_path", tmp_path / "whole",
                  "--data_path", demo_root, "--category", "tiles", "--num_workers", 0)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "whole" / "cutpaste_resnet18_union" / "results.csv").is_file()


def test_pretrained_weights_file_reaches_layer4(tmp_path):
    """--pretrained PATH: a state dict saved the way Paddle users save one sets the whole trained
    trunk, layer4 included (paddle.vision names)."""
    network = paddle.vision.models.resnet18()
    path = str(tmp_path / "r18.pdparams")
    paddle.save(network.state_dict(), path)
    model = build_model(model_config("cutpaste", pretrained=path, image_size=SIZE, resize=SIZE),
                        Runtime(engine="dynamic"))
    np.testing.assert_array_equal(model.trunk.stages[3][1].conv2.weight.numpy(),
                                  network.layer4[1].conv2.weight.numpy())
    np.testing.assert_array_equal(model.network.trunk.stem[0].weight.numpy(), network.conv1.weight.numpy())


def test_the_re_implementations_commands(demo_root, tmp_path):
    """`run_training.py --model_dir models --head_layer 2 --variant 3way` and
    `eval.py --model_dir models --head_layer 2 --density torch`, as train.py and eval.py."""
    data = ("--data_path", demo_root, "--category", "tiles", "--pretrained", "none", "--resize", SIZE,
            "--num_workers", 0)
    proc = script("train.py", "--method", "cutpaste", "--model_dir", "models", "--head_layer", 2,
                  "--variant", "3way", *data, "--epochs", 2, "--batch_size", 4, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    checkpoint = tmp_path / "models" / "cutpaste_resnet18_3way" / "tiles.npz"
    meta, arrays = read_npz(str(checkpoint))
    assert (meta["head_layer"], meta["variant"], meta["epochs"]) == (2, "3way", 2)
    assert len(arrays["train_losses"]) == 2
    proc = script("eval.py", "--method", "cutpaste", "--model_dir", "models", "--head_layer", 2,
                  "--density", "torch", *data, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(checkpoint.parent / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["category"] for row in rows] == ["tiles", "mean"] and 0 <= float(rows[0]["image_auroc"]) <= 1
    image = sorted((demo_root / "tiles" / "test" / "spot").glob("*.png"))[0]
    proc = script("predict.py", image, "--method", "cutpaste", "--save_path", "models", "--category", "tiles",
                  "--save_pic=False", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{image} score=" in proc.stdout


@pytest.mark.bad_input
def test_unknown_variant_and_oversized_patch(demo_root, tmp_path):
    proc = script("train.py", *train_args(demo_root, tmp_path, "--variant", "cutout"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --variant cutout: use one of normal, scar, 3way, union")
    proc = script("train.py", *train_args(demo_root, tmp_path, "--patch_size", 48))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --patch_size 48: larger than the 32 px input; use at most the crop size")


@pytest.mark.bad_input
def test_density_needs_four_images_and_a_calibration(demo_root):
    images = train_images(demo_root)
    model = build_model(config(epochs=1), Runtime(engine="dynamic"))
    model.fit([images])
    with pytest.raises(ConfigError, match="has no density yet: call calibrate"):
        model.score(images)
    with pytest.raises(InputError, match="needs at least 4 training images"):
        model.calibrate([images[:3]])
