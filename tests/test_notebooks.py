"""The notebooks run top to bottom on CPU and are stored without outputs."""

import glob
import importlib.util
import os

import nbformat
import pytest

from support.notebook_runner import ROOT, execute

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_notebooks_are_stored_without_outputs():
  assert {os.path.basename(p) for p in NOTEBOOKS} >= {"quickstart.ipynb", "ablations.ipynb",
                                                      "tpu_colab.ipynb"}
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


@pytest.mark.slow
def test_tpu_colab_runs_on_cpu_at_smoke_sizes_and_resumes_after_a_restart(tmp_path, monkeypatch):
  """The Colab notebook's own code path on a CPU (the `smoke` preset, picked by the backend), run
  twice on one workdir as after a runtime restart: the second run finds every phase done."""
  monkeypatch.setenv("KDJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  first = execute("tpu_colab.ipynb")
  assert "colab_smoke on 1 x cpu" in first and "bfloat16" in first
  assert "already complete" not in first
  for phase in ("teacher", "distilled", "scratch"):
    assert os.path.isdir(tmp_path / "run" / phase / "checkpoints"), phase
  assert "image/png" in first  # the curves
  # TensorBoard inline where it is installed (Colab), else where its event files are.
  has_tensorboard = importlib.util.find_spec("tensorboard") is not None
  assert ("TensorBoard is not installed here" in first) != has_tensorboard
  again = execute("tpu_colab.ipynb")
  for phase in ("teacher", "distilled", "scratch"):
    assert f"{phase}: already complete" in again
