"""The tutorials in notebooks/ run top to bottom, so they never rot.

Each notebook reads ``SMOKE_TEST`` from the environment variable ``NOTEBOOK_SMOKE_TEST`` (its second cell), and
with it set takes tiny settings: few samples, few steps. The test executes every notebook that way in a fresh
kernel, and checks that git holds them without outputs (a notebook's outputs are regenerated, not reviewed).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_there_is_a_tutorial_per_family():
    assert len(NOTEBOOKS) >= 8, [path.name for path in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, "a tutorial without code"
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells), \
        f"{path.name} is stored with outputs; clear them before committing"
    assert "NOTEBOOK_SMOKE_TEST" in code_cells[1].source, "the second code cell must read NOTEBOOK_SMOKE_TEST"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    monkeypatch.setenv("NOTEBOOK_SMOKE_TEST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # one intra-op thread unless told otherwise: the smoke settings' tensors are small, and on a busy 2-core machine
    # (CI) a second thread's synchronisation made 04_guidance take 123 s instead of 13 s
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
