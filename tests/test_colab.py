"""colabs/walrus_inference.ipynb runs top to bottom offline (nbclient), on a tiny configuration and
without walrus.pt: it then builds a random-weight checkpoint through the converter."""
import os

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colabs", "walrus_inference.ipynb")


def test_inference_notebook_executes(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("torch")
    monkeypatch.setenv("WALRUS_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("WALRUS_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("WALRUS_PT", str(tmp_path / "absent" / "walrus.pt"))
    monkeypatch.setenv("WALRUS_JAX_REPO", ROOT)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    assert "RANDOM-WEIGHT checkpoint" in text  # says so when walrus.pt is absent
    assert "converted ->" in text
    assert "steps/s" in text and "VRMSE" in text and "members" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "display_data"
              and "image/png" in o.get("data", {})]
    assert len(images) >= 2  # panels and the VRMSE curve (the GIF shows as image/gif or png)
    for name in ("panels.png", "vrmse.png", "rollout.gif"):
        assert os.path.getsize(tmp_path / "work" / "plots" / name) > 1000
