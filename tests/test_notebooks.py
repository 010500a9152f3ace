"""Every notebook in notebooks/ runs top to bottom, and what is committed of it came from trained weights.

The walk-throughs take their model from one environment variable (DFINE_MODEL, GDINO_MODEL), here the models trained
by this project (notebooks/models/), and end every section with a check that raises, so a notebook that runs through
is a notebook whose checks all passed. The training notebooks run a smoke version (two steps, a few evaluation
scenes) into a temporary folder. The kernel is this very interpreter (a kernel spec written to a temporary folder),
so the test works wherever `pip install -r tests/requirements.txt` ran, whatever kernels Jupyter has installed.

Committed notebooks carry their outputs: the walk-throughs' from the shipped models, the training notebooks' from
their default run (a short preset into a scratch folder; the shipped models' length is a setting); never outputs of
random weights.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
MODELS = NOTEBOOKS / "models"
CELL_TIMEOUT = 600  # seconds per cell; the first numba call compiles the CPU kernel, slow on a busy machine

ENV = {  # notebook -> (the environment it runs in here, a text its committed outputs must show)
    "dfine.ipynb": ({"DFINE_MODEL": str(MODELS / "dfine-shapes")}, "dfine-shapes"),
    "deformable_attention.ipynb": ({"DFINE_MODEL": str(MODELS / "dfine-shapes")}, "value ("),
    "grounding_dino.ipynb": ({"GDINO_MODEL": str(MODELS / "gdino-shapes")}, "gdino-shapes"),
    "train_dfine.ipynb": ({"DFINE_TRAIN_STEPS": "2"}, "600 steps of 4 scenes"),  # + DFINE_TRAIN_OUT below
    "train_gdino.ipynb": ({"GDINO_TRAIN_STEPS": "2"}, "250 steps of 4 scenes"),  # + GDINO_TRAIN_OUT below
    "finetune.ipynb": ({"FINETUNE_STEPS": "2"}, "30 steps of 4 images per run"),  # + FINETUNE_OUT below
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
def test_committed_notebook_has_outputs_of_trained_weights(name):
    """Executed top to bottom in order, no error, and from the shipped models (or the default-length training)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{name}: run it top to bottom"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{name}: committed with an error"
    text = json.dumps([o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in outputs])
    assert ENV[name][1] in text, f"{name}: outputs not from the shipped model or the default training"
    if name.startswith("train_"):  # "run all" trains into a scratch folder, never over the shipped models
        assert "writing notebooks/runs/" in text, f"{name}: its default run must write under notebooks/runs/"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: committed without its pictures"


@pytest.mark.parametrize("name", sorted(ENV))
def test_committed_notebook_teaches(name):
    """A lesson's shape: a picture within the first four code cells (the result before the stages), a markdown cell
    (what to see in it) right after at least 90% of the cells that draw, and no printed source (the code is in the
    files, linked)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    draws = [i for i in code if any("image/png" in o.get("data", {}) for o in nb.cells[i].outputs)]
    assert draws and draws[0] in code[:4], f"{name}: no picture in its first four code cells"
    said = [i for i in draws if i + 1 < len(nb.cells) and nb.cells[i + 1].cell_type == "markdown"]
    assert len(said) >= 0.9 * len(draws), (f"{name}: pictures without a markdown cell after them (what to see): "
                                           f"cells {sorted(set(draws) - set(said))}")
    assert not [i for i in code if "getsource" in nb.cells[i].source], f"{name}: prints source code"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ENV))
def test_notebook_runs(name, tmp_path, monkeypatch):
    for key, value in ENV[name][0].items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    monkeypatch.setenv("DFINE_TRAIN_OUT", str(tmp_path / "dfine-out"))  # a smoke training never overwrites the models
    monkeypatch.setenv("GDINO_TRAIN_OUT", str(tmp_path / "gdino-out"))
    monkeypatch.setenv("FINETUNE_OUT", str(tmp_path / "finetune"))
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
