"""Executes a notebook of notebooks/ top to bottom in a fresh kernel (nbclient), as CI does."""

import json
import os

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo


def execute(name: str, timeout: int = 600) -> str:
  """Runs notebooks/<name> in its folder (the kernel inherits this process's environment) and
  returns its outputs as one JSON string; a failing cell raises CellExecutionError."""
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.join(ROOT,
                                                                                "notebooks")}})
  client.execute()
  return json.dumps([cell.get("outputs", []) for cell in nb.cells])
