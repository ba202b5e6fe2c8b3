"""Runs that meet bad input or were killed leave consistent, uniquely named outputs.

- predict.py / infer.py: one distinct picture per input (output_names), ``--skip_bad`` and the
  results.jsonl written by a run that stops at an unreadable image;
- ``python -m datasets.synthetic`` touches only the folders it wrote;
- temporaries of killed writers are removed by the next writer into the same folder.

Scripts run as subprocesses, as users run them; the killed writers are real processes stopped
with SIGKILL inside the toolkit's own write functions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_deploy import SIZE, K, assert_one_line_error, fit_checkpoint, run

from core.io import STALE_NAME, atomic_write_text, remove_stale_temporaries
from core.runtime import Runtime
from datasets import Preprocess, denormalize, read_image
from datasets.synthetic import generate
from deploy import export_model
from deploy.report import SKIPPED_STATUS, output_names
from deploy.visualize import CAPTION_HEIGHT
from models import load_model, model_config
from models.checkpoint import write_npz

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ortho checkpoint (random resnet18, k=16, 64 px) fitted on the demo category tiles."""
    config = model_config("ortho", arch="resnet18", k=K, image_size=SIZE, resize=SIZE, pretrained="none")
    return fit_checkpoint(config, demo_root, tmp_path_factory.mktemp("reliab") / "tiles.npz")


@pytest.fixture(scope="module")
def export(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fused json export of ``checkpoint``."""
    folder = tmp_path_factory.mktemp("reliab-export") / "tiles"
    export_model(load_model(str(checkpoint), runtime=Runtime(engine="dynamic")), folder, "json")
    return folder


def results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def first_panel(picture: Path) -> np.ndarray:
    """The input image shown in the first panel of a predict.py picture, uint8 (S, S, 3)."""
    sheet = np.asarray(Image.open(picture).convert("RGB"))
    top = 2 * CAPTION_HEIGHT  # the title line, then the panel's caption
    return sheet[top:top + SIZE, :SIZE]


def assert_pictures_match_rows(out: Path, n_inputs: int) -> None:
    """One picture per row and per input, each showing the image of its row."""
    rows = results(out)
    assert len(rows) == n_inputs
    assert sorted(p.name for p in out.glob("*.png")) == sorted(Path(r["image"]).name for r in rows)
    for row in rows:
        shown = denormalize(Preprocess(SIZE)(read_image(row["path"])))
        np.testing.assert_array_equal(first_panel(Path(row["image"])), shown, err_msg=row["path"])


# -- output names ---------------------------------------------------------------------------------
def test_output_names_of_one_folder_and_of_single_files(tmp_path):
    assert output_names([tmp_path / "a" / "000.png", tmp_path / "a" / "001.bmp"]) == [
        "000.png", "001.png"]
    assert output_names([Path("x.png")]) == ["x.png"]


def test_output_names_of_same_named_files_in_two_folders(tmp_path):
    paths = [tmp_path / "dirA" / "good" / "000.png", tmp_path / "dirB" / "good" / "000.png",
             tmp_path / "dirB" / "good" / "001.png"]
    assert output_names(paths) == ["dirA_good_000.png", "dirB_good_000.png", "dirB_good_001.png"]


def test_output_names_keep_the_suffix_where_only_it_differs(tmp_path):
    paths = [tmp_path / "x.png", tmp_path / "x.jpg", tmp_path / "y.png"]
    assert output_names(paths) == ["x.png.png", "x.jpg.png", "y.png"]


def test_output_names_number_what_still_coincides(tmp_path):
    # a_b/c and a/b_c flatten alike; X and x coincide on case-insensitive file systems; the
    # numbered name skips a_b_c-2, which is another input's own name.
    paths = [tmp_path / "a_b" / "c.png", tmp_path / "a" / "b_c.png", tmp_path / "a_b" / "X.png",
             tmp_path / "a_b" / "x.png", tmp_path / "a_b_c-2.png"]
    assert output_names(paths) == ["a_b_c.png", "a_b_c-3.png", "a_b_X.png", "a_b_x-2.png",
                                   "a_b_c-2.png"]


def test_predict_writes_one_picture_per_input(checkpoint, demo_root, tmp_path):
    inputs = tmp_path / "in"
    for name, category in (("dirA", "tiles"), ("dirB", "disc")):
        shutil.copytree(demo_root / category / "test" / "good", inputs / name / "good")
    spot = demo_root / "tiles" / "test" / "spot"
    shutil.copy(spot / "000.png", inputs / "x.png")
    Image.open(spot / "001.png").save(inputs / "x.jpg", quality=95)
    args = [inputs / "dirA" / "good", inputs / "dirB" / "good", inputs / "x.png", inputs / "x.jpg",
            inputs / "x.png"]  # a file named twice is scored once
    out = tmp_path / "run" / "predict"  # predict.py writes into SAVE_PATH/predict
    proc = run("predict.py", *args, "--model_path", checkpoint, "--save_path", out.parent,
               "--engine", "dynamic")
    assert proc.returncode == 0, proc.stderr
    assert_pictures_match_rows(out, 3 + 3 + 2)
    assert {p.name for p in out.glob("*.png")} >= {"dirA_good_000.png", "dirB_good_000.png",
                                                   "x.png.png", "x.jpg.png"}


# -- unreadable images: --skip_bad, and a consistent folder when stopping -------------------------
def images_with_a_bad_one(demo_root: Path, folder: Path) -> Path:
    """Five readable images and ``002_broken.png`` (not an image) in ``folder``; the broken path."""
    folder.mkdir(parents=True)
    for index, path in enumerate(sorted((demo_root / "tiles" / "test" / "spot").glob("*.png"))):
        shutil.copy(path, folder / f"{index:03d}.png")
    for index, path in enumerate(sorted((demo_root / "tiles" / "test" / "good").glob("*.png"))[:2]):
        shutil.copy(path, folder / f"{index + 3:03d}.png")
    bad = folder / "002_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return bad


def stale_results(out: Path) -> None:
    """A results.jsonl of an earlier run, which a stopped run must not leave behind."""
    out.mkdir(parents=True)
    (out / "results.jsonl").write_text(json.dumps({"path": "old.png", "image": "old.png"}) + "\n")


def run_script(script: str, images: Path, out: Path, model: Path, *extra: str):
    """predict.py (``model`` a checkpoint) or infer.py (an export folder) on ``images``, batches of 2.

    Both write into ``out``: infer.py's --save_path, the predict sub-folder of predict.py's.
    """
    if script == "predict":
        assert out.name == "predict"
        return run("predict.py", images, "--model_path", model, "--save_path", out.parent,
                   "--engine", "dynamic", "--batch_size", 2, *extra)
    return run("infer.py", "--model_file", model, "--input_file", images, "--save_path", out,
               "--batch_size", 2, *extra)


def model_for(script: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("checkpoint" if script == "predict" else "export")


@pytest.mark.bad_input
@pytest.mark.parametrize("script", ["predict", "infer"])
def test_unreadable_image_stops_with_consistent_results(script, request, demo_root, tmp_path):
    bad = images_with_a_bad_one(demo_root, tmp_path / "in")
    out = tmp_path / "run" / "predict"
    stale_results(out)
    proc = run_script(script, bad.parent, out, model_for(script, request))
    assert_one_line_error(proc, f"error: {bad}: cannot read image", "or pass --skip_bad",
                          f"the 2 images scored before it are in {out / 'results.jsonl'}")
    # Batches of 2: 000 and 001 were written, the batch holding the broken file was not.
    assert [Path(r["path"]).name for r in results(out)] == ["000.png", "001.png"]
    assert_pictures_match_rows(out, 2)
    assert not [p for p in out.iterdir() if STALE_NAME.match(p.name)]


@pytest.mark.bad_input
@pytest.mark.parametrize("script", ["predict", "infer"])
def test_skip_bad_scores_the_others_and_says_so(script, request, demo_root, tmp_path):
    bad = images_with_a_bad_one(demo_root, tmp_path / "in")
    out = tmp_path / "run" / "predict"
    proc = run_script(script, bad.parent, out, model_for(script, request), "--skip_bad")
    assert proc.returncode == SKIPPED_STATUS == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith(f"skipped: {bad}: cannot read image (")
    assert lines[1] == "skipped 1 of 6 images (listed above); exit status 3"
    assert [Path(r["path"]).name for r in results(out)] == [f"{i:03d}.png" for i in range(5)]
    assert_pictures_match_rows(out, 5)
    assert f"wrote 5 pictures and {out / 'results.jsonl'}" in proc.stdout


# -- python -m datasets.synthetic touches only what it wrote --------------------------------------
SMALL = ["--size", "32", "--n_train", "2", "--n_test_good", "1", "--n_test_defect", "1"]


def synthetic(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datasets.synthetic", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def user_category(root: Path, name: str) -> Path:
    """A category folder of the user's own in ``root``, with one training image."""
    image = root / name / "train" / "good" / "mine.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(image)
    return image


def test_synthetic_keeps_what_it_did_not_write(tmp_path):
    dst = tmp_path / "demo"
    assert synthetic("--dst", dst, *SMALL).returncode == 0
    mine = user_category(dst, "screws")
    (dst / "notes.txt").write_text("my notes")
    proc = synthetic("--dst", dst, *SMALL, "--n_train", "3", "--categories", "tiles")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (dst / "tiles" / "train" / "good").iterdir()) == [
        "000.png", "001.png", "002.png"]
    assert not (dst / "disc").exists()  # written by the first run, not asked for by the second
    assert mine.is_file() and (dst / "notes.txt").read_text() == "my notes"
    assert json.loads((dst / ".synthetic.json").read_text())["written"] == ["tiles"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging folder left


@pytest.mark.bad_input
def test_synthetic_refuses_to_replace_a_category_it_did_not_write(tmp_path):
    dst = tmp_path / "demo"
    assert synthetic("--dst", dst, *SMALL, "--categories", "tiles").returncode == 0
    marker = (dst / ".synthetic.json").read_text()
    mine = user_category(dst, "disc")
    proc = synthetic("--dst", dst, *SMALL)
    assert_one_line_error(proc, f"error: {dst / 'disc'}: exists but was not written by this tool")
    assert sorted(p.name for p in (dst / "disc").rglob("*") if p.is_file()) == ["mine.png"]
    assert mine.is_file() and (dst / ".synthetic.json").read_text() == marker
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_synthetic_marker_without_a_record_of_what_it_wrote(tmp_path):
    # Earlier versions wrote no "written" list: only the folders the new build makes are replaced.
    dst = tmp_path / "demo"
    assert synthetic("--dst", dst, *SMALL).returncode == 0
    marker = json.loads((dst / ".synthetic.json").read_text())
    del marker["written"]
    (dst / ".synthetic.json").write_text(json.dumps(marker))
    mine = user_category(dst, "screws")
    assert synthetic("--dst", dst, *SMALL, "--seed", "1").returncode == 0
    assert mine.is_file()
    assert json.loads((dst / ".synthetic.json").read_text())["seed"] == 1


# -- temporaries of killed writers ----------------------------------------------------------------
# A writer stopped inside the toolkit's own write function, after its temporary exists: it prints
# "ready" and sleeps until killed.
WRITER = """
import sys, time
from pathlib import Path

def block(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(600)

kind, target = sys.argv[1], Path(sys.argv[2])
if kind == "checkpoint":
    import numpy as np
    from models.checkpoint import write_npz
    np.savez = lambda f, **arrays: (f.write(b"PK partial"), f.flush(), block())
    write_npz(str(target), {}, {"x": np.zeros(3)})
elif kind == "export":
    import deploy.export as export
    from types import SimpleNamespace
    export._build = block
    export.export_model(SimpleNamespace(check_statistics=lambda source, fix: None), target,
                        source="fitted.npz")
elif kind == "dataset":
    import datasets.synthetic as synthetic
    synthetic._write_category = block
    synthetic.generate(target)
elif kind == "results":
    import os
    from core.io import atomic_write_text
    os.replace = block
    atomic_write_text(target, "partial")
"""


def start_writer(kind: str, target: Path) -> tuple[subprocess.Popen, Path]:
    """A writer blocked while writing ``target``, and the temporary it made beside it."""
    before = set(target.parent.iterdir())
    proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    made = [p for p in set(target.parent.iterdir()) - before if STALE_NAME.match(p.name)]
    assert len(made) == 1 and f"-{proc.pid}" in made[0].name, made
    return proc, made[0]


def write_again(kind: str, target: Path, checkpoint: Path) -> None:
    """What the next run writes into the same folder."""
    if kind == "checkpoint":
        write_npz(str(target), {}, {"x": np.ones(3)})
    elif kind == "export":
        export_model(load_model(str(checkpoint), runtime=Runtime(engine="dynamic")), target, "json")
    elif kind == "dataset":
        generate(target, categories=("tiles",), n_train=1, n_test_good=1, n_test_defect=1, size=32)
    else:
        atomic_write_text(target, "done")


@pytest.mark.parametrize("kind", ["checkpoint", "export", "dataset", "results"])
@pytest.mark.bad_input
def test_temporaries_of_killed_writers_are_removed(kind, request, tmp_path):
    target = tmp_path / {"checkpoint": "tiles.npz", "export": "deploy", "dataset": "demo",
                         "results": "results.jsonl"}[kind]
    live, kept = start_writer(kind, target)
    killed, left = start_writer(kind, target)  # leaves the live writer's temporary alone
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    foreign = tmp_path / f"notes.tmp-{killed.pid}"  # not our naming (no leading dot)
    foreign.write_text("the user's")
    try:
        assert left.exists()
        write_again(kind, target, request.getfixturevalue("checkpoint") if kind == "export" else None)
        assert not left.exists()
        assert kept.exists()
        assert foreign.read_text() == "the user's"
        assert target.exists()
    finally:
        live.kill()
        live.wait(timeout=60)
        live.stdout.close()
        live.stderr.close()
        killed.stdout.close()
        killed.stderr.close()


def test_stale_temporary_names():
    assert STALE_NAME.match(".tiles.npz.tmp-123")["pid"] == "123"
    assert STALE_NAME.match(".deploy.export-77-k2j_x9")["target"] == "deploy"
    assert STALE_NAME.match(".demo.partial-5-abcd1234.old")["pid"] == "5"
    for name in ("tiles.npz.tmp-123", ".tiles.npz.tmp-", ".tiles.npz.tmp-12a", ".x.backup-3"):
        assert STALE_NAME.match(name) is None, name


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".a.png.tmp-{dead_pid}"
    stale.write_text("x")
    staging = tmp_path / f".deploy.export-{dead_pid}-abc"
    (staging / "sub").mkdir(parents=True)
    mine = tmp_path / f".a.png.tmp-{os.getpid()}"
    mine.write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([stale, staging])
    assert mine.exists() and not stale.exists() and not staging.exists()
