"""Execution of the EDA notebook on a small real subset."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from facemask.settings import project_root
from tests.helpers import copy_real_subset

NOTEBOOK = project_root() / "notebooks" / "eda.ipynb"


def _venv_kernel_specs(directory: Path) -> KernelSpecManager:
    """Write a `python3` kernel spec that runs this test's interpreter, and return its manager.

    The default `python3` spec starts whatever `python` is first on PATH, which may lack the
    project's packages, so the spec is written with `sys.executable`.
    """
    spec_dir = directory / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    manager = KernelSpecManager()
    manager.kernel_dirs = [str(directory / "kernels")]
    return manager


def test_notebook_stored_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    assert all(cell.outputs == [] for cell in code_cells)
    assert all(cell.execution_count is None for cell in code_cells)


def test_notebook_runs_on_real_subset(tmp_path, real_data_root: Path, monkeypatch) -> None:
    data_root = copy_real_subset(real_data_root, tmp_path / "data", 12)
    # The kernel inherits these variables from the process that starts it.
    monkeypatch.setenv("FACEMASK_DATA", str(data_root))
    monkeypatch.setenv("FACEMASK_EDA_MAX_PER_CLASS", "10")
    # The kernel's inline backend renders figures as PNG outputs, which Agg would suppress.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(project_root()), *sys.path]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=60,
        km=KernelManager(kernel_name="python3", kernel_spec_manager=_venv_kernel_specs(tmp_path)),
        resources={"metadata": {"path": str(tmp_path)}},
    )

    client.execute()

    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    errors = [output for output in outputs if output.output_type == "error"]
    assert errors == []
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 5
