"""One fit spread over processes, and a fit resumed after being killed, equal a plain fit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datasets.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--category", "tiles", "--pretrained", "none", "--k", "16", "--batch_size", "4",
        "--cpu_threads", "1", "--num_workers", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist") / "demo"
    return generate(root, categories=("tiles",), n_train=48, n_test_good=2, n_test_defect=2,
                    size=64, seed=3)


def train(data: Path, out: Path, *extra: str, launch: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train.py"), "--data_path", str(data), *ARGS,
           "--save_path", str(out), *extra]
    if launch:
        cmd[1:1] = ["-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                    "--log_dir", str(out.parent / f"{out.name}-log")]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finished(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    return output


def assert_same_model(a: Path, b: Path) -> None:
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files)
        for name in ("mean", "inv_cov"):
            scale = np.abs(x[name]).max()
            np.testing.assert_allclose(y[name], x[name], rtol=0, atol=1e-5 * scale, err_msg=name)
        for name in x.files:
            if name not in ("mean", "inv_cov", "__meta__"):
                np.testing.assert_array_equal(x[name], y[name], err_msg=name)


@pytest.fixture(scope="module")
def plain(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    finished(train(data, out, "--resize", "96"))
    return out / "ortho_resnet18_16" / "tiles.npz"


def test_two_processes_equal_one(data: Path, plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    finished(train(data, out, "--resize", "96", launch=True))
    produced = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert produced == ["ortho_resnet18_16/tiles.npz"]  # rank 1 wrote nothing
    assert_same_model(plain, out / "ortho_resnet18_16" / "tiles.npz")
    from models import load_model

    single, double = load_model(str(plain)), load_model(str(out / "ortho_resnet18_16/tiles.npz"))
    assert double.n_train == single.n_train == 48
    assert double.threshold == pytest.approx(single.threshold, rel=1e-5)
    images = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
    np.testing.assert_allclose(double.score(images)[1], single.score(images)[1], rtol=1e-5)


@pytest.mark.bad_input
def test_resume_after_kill_equals_uninterrupted(data: Path, tmp_path: Path) -> None:
    size = ["--resize", "192"]  # slow enough to be killed in the middle of the fit
    finished(train(data, tmp_path / "plain", *size))
    plain = tmp_path / "plain" / "ortho_resnet18_16" / "tiles.npz"
    out = tmp_path / "out"
    state = out / "ortho_resnet18_16" / "tiles.fitstate.npz"
    final = out / "ortho_resnet18_16" / "tiles.npz"
    proc = train(data, out, *size, "--save_every", "8")
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert state.exists() and not final.exists(), "the fit ended before it could be killed"
    assert not [p for p in state.parent.iterdir() if "tmp" in p.name]
    output = finished(train(data, out, *size, "--resume"))
    assert "resuming after" in output
    assert not state.exists()
    assert_same_model(plain, final)
