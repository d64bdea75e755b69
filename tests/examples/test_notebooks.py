"""Every notebook runs top to bottom (its own asserts included).

Notebooks with a QUICK switch read SSM_LLM_NOTEBOOK_QUICK=1 as "use the small settings" (tiny models, few
configurations; about 30 s each on the 2-core CI machine). By hand, without it, they run their full settings.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

# Tiny models only: compiling dominates, and XLA without most optimizations ran them ~20% faster (measured;
# the notebooks running SmolLM2 were slower that way).
COMPILE_BOUND = {"mamba_and_quamba2.ipynb", "speculative_decoding.ipynb"}
NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("SSM_LLM_NOTEBOOK_QUICK", "1")  # the kernel inherits this process's environment
    if path.name in COMPILE_BOUND:
        monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # see tests/conftest.py
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
