"""Shared test helpers: oracle loading, layout conversion, small Well datasets, the main command line."""
from __future__ import annotations

import functools
import json
import os

# The tests compute on the CPU. Without this, JAX would try the TPU plugin at start-up (libtpu is
# installed for the TPU-compile tests) and hold its one-process lock; `topologies.get_topology_desc`
# loads the plugin on demand for the tests that compile TPU programs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu admits one process per machine unless told otherwise; these tests only compile for TPUs
# (compile-only devices), which two test workers may do at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
import pathlib
import subprocess
import sys

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REPO = str(pathlib.Path(__file__).resolve().parents[1])
TINY = os.path.join(REPO, "configs", "tiny.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the full tier only (TPU compiles, end-to-end runs, notebooks, "
                                       "large parametrizations); -m 'not slow' is the quick tier")


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


def subprocess_env(n_devices: int | None = None, cache=None) -> dict:
    """The environment of a `python -m ...` test subprocess: this checkout first on the path, JAX on
    the CPU, errors not verbose; `n_devices` fake CPU devices; `cache`: JAX's persistent compilation
    cache in that folder (runs that compile the same step share it)."""
    from walrus_jax import errors

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env.pop(errors.VERBOSE_ENV, None)
    if n_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def main_command(workdir, data=None, overrides=(), config: str = TINY) -> list[str]:
    """`python -m walrus_jax.main --config <config> --workdir <workdir> [--config.data.root=<data>]
    --config.<override> ...` as an argv list."""
    cmd = [sys.executable, "-m", "walrus_jax.main", "--config", config, "--workdir", str(workdir)]
    if data is not None:
        cmd.append(f"--config.data.root={data}")
    return cmd + [f"--config.{o}" for o in overrides]


@pytest.fixture(scope="session")
def gray_scott(tmp_path_factory) -> str:
    """The miniwell's Gray-Scott system, quick size, generated once per test session: its root."""
    out = tmp_path_factory.mktemp("miniwell")
    subprocess.run([sys.executable, "-m", "walrus_jax.data.miniwell", "--out", str(out), "--quick",
                    "--systems", "gray_scott"], check=True, capture_output=True, env=subprocess_env(), cwd=REPO)
    return str(out)
