"""The notebooks run top to bottom on CPU and are stored without outputs."""

import glob
import os

import nbformat
import pytest

from support.notebook_runner import ROOT, execute

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_notebooks_are_stored_without_outputs():
  assert {os.path.basename(p) for p in NOTEBOOKS} >= {"quickstart.ipynb", "ablations.ipynb"}
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, path


@pytest.mark.slow
def test_quickstart_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("KDJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  outputs = execute("quickstart.ipynb")
  for phase in ("teacher", "distilled", "scratch"):
    assert phase in outputs
  assert "image/png" in outputs and "ROMEO." in outputs
