"""Writes Well-format HDF5 files (the_well's docs/data_format.md), used by miniwell and tests.

The writer stores what it is given (the reader validates); it writes to a temporary file and
renames it, so a failure never leaves a half-written file under the final name.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import h5py
import numpy as np


@dataclasses.dataclass
class WellField:
    """One field. data: (B?) (T?) *spatial_stored (n,)*order, with the leading axes present iff
    sample_varying / time_varying; dim_varying[i] False stores axis i with size 1."""

    data: np.ndarray
    time_varying: bool = True
    sample_varying: bool = True
    dim_varying: Sequence[bool] | None = None  # default: every spatial axis varies
    symmetric: bool = False
    antisymmetric: bool = False


@dataclasses.dataclass
class WellScalar:
    """A non-spatial value: data (B?) (T?) as flagged; () or (1,) when constant."""

    data: np.ndarray
    time_varying: bool = False
    sample_varying: bool = False


@dataclasses.dataclass
class WellBoundary:
    """A boundary-condition group: `mask` (bool, over `associated_dims`) is True where it applies."""

    bc_type: str  # "WALL" | "OPEN" | "PERIODIC"
    associated_dims: Sequence[str]
    mask: np.ndarray
    values: np.ndarray | None = None
    associated_fields: Sequence[str] = ()


def axis_boundaries(dim: str, n: int, low: str, high: str) -> dict[str, WellBoundary]:
    """The usual axis-aligned groups for one axis: periodic as one group, otherwise one per face."""
    if low.upper() == "PERIODIC" or high.upper() == "PERIODIC":
        if low.upper() != high.upper():
            raise ValueError(f"axis {dim}: a periodic axis must be periodic at both ends, got {low}/{high}")
        m = np.zeros(n, bool)
        m[[0, -1]] = True
        return {f"{dim}_periodic": WellBoundary("PERIODIC", [dim], m)}
    lo = np.zeros(n, bool)
    lo[0] = True
    hi = np.zeros(n, bool)
    hi[-1] = True
    if low.upper() == high.upper():
        return {f"{dim}_{low.lower()}": WellBoundary(low.upper(), [dim], lo | hi)}
    return {f"{dim}_low_{low.lower()}": WellBoundary(low.upper(), [dim], lo),
            f"{dim}_high_{high.lower()}": WellBoundary(high.upper(), [dim], hi)}


def _str_list(values) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=h5py.string_dtype())


def write_well_file(
    path: str | os.PathLike,
    *,
    dataset_name: str,
    n_trajectories: int,
    time: np.ndarray,
    coords: Mapping[str, np.ndarray],
    t0_fields: Mapping[str, WellField] | None = None,
    t1_fields: Mapping[str, WellField] | None = None,
    t2_fields: Mapping[str, WellField] | None = None,
    boundaries: Mapping[str, WellBoundary] | None = None,
    scalars: Mapping[str, WellScalar] | None = None,
    simulation_parameters: Mapping[str, float] | None = None,
    grid_type: str = "cartesian",
    time_sample_varying: bool = False,
    coords_sample_varying: bool = False,
    extra_attrs: Mapping[str, object] | None = None,
) -> str:
    """Writes one Well file. coords: ordered {dim name: (N,) or (B, N)}; time (T,) or (B, T)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    params = dict(simulation_parameters or {})
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["dataset_name"] = dataset_name
            f.attrs["grid_type"] = grid_type
            f.attrs["n_spatial_dims"] = len(coords)
            f.attrs["n_trajectories"] = int(n_trajectories)
            f.attrs["simulation_parameters"] = _str_list(params)
            for k, v in params.items():
                f.attrs[k] = v
            for k, v in (extra_attrs or {}).items():
                f.attrs[k] = v
            dims = f.create_group("dimensions")
            dims.attrs["spatial_dims"] = _str_list(coords)
            t = dims.create_dataset("time", data=np.asarray(time, np.float32))
            t.attrs["sample_varying"] = bool(time_sample_varying)
            for name, c in coords.items():
                d = dims.create_dataset(name, data=np.asarray(c, np.float32))
                d.attrs["sample_varying"] = bool(coords_sample_varying)
                d.attrs["time_varying"] = False
            bcg = f.create_group("boundary_conditions")
            for name, b in (boundaries or {}).items():
                g = bcg.create_group(name)
                g.attrs["bc_type"] = b.bc_type
                g.attrs["associated_dims"] = _str_list(b.associated_dims)
                g.attrs["associated_fields"] = _str_list(b.associated_fields)
                g.attrs["sample_varying"] = False
                g.attrs["time_varying"] = False
                g.create_dataset("mask", data=np.asarray(b.mask, bool))
                vals = b.values if b.values is not None else np.zeros(int(np.asarray(b.mask).sum()), np.float32)
                g.create_dataset("values", data=np.asarray(vals, np.float32))
            sg = f.create_group("scalars")
            all_scalars = {k: WellScalar(np.asarray([v], np.float32)) for k, v in params.items()}
            all_scalars.update(scalars or {})
            sg.attrs["field_names"] = _str_list(all_scalars)
            for name, s in all_scalars.items():
                d = sg.create_dataset(name, data=np.asarray(s.data, np.float32))
                d.attrs["sample_varying"] = bool(s.sample_varying)
                d.attrs["time_varying"] = bool(s.time_varying)
            for group, fields in (("t0_fields", t0_fields), ("t1_fields", t1_fields), ("t2_fields", t2_fields)):
                g = f.create_group(group)
                fields = fields or {}
                g.attrs["field_names"] = _str_list(fields)
                for name, fld in fields.items():
                    d = g.create_dataset(name, data=np.asarray(fld.data, np.float32))
                    dv = fld.dim_varying if fld.dim_varying is not None else [True] * len(coords)
                    d.attrs["dim_varying"] = np.asarray(dv, bool)
                    d.attrs["sample_varying"] = bool(fld.sample_varying)
                    d.attrs["time_varying"] = bool(fld.time_varying)
                    if group == "t2_fields":
                        d.attrs["symmetric"] = bool(fld.symmetric)
                        d.attrs["antisymmetric"] = bool(fld.antisymmetric)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
