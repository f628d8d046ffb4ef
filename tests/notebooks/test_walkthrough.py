"""notebooks/walkthrough.ipynb runs top to bottom against a (tiny) demo output."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"
CELL_TIMEOUT_S = 300


def _client(nb, venv_kernel, demo_dir: Path) -> tuple[NotebookClient, KernelManager, dict]:
    """A client on the venv's kernel with the notebook's folder as working directory, and the
    kernel's environment: this checkout's code first on PYTHONPATH (whatever the interpreter's
    editable install points at), the demo folder in CTT_DEMO_DIR, no MLflow/matplotlib overrides
    (the notebook must use the demo's store, and the inline backend makes figures PNG outputs)."""
    kernel_dir, kernel_name = venv_kernel
    km = KernelManager(kernel_name=kernel_name,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    env = {**os.environ, "CTT_DEMO_DIR": str(demo_dir),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for name in ("MLFLOW_TRACKING_URI", "MPLBACKEND"):
        env.pop(name, None)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    return client, km, env


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"clear the outputs of cells {dirty} before committing"


@pytest.mark.notebook
def test_walkthrough_executes_against_a_demo_output(tiny_demo_run, venv_kernel):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client, km, env = _client(nb, venv_kernel, tiny_demo_run.out)
    client.execute(env=env)  # raises CellExecutionError naming the cell on any error

    assert km.kernel_spec.argv[0] == sys.executable
    outputs = {i: c.outputs for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for outs in outputs.values() for o in outs)
    assert str(tiny_demo_run.out) in text  # it read the given demo folder, not demo_run/
    for label in ("no context", "subject item"):
        assert label in text
    images = [o for outs in outputs.values() for o in outs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # PCA plot, training curves, the report's Recall@K and latency plots
    for run_name in ("contextual", "sequence_only", "evaluation"):  # read from the demo's MLflow
        assert run_name in text


@pytest.mark.notebook
def test_walkthrough_names_what_is_missing_without_a_demo_output(tmp_path, venv_kernel):
    """Only the set-up cells, against an empty folder: a clear error, not a confusing later one."""
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = nb.cells[:2]  # the introduction and the set-up cell
    client, _, env = _client(nb, venv_kernel, tmp_path / "empty")
    with pytest.raises(CellExecutionError, match="not a demo output folder"):
        client.execute(env=env)
