"""notebooks/quickstart.ipynb runs top to bottom (nbclient, a real kernel) and is stored without outputs.

The executed notebook is saved as output/notebook/quickstart.executed.ipynb (git-ignored, beside
what the notebook itself writes; README: how its screenshot is made). Its first four-panel figure
goes to docs/screenshots/notebook-figure.png only when ORTHOAD_SCREENSHOTS=1 asks; otherwise to the
test's temporary folder.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from helpers import screenshot_dir

nbformat = pytest.importorskip("nbformat", reason="notebook test skipped: nbformat missing "
                               "(pip install -r requirements-app.txt)")
nbclient = pytest.importorskip("nbclient", reason="notebook test skipped: nbclient missing "
                               "(pip install -r requirements-app.txt)")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
EXECUTED = ROOT / "output" / "notebook" / "quickstart.executed.ipynb"  # beside the notebook's own outputs


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "pip install -q -r requirements.txt" in code[0].source


def test_notebook_runs_top_to_bottom(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")  # the kernel inherits it: the install cell skips the install
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "install skipped" in text
    assert "largest relative difference" in text
    figure = next(cell for cell in notebook.cells if "figure" in cell.metadata.get("tags", []))
    pictures = [out["data"]["image/png"] for out in figure.outputs if "image/png" in out.get("data", {})]
    assert len(pictures) == 2
    plots = next(cell for cell in notebook.cells if "tiles_{kind}.png" in cell.source)
    assert sum("image/png" in out.get("data", {}) for out in plots.outputs) == 3
    (screenshot_dir(tmp_path) / "notebook-figure.png").write_bytes(base64.b64decode(pictures[0]))
    nbformat.write(notebook, EXECUTED)
