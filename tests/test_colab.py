"""colabs/walrus_inference.ipynb runs top to bottom offline (nbclient), on its tiny configuration,
against a local stand-in for the hub (tests/hub_standin.py) that serves a tiny random-weight model in
the released layout as polymathic-ai/walrus: the notebook's wj.from_pretrained downloads and converts
it as it would the real one."""
import os

from conftest import execute_notebook
from hub_standin import StandinHub, released_files

import pytest

pytestmark = pytest.mark.slow  # runs a notebook top to bottom: the full tier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colabs", "walrus_inference.ipynb")


def test_inference_notebook_executes(tmp_path, monkeypatch):
    import walrus_jax as wj

    hub = StandinHub()
    hub.add_repo("polymathic-ai/walrus", released_files(wj.ModelConfig.tiny(n_states=67)))
    monkeypatch.setenv("HF_ENDPOINT", hub.start())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("WALRUS_JAX_PRETRAINED_CACHE", str(tmp_path / "converted"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("WALRUS_MODEL", raising=False)
    try:
        nb, text = execute_notebook(NOTEBOOK, tmp_path, monkeypatch, tmp_path / "work")
    finally:
        hub.stop()
    assert "loaded polymathic-ai/walrus" in text and "vocabulary 67 rows" in text
    assert hub.requests("GET", "/polymathic-ai/walrus/resolve/")  # downloaded through huggingface_hub
    assert os.listdir(tmp_path / "converted" / "polymathic-ai--walrus")  # and converted once
    assert "steps/s" in text and "VRMSE" in text and "members" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "display_data"
              and "image/png" in o.get("data", {})]
    assert len(images) >= 2  # panels and the VRMSE curve (the GIF shows as image/gif or png)
    for name in ("panels.png", "vrmse.png", "rollout.gif"):
        assert os.path.getsize(tmp_path / "work" / "plots" / name) > 1000
