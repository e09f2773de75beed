"""colabs/finetune_your_data.ipynb runs top to bottom offline (nbclient) on a tiny configuration,
without walrus.pt (it then builds a random-weight checkpoint through the converter): numpy arrays
with a field the release does not know -> Well dataset -> stats.yaml -> fine-tuning -> rollouts."""
import os

import yaml

from conftest import execute_notebook

import pytest

pytestmark = pytest.mark.slow  # runs a notebook top to bottom: the full tier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colabs", "finetune_your_data.ipynb")


def test_finetune_notebook_executes(tmp_path, monkeypatch):
    work = tmp_path / "work"
    nb, text = execute_notebook(NOTEBOOK, tmp_path, monkeypatch, work)
    assert "RANDOM-WEIGHT checkpoint" in text
    # The dataset folder the trainer reads, and the refused inputs named precisely.
    for split in ("train", "valid", "test"):
        assert f"tracer_in_cells/data/{split}/tracer_in_cells.hdf5" in text
    assert "field 'my_tracer': NaN/Inf" in text and "field 'dye': axis 1 (n_time)" in text
    stats = yaml.safe_load(open(work / "my_data" / "tracer_in_cells" / "stats.yaml"))
    assert set(stats["rms"]) == {"my_tracer", "velocity"} and set(stats["rms_delta"]) == {"my_tracer"}
    # Fine-tuning ran with the new field in its own vocabulary row, and both rollouts were scored.
    assert "fine-tuned 4 steps" in text and "my_tracer -> row 67" in text
    assert text.count("VRMSE step 1") >= 3 and "mean VRMSE over" in text
    assert os.path.isdir(work / "finetune_run")
    images = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "display_data"
              and "image/png" in o.get("data", {})]
    assert len(images) == 3
    for name in ("before.png", "after.png", "vrmse.png"):
        assert os.path.getsize(work / "plots" / name) > 1000
    # Nothing was written inside the repository.
    assert not os.path.exists(os.path.join(ROOT, "colabs", "walrus_work"))
