"""Strict JSON files: NaN / Inf become null (strict parsers reject the NaN / Infinity tokens that
Python's json writes by default), numpy values become Python ones, and files are written to a
temporary name and renamed, so a reader never sees half a file."""
from __future__ import annotations

import json
import os

import numpy as np


def json_safe(obj):
    """obj with every NaN/Inf float as None and numpy scalars/arrays as Python values (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_json(path: str, obj) -> None:
    """Strict JSON (non-finite floats -> null), written to a temporary file and renamed."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def dumps(obj) -> str:
    """One strict-JSON line (metrics.jsonl)."""
    return json.dumps(json_safe(obj), allow_nan=False)
