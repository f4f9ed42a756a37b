"""docs/python.md runs in a Jupyter kernel as written: one notebook cell per code block."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.walkthrough import code_blocks, environment, work_folder

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def _texts(cell: dict) -> str:
    """What a cell showed: its printed text and the plain-text form of what it displayed."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_the_walkthrough_runs_in_a_jupyter_kernel(tmp_path: Path) -> None:
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(block) for block in code_blocks()])
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=environment(tmp))  # raises CellExecutionError, with the cell's traceback, if a cell fails

    cells = [_texts(cell) for cell in notebook.cells]
    shown = "\n".join(cells)
    sweep_cell = next(text for text in cells if "trials finished" in text)
    # The sweep's trials trained in workers started from the kernel, and their progress showed in the notebook.
    assert "2 of 2 trials finished" in sweep_cell
    # At least one trial's line: in Jupyter rich draws into an ipywidgets Output that it redraws, and
    # what nbclient keeps of it depends on the timing of the last redraw (one line of two, once in CI).
    assert ": ok" in sweep_cell, sweep_cell
    assert "index.html ['summary.md']" in shown
    assert "B_simple = " in shown
    assert work_folder(shown).parent == tmp
    assert list(cwd.iterdir()) == []  # the kernel's working folder is left as it was
