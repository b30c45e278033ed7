"""Parametrizations whose first case runs in the quick suite (`pytest -m "not slow"`) and whose
other cases run in the full suite only (they repeat the same check on more families or sizes)."""

import pytest


def first_quick(values):
  return [value if i == 0 else pytest.param(value, marks=pytest.mark.slow)
          for i, value in enumerate(values)]
