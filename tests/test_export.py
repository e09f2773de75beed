"""wj.export: a serialized jax.export rollout, called from a fresh process that imports only jax."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import walrus_jax as wj
from walrus_jax.errors import UserError
from walrus_jax.inference import export as export_mod
from walrus_jax.models.config import OPEN, PERIODIC, WALL

BCS = ((PERIODIC, PERIODIC), (WALL, OPEN))
FI = np.array([4, 5, 3, 7])

CONSUMER = """
import sys
import jax, numpy as np
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
inputs = np.load(sys.argv[2])
for b in (1, 3):
    args = [inputs[name][:b] for name in ("x", "c", "mask") if name in inputs.files]
    np.save(f"{sys.argv[3]}_{b}.npy", np.asarray(exported.call(*args)))
assert "walrus_jax" not in sys.modules
"""


def _model():
    return wj.Walrus(wj.ModelConfig.tiny(n_states=10), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("with_mask", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_exported_rollout_equals_the_rollout_in_a_process_without_walrus_jax(tmp_path, with_mask):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 3, 32, 32, 3)).astype(np.float32)
    c = (1 + 0.1 * rng.normal(size=(3, 32, 32, 1))).astype(np.float32)
    mask = (rng.random((3, 32, 32)) < 0.1) if with_mask else None
    model = _model()
    path = tmp_path / "rollout.jaxexport"
    exported = wj.export(model, x[:2], path, field_indices=FI, bcs=BCS, n_steps=3, constant_fields=c[:2], mask=mask)
    assert str(exported.in_avals[0].shape[0]) == "b"
    arrays = {"x": x, "c": c} | ({"mask": mask} if with_mask else {})
    np.savez(tmp_path / "inputs.npz", **arrays)
    subprocess.run([sys.executable, "-c", CONSUMER, str(path), str(tmp_path / "inputs.npz"), str(tmp_path / "out")],
                   check=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    want = np.asarray(wj.rollout(model, x, field_indices=FI, bcs=BCS, n_steps=3, constant_fields=c, mask=mask))
    for b in (1, 3):
        got = np.load(tmp_path / f"out_{b}.npy")
        assert got.shape == (b, 3, 32, 32, 3)
        np.testing.assert_allclose(got, want[:b], rtol=0, atol=1e-6 * np.abs(want).max())


def test_weights_over_the_format_limit_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "FLATBUFFER_LIMIT", 1000)
    x = np.zeros((1, 3, 32, 32, 3), np.float32)
    with pytest.raises(UserError, match="a serialized jax.export artifact can hold"):
        wj.export(_model(), x, tmp_path / "big.jaxexport", field_indices=FI[:3], bcs=BCS, n_steps=1)
    assert list(tmp_path.iterdir()) == []
