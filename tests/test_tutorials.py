"""The four tutorial notebooks run top to bottom (fast mode, ``MACE_SPARSE_FAST=1``) from ``tutorials/`` with
the ``python3`` kernel, and are stored without outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))


def test_there_are_four_tutorials():
    assert [p.stem.split("_", 1)[1] for p in NOTEBOOKS] == ["quickstart", "python_api", "interpretability", "magnetism"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    import nbformat

    book = nbformat.read(path, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert book.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MACE_SPARSE_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    book = nbformat.read(path, as_version=4)
    client = NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(TUTORIALS)}})
    try:
        client.execute()
    finally:
        for work in TUTORIALS.glob(f"work_{path.stem}*"):
            shutil.rmtree(work, ignore_errors=True)
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)
    assert text.strip()  # the notebook printed its results
