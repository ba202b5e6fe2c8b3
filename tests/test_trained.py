"""The trained-network interface (models.components.trained) driven through train.py by a plugin
method (tests/toy_method.py: a 1x1-conv autoencoder, Adam, learning rate halved every epoch)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import CheckpointError, InputError
from core.runtime import Runtime
from datasets import Preprocess, list_samples
from engine.workflow import DataPlan, FitPlan, train_category
from models import build_model, load_model, model_config
from models.checkpoint import read_npz, write_npz

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
EPOCHS, BATCH, TRAIN = 3, 2, 8
STEPS = EPOCHS * TRAIN // BATCH


def train(demo_root: Path, save_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """train.py --method toyae with the plugin on the path (3 epochs of 4 steps on "tiles")."""
    env = {**os.environ, "ORTHOAD_PLUGINS": "toy_method",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    args = ["--data_path", demo_root, "--category", "tiles", "--method", "toyae", "--pretrained", "none",
            "--resize", 64, "--batch_size", BATCH, "--num_workers", 0, "--epochs", EPOCHS,
            "--engine", "dynamic", "--save_path", save_path, *extra]
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(checkpoint, stderr) of an uninterrupted train.py run."""
    out = tmp_path_factory.mktemp("toy-whole")
    proc = train(demo_root, out)
    assert proc.returncode == 0, proc.stderr
    return out / "toyae_resnet18_small" / "tiles.npz", proc.stderr


def test_train_py_trains_the_plugin_method_and_the_loss_goes_down(uninterrupted):
    path, stderr = uninterrupted
    meta, arrays = read_npz(str(path))
    assert (meta["method"], meta["epochs"], meta["lr"], meta["variant"]) == ("toyae", EPOCHS, 0.01, "small")
    assert "k" not in meta and "coreset_ratio" not in meta  # only the method's own options
    losses = arrays["train_losses"]
    assert losses.shape == (STEPS,) and np.isfinite(losses).all()
    per_epoch = losses.reshape(EPOCHS, -1).mean(axis=1)
    assert per_epoch[-1] < 0.9 * per_epoch[0], per_epoch
    for epoch, mean in enumerate(per_epoch, start=1):
        assert f"tiles: epoch {epoch}/{EPOCHS}, mean loss {mean:.6f}" in stderr
    assert "fit_progress" not in arrays and not any(name.startswith("opt.") for name in arrays)
    assert not path.with_name("tiles.fitstate.npz").exists()


def test_the_method_options_are_flags_and_folder_names(demo_root, tmp_path):
    proc = train(demo_root, tmp_path, "--variant", "huge")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --variant huge: use small or wide")
    proc = train(demo_root, tmp_path, "--lr", "0")  # the option's parse type checks it
    assert proc.returncode == 2 and "error: argument --lr: must be a finite number > 0, got 0" in proc.stderr


def test_resume_after_an_interruption_equals_the_uninterrupted_fit(uninterrupted, demo_root, tmp_path,
                                                                    toy_registered, monkeypatch):
    """Interrupted in the second epoch (fit state saved after step 5, killed at step 7), then
    continued by train.py --resume: the same weights, losses and threshold (Adam's moments, its
    step counters and the schedule come back from the fit state)."""
    data = DataPlan(demo_root, Preprocess(64), batch_size=BATCH, num_workers=0)
    config = model_config("toyae", epochs=EPOCHS, pretrained="none", image_size=64, resize=64)
    plan = FitPlan(data, config, tmp_path, save_every=10)
    steps = []
    fit_step = toy_registered.partial_fit

    def interrupted(self, images, paths=None):
        if len(steps) == 6:
            raise KeyboardInterrupt
        steps.append(len(images))
        fit_step(self, images, paths)

    monkeypatch.setattr(toy_registered, "partial_fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_category(plan, "tiles", Runtime(engine="dynamic"))
    state_path = plan.fit_state("tiles")
    meta, state = read_npz(str(state_path))
    assert meta["stage"] == "fit" and state["fit_progress"].tolist() == [1, 2, 4]  # epoch 2, 2 images in
    assert len(state["train_losses"]) == 5 and "opt.0.weight:moment1_0" in state
    assert "last_lr" in str(state["opt_schedule"]) and "0.005" in str(state["opt_schedule"])
    monkeypatch.undo()

    proc = train(demo_root, tmp_path, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resuming after 10 images" in proc.stderr
    whole_path, _ = uninterrupted
    _, whole = read_npz(str(whole_path))
    resumed_meta, resumed = read_npz(str(plan.checkpoint("tiles")))
    weights = [name for name in whole if name.startswith("net.")]
    assert len(weights) == 4
    for name in weights:
        np.testing.assert_allclose(resumed[name], whole[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(resumed["train_losses"], whole["train_losses"], rtol=1e-5)
    whole_model = load_model(str(whole_path), runtime=Runtime(engine="dynamic"))
    assert resumed_meta["threshold"] == pytest.approx(whole_model.threshold, rel=1e-5)
    assert not state_path.exists()


def test_resume_without_the_optimizer_state_would_differ(toy_registered, demo_root, tmp_path):
    """The check above can fail: a fit state whose Adam moments are dropped resumes elsewhere."""
    data = DataPlan(demo_root, Preprocess(64), batch_size=BATCH, num_workers=0)
    config = model_config("toyae", epochs=1, pretrained="none", image_size=64, resize=64)
    whole = train_category(FitPlan(data, config, tmp_path / "whole"), "tiles", Runtime(engine="dynamic"))
    model = toy_registered.create(config, Runtime(engine="dynamic"))
    model.category = "tiles"
    loader = data.loader(list_samples(demo_root, "tiles", "train"),
                         model.epoch_order(TRAIN, 0).tolist())
    batches = list(loader)
    model.partial_fit(batches[0]["images"], batches[0]["paths"])
    path = tmp_path / "state.npz"
    model.save(str(path))
    fresh = load_model(str(path), runtime=Runtime(engine="dynamic"))
    fresh.optimizer, fresh.schedule = fresh.make_optimizer()  # forget the moments
    for batch in batches[1:]:
        fresh.partial_fit(batch["images"], batch["paths"])
    restored = load_model(str(path), runtime=Runtime(engine="dynamic"))
    for batch in batches[1:]:
        restored.partial_fit(batch["images"], batch["paths"])
    final = whole.network.state_dict()
    for name, value in restored.network.state_dict().items():
        np.testing.assert_allclose(value.numpy(), final[name].numpy(), rtol=1e-5, atol=1e-6)
    assert max(np.abs(value.numpy() - final[name].numpy()).max()
               for name, value in fresh.network.state_dict().items()) > 1e-4


def test_a_step_budget_stops_the_fit_mid_epoch(demo_root, tmp_path):
    """--steps 5 with 4 steps per epoch: the fit stops after the first step of epoch 2, and
    the progress lines say how far it got."""
    proc = train(demo_root, tmp_path, "--steps", 5)
    assert proc.returncode == 0, proc.stderr
    meta, arrays = read_npz(str(tmp_path / "toyae_resnet18_small" / "tiles.npz"))
    losses = arrays["train_losses"]
    assert losses.shape == (5,) and int(arrays["n_train"]) == 5 * BATCH
    assert f"tiles: epoch 1, step 4/5, mean loss {losses[:4].mean():.6f}" in proc.stderr
    assert f"tiles: epoch 2, step 5/5, mean loss {losses[4]:.6f}" in proc.stderr
    assert "epoch 3" not in proc.stderr


def test_progress_shows_the_last_step_figures(toy_registered, demo_root):
    config = model_config("toyae", epochs=1, pretrained="none", image_size=64, resize=64)
    model = build_model(config)
    assert model.progress() == {}
    images = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    model.partial_fit(images)
    assert model.progress() == {"loss": model.losses[-1]}


@pytest.mark.bad_input
def test_a_changed_fit_state_names_the_array_at_load(toy_registered, tmp_path):
    """Network weights or optimizer moments that are not finite, of another shape or another type
    are refused at load with the array's name, before a step can use them."""
    config = model_config("toyae", epochs=1, pretrained="none", image_size=64, resize=64)
    model = build_model(config)
    model.partial_fit(np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
    model.save(str(tmp_path / "state.npz"))
    meta, arrays = read_npz(str(tmp_path / "state.npz"))
    moment = "opt.0.weight:moment1_0"
    changes = {
        "net.0.weight": (np.full_like(arrays["net.0.weight"], np.nan),
                         "network weight 0.weight is not all finite floats"),
        moment: (np.zeros(3, np.float32),
                 f"optimizer state {moment} has shape (3,), its parameter (4, 64, 1, 1)"),
        "opt.2.bias:moment2_0": (np.full_like(arrays["opt.2.bias:moment2_0"], np.inf),
                                 "optimizer state opt.2.bias:moment2_0 is not all finite floats"),
        "opt.9.weight:moment1_0": (arrays[moment], "optimizer state opt.9.weight:moment1_0 belongs to no"),
    }
    for name, (value, message) in changes.items():
        path = tmp_path / f"changed-{len(message)}.npz"
        write_npz(str(path), meta, {**arrays, name: value})
        with pytest.raises(CheckpointError) as info:
            load_model(str(path))
        assert str(info.value).startswith(f"{path}: checkpoint is incomplete ("), info.value
        assert message in str(info.value) and str(info.value).endswith("train it again")
    assert load_model(str(tmp_path / "state.npz")).losses == model.losses


def test_a_fit_state_saved_at_the_step_budget_resumes_without_another_step(toy_registered, demo_root,
                                                                            tmp_path, monkeypatch):
    """--steps 3 with a fit state after every step, interrupted while calibrating: the fit state
    holds all 3 steps, and --resume finishes it without a 4th step (the same weights as a fit
    that was not interrupted)."""
    data = DataPlan(demo_root, Preprocess(64), batch_size=BATCH, num_workers=0)
    config = model_config("toyae", steps=3, pretrained="none", image_size=64, resize=64)
    whole = train_category(FitPlan(data, config, tmp_path / "whole"), "tiles", Runtime(engine="dynamic"))
    plan = FitPlan(data, config, tmp_path / "cut", save_every=BATCH)

    def killed(self, batches):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy_registered, "calibrate", killed)
    with pytest.raises(KeyboardInterrupt):
        train_category(plan, "tiles", Runtime(engine="dynamic"))
    _, state = read_npz(str(plan.fit_state("tiles")))
    assert len(state["train_losses"]) == 3
    monkeypatch.undo()
    resumed = train_category(dataclasses.replace(plan, resume=True), "tiles", Runtime(engine="dynamic"))
    assert resumed.losses == whole.losses and len(resumed.losses) == 3
    final = whole.network.state_dict()
    for name, value in resumed.network.state_dict().items():
        np.testing.assert_allclose(value.numpy(), final[name].numpy(), rtol=1e-6, err_msg=name)


@pytest.mark.bad_input
def test_fit_refuses_a_pass_without_batches(toy_registered):
    """A generator is spent after the first epoch: the second would make no step (and a step budget
    would never be reached), so fit stops with one line instead of looping."""
    config = model_config("toyae", epochs=2, pretrained="none", image_size=64, resize=64)
    images = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    with pytest.raises(InputError, match="epoch 2 got no batches; pass a re-iterable"):
        build_model(config).fit(iter([images]))


def test_fit_at_a_spent_budget_takes_no_further_step(toy_registered):
    """AnomalyModel.fit on a model whose step budget is already spent (a fit state saved at the
    budget's last step) finalises without another optimizer step, as the workflow does."""
    config = model_config("toyae", epochs=3, steps=2, pretrained="none", image_size=64, resize=64)
    model = build_model(config)
    images = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    model.partial_fit(images)
    model.partial_fit(images)
    model.fit([images, images])
    assert len(model.losses) == 2 and model.fitted
    fresh = build_model(config).fit([images, images, images])
    assert len(fresh.losses) == 2
