"""Checkpoints written by the previous release's own code still load and score the same.

The artifact is made the way a user made it: the scripts of commit ``PREVIOUS`` (the last main
before the per-method options and the package re-layout), taken from this repository's history
with ``git archive``, fit a model with train.py, and its predict.py records the scores. Today's
``load_model`` must read that file and give the same scores.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from core.runtime import Runtime
from datasets import Preprocess, read_image
from models import load_model

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS = "a30c0e330b55e2af8d7b63862dcb1953eefaaf44"


def previous_tree(dst: Path) -> Path:
    """The files of commit PREVIOUS under ``dst``; skips the test where the history is missing."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed: cannot take the previous release from the history")
    proc = subprocess.run([git, "archive", "--format=tar", PREVIOUS], cwd=ROOT, capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"commit {PREVIOUS[:12]} is not in this clone's history (shallow clone?)")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(dst, filter="data")
    return dst


@pytest.mark.parametrize("method", ["ortho", "patchcore"])
def test_checkpoint_of_the_previous_release_loads_and_scores_the_same(method, demo_root, tmp_path):
    old = previous_tree(tmp_path / "previous")
    out = tmp_path / "output"
    extra = ["--k", "8"] if method == "ortho" else ["--coreset_ratio", "0.5"]
    fit = subprocess.run([sys.executable, "train.py", "--data_path", str(demo_root), "--category", "tiles",
                          "--method", method, *extra, "--pretrained", "none", "--resize", "64",
                          "--num_workers", "0", "--save_path", str(out)],
                         cwd=old, capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr
    folder = out / ("ortho_resnet18_8" if method == "ortho" else "patchcore_resnet18")
    images = demo_root / "tiles" / "test" / "spot"
    scored = subprocess.run([sys.executable, "predict.py", str(images), "--model_path", str(folder),
                             "--category", "tiles", "--save_path", str(tmp_path / "pred"),
                             "--engine", "dynamic"], cwd=old, capture_output=True, text=True, timeout=600)
    assert scored.returncode == 0, scored.stderr
    records = [json.loads(x) for x in (tmp_path / "pred" / "results.jsonl").read_text().splitlines()]

    model = load_model(str(folder / "tiles.npz"), expect={"method": method},
                       runtime=Runtime(engine="dynamic"))
    assert model.threshold == pytest.approx(records[0]["threshold"], rel=1e-6)
    x = np.stack([Preprocess(64)(read_image(Path(r["path"]))) for r in records])
    _, scores = model.score(x)
    np.testing.assert_allclose(scores, [r["score"] for r in records], rtol=1e-4)
