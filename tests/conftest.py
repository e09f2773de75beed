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
    config.addinivalue_line("markers", "slow: long-running test (run with -m slow)")


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
