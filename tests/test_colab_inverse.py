"""colabs/inverse_problem.ipynb runs top to bottom offline (nbclient) on a tiny configuration: gradient
descent through wj.rollout_fn recovers a perturbed state from the observed future states."""
import os
import re

from conftest import execute_notebook

import pytest

pytestmark = pytest.mark.slow  # runs a notebook top to bottom: the full tier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colabs", "inverse_problem.ipynb")


def test_inverse_problem_notebook_recovers_the_state(tmp_path, monkeypatch):
    work = tmp_path / "work"
    nb, text = execute_notebook(NOTEBOOK, tmp_path, monkeypatch, work)
    assert "RANDOM weights" in text
    m = re.search(r"misfit ([0-9.e+-]+) -> ([0-9.e+-]+); state error 1.000 -> ([0-9.]+)", text)
    assert m, text[-2000:]
    first, last, error = (float(v) for v in m.groups())
    assert last < 0.05 * first and error < 0.3, (first, last, error)  # measured: 58x lower, 0.13
    assert os.path.getsize(work / "plots" / "inverse_problem.png") > 1000
