"""Every notebook in notebooks/ runs top to bottom, on the local reference checkpoints the model tests build.

Each notebook takes its model from one environment variable (DFINE_MODEL, GDINO_MODEL) and ends every section
with a check that raises, so a notebook that runs through is a notebook whose checks all passed. The kernel is
this very interpreter (a kernel spec written to a temporary folder), so the test works wherever
`pip install -r tests/requirements.txt` ran, whatever kernels Jupyter has installed. Committed notebooks carry no
outputs: what they would show here comes from random weights.
"""
from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

import gdino_reference
from dfine_reference import checkpoint as dfine_checkpoint

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
CELL_TIMEOUT = 600  # seconds per cell; the first numba call compiles the CPU kernel, slow on a busy machine


def env_dfine() -> dict[str, str]:
    return {"DFINE_MODEL": str(dfine_checkpoint("n"))}  # nano: the fastest real D-FINE config


def env_gdino() -> dict[str, str]:
    # the small config test_gdino.py builds (same cache key): 32-wide Swin, 2-layer BERT, 50 queries, 320-pixel resize
    folder = gdino_reference.checkpoint("gdino-small", gdino_reference.small_config(), temper=True,
                                        size={"shortest_edge": 320, "longest_edge": 533})
    return {"GDINO_MODEL": str(folder)}


ENV = {  # notebook -> the environment it runs in (checkpoints built and cached on first use)
    "dfine.ipynb": env_dfine,
    "deformable_attention.ipynb": env_dfine,  # its inputs are what D-FINE's decoder hands the op
    "grounding_dino.ipynb": env_gdino,
}


def kernel_manager(folder: Path) -> KernelManager:
    """A kernel manager whose "python3" is the interpreter running the tests (not whatever `python` is on PATH)."""
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(folder / "kernels" / "python3")  # argv: [sys.executable, -m, ipykernel_launcher, ...]
    specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")])
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(ENV)


@pytest.mark.parametrize("name", sorted(ENV))
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ENV))
def test_notebook_runs(name, tmp_path, monkeypatch):
    for key, value in ENV[name]().items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, km=kernel_manager(tmp_path), timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})  # run from notebooks/, as Jupyter does
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, at the first failing cell
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images > 0, f"{name} drew no picture"
