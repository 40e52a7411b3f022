"""Execute every tutorial in notebooks/ and fail on the first cell that raises.

Each notebook runs in a fresh ``python3`` kernel (ipykernel's own kernelspec, which
jupyter_client launches with this interpreter, so the kernel imports the jmp under test),
from a temporary copy so that nothing it writes lands in the repository. The kernel
inherits this process's environment, including ``JAX_COMPILATION_CACHE_DIR`` and
``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` (conftest sets defaults), but never
``XLA_FLAGS``: a notebook sets its own device count with ``jmp.simulate_cpu_devices``.
"""

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WHICH_PYTHON = "import sys; print(sys.prefix)"


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the notebook must not depend on it
    return env


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    # A last cell, added to the copy only: which environment did the kernel run in?
    nb.cells.append(nbformat.v4.new_code_cell(_WHICH_PYTHON))
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    error = None
    try:
        client.execute(env=_kernel_env())
    except nbclient.exceptions.CellExecutionError as err:
        error = _ANSI.sub("", str(err))
    if error is not None:  # outside the except: one traceback, not two chained
        pytest.fail(f"{path.name}: a cell raised:\n{error}", pytrace=False)
    kernel_prefix = _stdout(nb.cells[-1]).strip()
    assert kernel_prefix == sys.prefix, (
        f"the python3 kernel ran in {kernel_prefix!r}, not in this environment {sys.prefix!r}: "
        f"install the kernelspec with `{sys.executable} -m ipykernel install --sys-prefix`"
    )


def test_notebooks_found() -> None:
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} have stored outputs; clear them "
        f"(jupyter nbconvert --clear-output --inplace {path.name})"
    )
