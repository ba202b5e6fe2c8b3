"""Shared pytest fixtures, and the number of test processes of ``-n auto`` (pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from datasets.synthetic import generate
from models import METHODS

TESTS = Path(__file__).resolve().parent


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """pytest-xdist workers of ``-n auto``: PYTEST_XDIST_AUTO_NUM_WORKERS if set; else two on two
    usable cores (one computes while the other starts a subprocess or runs Python), half of them up
    to 8 on more (each test's Paddle already uses several threads)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(2, min(8, cores // 2))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset root (categories tiles and disc, 64x64 px) in MVTec layout."""
    dst = tmp_path_factory.mktemp("synthetic") / "demo"
    return generate(dst, n_train=8, n_test_good=3, n_test_defect=3, size=64, seed=0)


@pytest.fixture(scope="session")
def images_dir(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five test images of "tiles" (two good, three with a defect) in one folder (infer.py's input)."""
    folder = tmp_path_factory.mktemp("images")
    test = demo_root / "tiles" / "test"
    for path in [*sorted((test / "good").glob("*.png"))[:2], *sorted((test / "spot").glob("*.png"))]:
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    return folder


@pytest.fixture
def toy_registered():
    """The test-only trained method ``toyae`` (tests/toy_method.py) registered in this process
    (removed again afterwards); train.py subprocesses register it through ORTHOAD_PLUGINS."""
    sys.path.insert(0, str(TESTS))
    import toy_method

    METHODS.setdefault("toyae", toy_method.ToyAutoencoder)
    yield toy_method.ToyAutoencoder
    METHODS.pop("toyae")
    sys.path.remove(str(TESTS))
