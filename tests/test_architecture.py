"""The package layering (docs/architecture.md): imports point down only, and the deploy runtime
runs an export on a box without the models or the training code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_deploy import (
    SIZE,
    check_infer_outputs,
    dynamic_references,
    export_with_script,
    fit_checkpoint,
)

from core.runtime import Runtime
from deploy import read_manifest
from models import build_model, load_model, model_config
from models.checkpoint import read_npz, write_npz

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "core": set(),
    "datasets": {"core"},
    "models": {"core"},
    "deploy": {"core", "datasets"},
    "engine": {"core", "datasets", "models", "deploy"},
}
"""Packages each package may import (besides itself): every arrow points down."""
EXCEPTIONS = {"deploy/export.py": {"models"}, "models/efficientad/images.py": {"datasets"}}
"""Modules allowed one more arrow: the exporter is the one deploy module that reads models; EfficientAD
reads image folders that are no anomaly dataset (distillation and penalty images)."""
SCRIPTS = {"infer.py": {"core", "datasets", "deploy"}}
"""Scripts held to the same rule: infer.py must run with the deploy side alone."""
TRAINING = ("models", "engine", "train", "eval", "predict", "export_model", "utils", "deploy.export")


def imported_packages(path: Path) -> set[str]:
    """First components of every module ``path`` imports (at any depth, absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def import_graph() -> dict[str, set[str]]:
    """{module path relative to the repository: our packages it imports}."""
    graph = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            graph[str(path.relative_to(ROOT))] = imported_packages(path) & set(ALLOWED)
    for script in SCRIPTS:
        graph[script] = imported_packages(ROOT / script) & set(ALLOWED)
    return graph


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """``module -> package`` for every import the layering does not allow."""
    wrong = []
    for module, targets in graph.items():
        owner = module.split("/")[0]
        allowed = SCRIPTS.get(module) or (ALLOWED[owner] | {owner} | EXCEPTIONS.get(module, set()))
        wrong += [f"{module} -> {target}" for target in sorted(targets - allowed)]
    return wrong


def test_no_upward_arrow_in_the_import_graph():
    graph = import_graph()
    assert len(graph) > 40 and graph["engine/workflow.py"] >= {"models", "datasets", "core"}
    assert upward_arrows(graph) == []


def test_the_check_sees_an_upward_arrow():
    """The check itself: a models module importing engine, a function-level import of models in
    the deploy runtime, and deploy/export.py reading models (allowed)."""
    graph = {"models/base.py": {"core", "engine"}, "deploy/runner.py": {"core", "models"},
             "deploy/export.py": {"core", "models"}, "infer.py": {"deploy", "engine"}}
    assert upward_arrows(graph) == ["models/base.py -> engine", "deploy/runner.py -> models",
                                    "infer.py -> engine"]
    source = "def f():\n    from models.base import AnomalyModel\n"
    path = ROOT / "tests" / "_function_import_probe.py"
    try:
        path.write_text(source)
        assert imported_packages(path) == {"models"}
    finally:
        path.unlink()


BLOCKED_RUN = """
import runpy, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on this production box")

BLOCKED = set(sys.argv[1].split(","))
sys.meta_path.insert(0, Blocked())
sys.argv = sys.argv[2:]
if sys.argv[0] == "-c":
    exec(sys.argv[1])
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_blocked(*args: object) -> subprocess.CompletedProcess:
    """A script (or ``-c CODE``) run in a Python where importing the models and training code raises."""
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, ",".join(TRAINING), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_blocked_imports_really_fail():
    proc = run_blocked("export_model.py", "--help")
    assert proc.returncode != 0 and "is not installed on this production box" in proc.stderr


@pytest.fixture(scope="module")
def ortho_export(demo_root: Path, images_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(fused export folder, unfused export folder, dynamic-graph reference) of an ortho k=8 fit."""
    root = tmp_path_factory.mktemp("layering")
    config = model_config("ortho", k=8, image_size=SIZE, resize=SIZE, pretrained="none")
    checkpoint = fit_checkpoint(config, demo_root, root / config.run_name / "tiles.npz")
    folders = {fuse: export_with_script(checkpoint, root / f"export-{fuse}", "ortho", "json", "--k", 8,
                                        "--fuse" if fuse else "--no-fuse")
               for fuse in (True, False)}
    return folders, dynamic_references({"ortho": checkpoint}, images_dir)["ortho"]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_infer_runs_without_models_or_training_code(fuse, ortho_export, images_dir, tmp_path):
    folders, (_, _, scores) = ortho_export
    folder = folders[fuse]
    manifest = read_manifest(folder)
    assert (manifest.fused, manifest.k, manifest.run_name) == (fuse, 8, "ortho_resnet18_8")
    probe = ("from deploy.runner import DeployedModel; "
             f"print(DeployedModel.load({str(folder)!r}).manifest.method)")
    proc = run_blocked("-c", probe)
    assert proc.returncode == 0 and proc.stdout.strip() == "ortho", proc.stderr
    out = tmp_path / "infer"
    proc = run_blocked("infer.py", "--model_file", folder / manifest.model_file,
                       "--input_file", images_dir, "--save_path", out, "--batch_size", 2)
    check_infer_outputs(proc, out, images_dir, scores, manifest.threshold)


def test_checkpoints_of_the_union_config_load_with_their_own_options(tmp_path):
    """Checkpoints written before the per-method options held every method's fields (patchcore
    with k = 0, ortho with PatchCore's fields): they load, keep their own options and ignore the
    others; the identity check and the folder name use the method's name fields only."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    union = {"k": 0, "eps": 0.01, "coreset_ratio": 0.5, "projection_dim": 128, "num_neighbors": 2,
             "half": False}
    for method, own in (("ortho", {"k": 8}), ("patchcore", {"coreset_ratio": 0.5, "num_neighbors": 2})):
        config = model_config(method, image_size=SIZE, resize=SIZE, pretrained="none", **own)
        model = build_model(config, Runtime(engine="dynamic")).fit([images])
        path = str(tmp_path / f"{method}.npz")
        model.save(path)
        meta, arrays = read_npz(path)
        write_npz(path, {**meta, **union, **own}, arrays)  # as the earlier version wrote it
        loaded = load_model(path, expect=config.identity(), runtime=Runtime(engine="dynamic"))
        assert loaded.config == config
        np.testing.assert_allclose(loaded.score(images)[1], model.score(images)[1], rtol=1e-5)
    assert model_config("patchcore").identity() == {"method": "patchcore", "arch": "resnet18",
                                                    "image_size": 256, "resize": 256}
