"""Shared test helpers: oracle loading, layout conversion, cached models."""
from __future__ import annotations

import functools
import json
import os
import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles TPU programs on this CPU (~13 minutes in all); "
                                       "-m 'not slow' leaves them out")


@functools.lru_cache(maxsize=None)
def oracle(name: str) -> dict:
    with np.load(FIXTURES / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def oracle_meta(name: str) -> dict:
    return json.loads(str(oracle(name)["config_json"]))


@functools.lru_cache(maxsize=None)
def small_weights() -> dict:
    with np.load(FIXTURES / "weights_small.npz") as f:
        return {k: f[k] for k in f.files}


def to_well(x: np.ndarray) -> np.ndarray:
    """Model layout (T, B, C, *spatial) -> Well layout (B, T, *spatial, C)."""
    return np.moveaxis(np.moveaxis(x, 2, -1), 0, 1)


def from_well(y) -> np.ndarray:
    """Well layout (B, T, *spatial, C) -> model layout (T, B, C, *spatial)."""
    return np.moveaxis(np.moveaxis(np.asarray(y), -1, 2), 1, 0)


def rel_err(a, b) -> float:
    """Max abs error relative to the reference's max abs value."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def write_test_dataset(root, name: str, shape: tuple, *, n_files: int = 1, n_traj: int = 2, n_steps: int = 14,
                       bcs=None, seed: int = 0) -> str:
    """A small random Well dataset <root>/<name>/data/train/ (pressure + velocity on `shape`),
    in `n_files` files; bcs: per axis (low, high) names, default periodic. Returns <root>/<name>."""
    from walrus_jax.data.writer import WellField, axis_boundaries, write_well_file

    rng = np.random.default_rng(seed)
    dims = "xyz"[:len(shape)]
    bnd = {}
    for d, n, (lo, hi) in zip(dims, shape, bcs or [("PERIODIC", "PERIODIC")] * len(shape)):
        bnd.update(axis_boundaries(d, n, lo, hi))
    for i in range(n_files):
        fname = f"{name}.hdf5" if n_files == 1 else f"{name}_{i}.hdf5"
        write_well_file(os.path.join(root, name, "data", "train", fname), dataset_name=name,
                        n_trajectories=n_traj, time=np.arange(n_steps) * 0.1,
                        coords={d: np.linspace(0, 1, n) for d, n in zip(dims, shape)},
                        t0_fields={"pressure": WellField(rng.normal(size=(n_traj, n_steps) + shape))},
                        t1_fields={"velocity": WellField(rng.normal(size=(n_traj, n_steps) + shape
                                                                     + (len(shape),)))},
                        boundaries=bnd)
    return os.path.join(root, name)


def execute_notebook(path: str, tmp_path, monkeypatch, work) -> tuple:
    """Runs a colab notebook offline on its tiny configuration, without walrus.pt, with its work
    folder at `work` (never inside the repository). Returns (executed notebook, its printed text)."""
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("torch")
    import nbformat

    repo = str(pathlib.Path(__file__).parent.parent)
    monkeypatch.setenv("WALRUS_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("WALRUS_WORK", str(work))
    monkeypatch.setenv("WALRUS_PT", str(tmp_path / "absent" / "walrus.pt"))
    monkeypatch.setenv("WALRUS_JAX_REPO", repo)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    return nb, text
