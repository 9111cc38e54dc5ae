"""notebooks/quickstart.ipynb runs top to bottom (so it cannot rot)."""

from __future__ import annotations

import nbformat
import pytest
from conftest import ROOT, mpi_env
from nbclient import NotebookClient


@pytest.mark.mpi
def test_quickstart_notebook_executes(monkeypatch):
    for key, value in mpi_env().items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Plan:" in printed and "2 stages" in printed
    assert "val_accuracy" in printed
    assert "share of that time per rank" in printed  # the timeline's summary, then its Gantt chart shown
    assert any(
        "image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
