"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from datasets.synthetic import generate


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset root (categories tiles and disc, 64x64 px) in MVTec layout."""
    dst = tmp_path_factory.mktemp("synthetic") / "demo"
    return generate(dst, n_train=8, n_test_good=3, n_test_defect=3, size=64, seed=0)
