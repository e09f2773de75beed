"""Your own simulations as Well-format data: numpy arrays -> one HDF5 file, or a whole dataset
directory (`<root>/<name>/data/{train,valid,test}/<name>.hdf5` plus `<root>/<name>/stats.yaml`,
the layout the trainer's `data.root` expects).

Array layouts (float, finite; any float/int dtype, stored as float32):

    scalar field   (n_trajectories, n_time, *spatial)                   tensor rank 0
    vector field   (n_trajectories, n_time, *spatial, n_dims)           tensor rank 1
    rank-2 field   (n_trajectories, n_time, *spatial, n_dims, n_dims)   tensor rank 2
    constant field (n_trajectories, *spatial, ...) per trajectory, or (*spatial, ...) shared by all

Components are in axis order (the last axis of a vector field holds its x, y, z components),
and the spatial axes are named `dim_names` (default x, y, z), so a vector field `velocity` becomes
the channels velocity_x, velocity_y. Every input is checked before anything is written; a bad one
raises `DataError` naming the field, axis and shape and what was expected.

The command line (walrus_jax/data/from_arrays_cli.py) reads .npy / .npz files:

    python -m walrus_jax.data.from_arrays --root DIR --name my_flow \
        --field my_tracer=run.npz:c --vector velocity=run.npz:u --dt 0.1 --spacing 0.05 \
        --bc x=periodic --bc y=wall [--splits train=0.8,valid=0.1,test=0.1]
    python -m walrus_jax.data.from_arrays --file out.hdf5 --name my_flow --field u=u.npy --dt 0.1 ...
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Mapping, Sequence

import numpy as np

from walrus_jax.data.fields import RESERVED_FIELD_NAMES, flattened_names
from walrus_jax.data.writer import WellField, axis_boundaries
from walrus_jax.data.writer import write_well_file as _write_raw
from walrus_jax.errors import DataError, PathError, UserError

BC_NAMES = ("periodic", "wall", "open")
DEFAULT_DIM_NAMES = ("x", "y", "z")
SPLITS = ("train", "valid", "test")


# ----------------------------------------------------------------------------------- checks
def _field_spec(name: str, spec, what: str) -> tuple[np.ndarray, int]:
    """`array` (rank 0) or `(array, tensor_rank)` -> (array, rank), checking the name and rank."""
    if not isinstance(name, str) or not name or "/" in name or name != name.strip():
        raise DataError(f"{what} name {name!r}: expected a non-empty name without '/' or surrounding spaces")
    if name in RESERVED_FIELD_NAMES:
        raise DataError(f"{what} {name!r}: the name is reserved for the model's boundary channels "
                        f"{list(RESERVED_FIELD_NAMES)}; rename the field")
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise DataError(f"{what} {name!r}: expected an array or (array, tensor_rank), got a tuple of {len(spec)}")
        array, rank = spec
    else:
        array, rank = spec, 0
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank not in (0, 1, 2):
        raise DataError(f"{what} {name!r}: tensor rank {rank!r}; expected 0 (scalar), 1 (vector) or 2 (rank-2 tensor)")
    a = np.asarray(array)
    if a.dtype.kind not in "fiub":
        raise DataError(f"{what} {name!r}: dtype {a.dtype}; expected real numbers (float or int)")
    return a, int(rank)


def _check_finite(name: str, what: str, a32: np.ndarray, lead: Sequence[str]) -> None:
    if np.isfinite(a32).all():
        return
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a32))[0])
    where = ", ".join(f"{ax} {i}" for ax, i in zip(lead, bad))
    raise DataError(f"{what} {name!r}: NaN/Inf (after conversion to float32) at {where}, index {bad}")


def _check_components(name: str, what: str, a: np.ndarray, rank: int, n_dims: int) -> None:
    if rank and a.shape[a.ndim - rank:] != (n_dims,) * rank:
        kind = "vector" if rank == 1 else "rank-2"
        raise DataError(f"{what} {name!r}: a {kind} field on {n_dims} spatial axes needs its last {rank} axis"
                        f"{'es' if rank > 1 else ''} of size {n_dims} (one component per axis), got shape {a.shape}"
                        + ("; if it is a scalar field, give tensor rank 0" if rank == 1 else ""))


def _grid_coords(n_dims: int, spatial: tuple[int, ...], dim_names: Sequence[str], coords, spacing,
                 origin) -> dict[str, np.ndarray]:
    if (coords is None) == (spacing is None):
        raise DataError("grid: give exactly one of `spacing` (one float, or one per axis) and `coords` "
                        f"(one 1-D array per axis {list(dim_names)})")
    if coords is not None:
        if isinstance(coords, Mapping):
            unknown = [k for k in coords if k not in dim_names]
            missing = [d for d in dim_names if d not in coords]
            if unknown or missing:
                raise DataError(f"coords: keys {list(coords)}; expected exactly the axes {list(dim_names)}")
            coords = [coords[d] for d in dim_names]
        coords = list(coords)
        if len(coords) != n_dims:
            raise DataError(f"coords: {len(coords)} arrays for {n_dims} spatial axes {list(dim_names)}")
        out = {}
        for d, n, c in zip(dim_names, spatial, coords):
            c = np.asarray(c, np.float64)
            if c.shape != (n,):
                raise DataError(f"coords[{d!r}]: shape {c.shape}; expected ({n},), the size of axis {d} of the fields")
            if not np.isfinite(c).all() or (n > 1 and not (np.diff(c) > 0).all()):
                raise DataError(f"coords[{d!r}]: expected finite, strictly increasing values")
            out[d] = c
        return out
    h = np.broadcast_to(np.asarray(spacing, np.float64), (n_dims,)) if np.ndim(spacing) == 0 else \
        np.asarray(spacing, np.float64)
    if h.shape != (n_dims,):
        raise DataError(f"spacing: {np.shape(spacing)[0]} values for {n_dims} spatial axes {list(dim_names)}")
    o = np.broadcast_to(np.asarray(origin, np.float64), (n_dims,)) if np.ndim(origin) == 0 else \
        np.asarray(origin, np.float64)
    if o.shape != (n_dims,) or not np.isfinite(o).all():
        raise DataError(f"origin: {np.asarray(origin).tolist()}; expected one finite value or {n_dims}")
    for d, v in zip(dim_names, h):
        if not (np.isfinite(v) and v > 0):
            raise DataError(f"spacing along {d}: {v}; expected a positive number")
    return {d: o[i] + h[i] * np.arange(n) for i, (d, n) in enumerate(zip(dim_names, spatial))}


def _time(n_time: int, dt, time, t0: float) -> np.ndarray:
    if (dt is None) == (time is None):
        raise DataError("time: give exactly one of `dt` (the step between frames) and `time` (n_time values)")
    if time is not None:
        t = np.asarray(time, np.float64)
        if t.shape != (n_time,):
            raise DataError(f"time: shape {t.shape}; expected ({n_time},), one value per frame of the fields")
        if not np.isfinite(t).all() or not (np.diff(t) > 0).all():
            raise DataError("time: expected finite, strictly increasing values")
        return t
    try:
        dt = float(dt)
    except (TypeError, ValueError):
        raise DataError(f"dt: {dt!r}; expected a positive number") from None
    if not (np.isfinite(dt) and dt > 0):
        raise DataError(f"dt: {dt}; expected a positive number (the time between frames)")
    return float(t0) + dt * np.arange(n_time)


def _layout_hint(fields: Mapping, dim_names: Sequence[str]) -> str:
    """How the first field's shape was read (the cause when the boundary axes do not match the data):
    a field missing its trajectory axis reads as one spatial axis fewer, a vector given as a scalar
    as one more."""
    name, spec = next(iter(fields.items()))
    a, rank = _field_spec(name, spec, "field")
    read = ", ".join(["n_trajectories", "n_time", *dim_names] + ["n_dims"] * rank)
    hint = (f"; field {name!r} of shape {a.shape} (tensor rank {rank}) was read as ({read}), {len(dim_names)} "
            "spatial axes: a field needs (n_trajectories, n_time, *spatial, components)")
    if rank == 0 and a.shape[-1] in (2, 3) and len(dim_names) == a.shape[-1] + 1:
        hint += f"; if its last axis holds the {a.shape[-1]} components of a vector, give it as a vector " \
                "((array, 1), --vector)"
    return hint + "; a single trajectory needs its axis too (array[None])"


def _boundaries(boundary_conditions, dim_names: Sequence[str], spatial: tuple[int, ...], hint: str = "") -> dict:
    if not isinstance(boundary_conditions, Mapping):
        raise DataError(f"boundary_conditions: expected a mapping {{axis: 'periodic' | 'wall' | 'open' or "
                        f"(low, high)}} over the axes {list(dim_names)}")
    per_axis = {}
    for key, spec in boundary_conditions.items():
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and 0 <= key < len(dim_names):
            axis = dim_names[int(key)]
        elif key in dim_names:
            axis = key
        else:
            raise DataError(f"boundary_conditions: axis {key!r} is not one of {list(dim_names)} "
                            f"(or 0..{len(dim_names) - 1}){hint}")
        if axis in per_axis:
            raise DataError(f"boundary_conditions: axis {axis!r} given twice")
        pair = (spec, spec) if isinstance(spec, str) else tuple(spec) if isinstance(spec, (tuple, list)) else None
        if pair is None or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
            raise DataError(f"boundary_conditions[{axis!r}]: {spec!r}; expected one of {list(BC_NAMES)} "
                            "or a (low, high) pair of them")
        low, high = (s.strip().lower() for s in pair)
        for s in (low, high):
            if s not in BC_NAMES:
                raise DataError(f"boundary_conditions[{axis!r}]: unknown boundary condition {s!r}; "
                                f"expected one of {list(BC_NAMES)}")
        if (low == "periodic") != (high == "periodic"):
            raise DataError(f"boundary_conditions[{axis!r}]: ({low}, {high}); a periodic axis is periodic at both ends")
        per_axis[axis] = (low, high)
    missing = [d for d in dim_names if d not in per_axis]
    if missing:
        raise DataError(f"boundary_conditions: no entry for axes {missing}; every axis of {list(dim_names)} needs "
                        f"one{hint}")
    out = {}
    for d, n in zip(dim_names, spatial):
        out.update(axis_boundaries(d, n, *per_axis[d]))
    return out


def prepare_fields(fields: Mapping, constant_fields: Mapping | None = None, dim_names: Sequence[str] | None = None):
    """Checks the arrays and returns (WellField groups by rank, n_trajectories, n_time, spatial, dim_names).

    fields: {name: array or (array, tensor_rank)}, array (n_trajectories, n_time, *spatial, (n_dims,)*rank).
    constant_fields: same, array (n_trajectories, *spatial, ...) or (*spatial, ...).
    """
    if not isinstance(fields, Mapping) or not fields:
        raise DataError("fields: expected a non-empty mapping {name: array or (array, tensor_rank)}")
    checked = [(n, *_field_spec(n, s, "field")) for n, s in fields.items()]
    name0, a0, r0 = checked[0]
    n_dims = a0.ndim - 2 - r0
    if not 1 <= n_dims <= 3:
        raise DataError(f"field {name0!r}: shape {a0.shape} with tensor rank {r0}; expected (n_trajectories, n_time, "
                        "*spatial" + ", n_dims" * r0 + ") with 1 to 3 spatial axes")
    dim_names = tuple(dim_names) if dim_names is not None else DEFAULT_DIM_NAMES[:n_dims]
    if len(dim_names) != n_dims or len(set(dim_names)) != n_dims or not all(isinstance(d, str) and d for d in dim_names):
        raise DataError(f"dim_names {list(dim_names)}: expected {n_dims} distinct names, one per spatial axis "
                        f"(field {name0!r} has shape {a0.shape}, tensor rank {r0})")
    n_traj, n_time, spatial = a0.shape[0], a0.shape[1], a0.shape[2:2 + n_dims]
    if n_traj < 1 or n_time < 2 or min(spatial) < 1:
        raise DataError(f"field {name0!r}: shape {a0.shape}; expected at least 1 trajectory, 2 time steps and a "
                        "non-empty grid")
    lead_names = ("trajectory", "time step", *(f"{d}" for d in dim_names))
    groups: dict[int, dict[str, WellField]] = {0: {}, 1: {}, 2: {}}
    flat: dict[str, str] = {}

    def add(name, a, rank, what, **flags):
        for fl in flattened_names(name, rank, dim_names):
            if fl in flat:
                raise DataError(f"{what} {name!r}: its channel {fl!r} collides with {flat[fl]}; rename one")
            flat[fl] = f"{what} {name!r}"
        _check_components(name, what, a, rank, n_dims)
        with np.errstate(over="ignore"):  # values beyond float32 become Inf: reported just below
            a32 = a.astype(np.float32)
        _check_finite(name, what, a32, lead_names if flags.get("time_varying", True) else
                      (("trajectory",) if flags.get("sample_varying", True) else ()) + tuple(dim_names))
        groups[rank][name] = WellField(a32, **flags)

    for name, a, rank in checked:
        expected = (n_traj, n_time, *spatial) + (n_dims,) * rank
        if a.ndim != len(expected):
            raise DataError(f"field {name!r}: {a.ndim} axes with shape {a.shape}; a tensor-rank-{rank} field needs "
                            f"{len(expected)}: (n_trajectories, n_time, {', '.join(dim_names)}"
                            + ", n_dims" * rank + f") = {expected}")
        for i, (got, want) in enumerate(zip(a.shape[:2 + n_dims], expected)):
            if got != want:
                axis = lead_names[i]
                raise DataError(f"field {name!r}: axis {i} ({'n_trajectories' if i == 0 else 'n_time' if i == 1 else axis})"
                                f" has size {got}, but field {name0!r} has {want} (shape {a.shape}, expected "
                                f"{expected})")
        add(name, a, rank, "field")
    for name, spec in (constant_fields or {}).items():
        a, rank = _field_spec(name, spec, "constant field")
        shared = (*spatial, *(n_dims,) * rank)
        if a.shape == (n_traj, *shared):
            add(name, a, rank, "constant field", time_varying=False, sample_varying=True)
        elif a.shape == shared:
            add(name, a, rank, "constant field", time_varying=False, sample_varying=False)
        else:
            raise DataError(f"constant field {name!r}: shape {a.shape}; expected {(n_traj, *shared)} (one per "
                            f"trajectory) or {shared} (shared by all) for tensor rank {rank}")
    return groups, n_traj, n_time, tuple(spatial), dim_names


def _check_dataset_name(name) -> None:
    if not isinstance(name, str) or not name.strip() or "/" in name or os.sep in name or name.startswith("."):
        raise DataError(f"dataset_name {name!r}: expected a non-empty folder name (no '/', not starting with '.')")


# ----------------------------------------------------------------------------------- writing
def write_arrays(path, fields: Mapping, *, dataset_name: str, boundary_conditions: Mapping,
                    dt: float | None = None, time=None, t0: float = 0.0,
                    spacing=None, coords=None, origin=0.0, dim_names: Sequence[str] | None = None,
                    constant_fields: Mapping | None = None, parameters: Mapping[str, float] | None = None,
                    overwrite: bool = False) -> str:
    """Writes numpy arrays as one Well-format HDF5 file (read back by `WellDataset`). Returns the path.

    Args:
      path: the .hdf5/.h5 file to write (written to a temporary name, then renamed).
      fields: time-varying fields {name: array} (scalar) or {name: (array, tensor_rank)}; array
        (n_trajectories, n_time, *spatial) for rank 0, (..., n_dims) for 1, (..., n_dims, n_dims) for 2.
      dataset_name: recorded in the file (the trainer reports and groups data by it).
      boundary_conditions: {axis name or index: "periodic" | "wall" | "open" or (low, high)}, every axis.
      dt / time: the frame spacing (time = t0 + dt * arange(n_time)) or the (n_time,) frame times.
      spacing / coords: grid spacing (one float or one per axis; coords = origin + spacing * arange(N))
        or the coordinates, {axis name: (N,)} or one (N,) array per axis.
      dim_names: the spatial axis names (default x, y, z): they name the vector components.
      constant_fields: time-independent fields, array (n_trajectories, *spatial, ...) or (*spatial, ...).
      parameters: simulation parameters {name: float}, stored as attributes and constant scalars.
      overwrite: replace an existing file (otherwise an existing file is an error).
    Raises:
      DataError naming the field, axis, shape and what was expected; UserError if `path` exists.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path}: already exists (pass overwrite=True to replace it)")
    if not path.endswith((".hdf5", ".h5")):
        raise DataError(f"{path}: a Well file name ends in .hdf5 or .h5 (the reader looks for those)")
    _check_dataset_name(dataset_name)
    groups, n_traj, n_time, spatial, dims = prepare_fields(fields, constant_fields, dim_names)
    params = {}
    for k, v in (parameters or {}).items():
        try:
            params[str(k)] = float(v)
        except (TypeError, ValueError):
            raise DataError(f"parameters[{k!r}]: {v!r}; expected a number") from None
    return _write_raw(
        path, dataset_name=dataset_name, n_trajectories=n_traj,
        time=_time(n_time, dt, time, t0), coords=_grid_coords(len(dims), spatial, dims, coords, spacing, origin),
        t0_fields=groups[0], t1_fields=groups[1], t2_fields=groups[2],
        boundaries=_boundaries(boundary_conditions, dims, spatial, _layout_hint(fields, dims)),
        simulation_parameters=params,
        extra_attrs={"generator": "walrus_jax.data.from_arrays"})


def split_trajectories(n_trajectories: int, splits) -> dict[str, np.ndarray]:
    """{split: fraction} (e.g. train 0.8, valid 0.1, test 0.1; consecutive blocks of trajectories)
    or {split: trajectory indices} -> {split: indices}. Every named split gets at least one."""
    if not isinstance(splits, Mapping) or not splits:
        raise DataError(f"splits: expected a mapping over {list(SPLITS)}, got {splits!r}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"splits: unknown split names {unknown}; expected some of {list(SPLITS)}")
    if "train" not in splits:
        raise DataError("splits: a 'train' split is needed (the trainer and stats.yaml read it)")
    values = list(splits.values())
    if all(np.ndim(v) == 0 for v in values):
        frac = np.asarray(values, np.float64)
        if not np.isfinite(frac).all() or (frac <= 0).any():
            raise DataError(f"splits: fractions {dict(splits)}; expected positive numbers")
        if n_trajectories < len(frac):
            raise DataError(f"splits: {n_trajectories} trajectories cannot fill {len(frac)} splits {list(splits)} "
                            "(each needs at least one)")
        ends = np.round(np.cumsum(frac) / frac.sum() * n_trajectories).astype(int)
        # At least one trajectory per split, still ending at n_trajectories.
        for i in range(len(ends)):
            ends[i] = max(ends[i], (ends[i - 1] if i else 0) + 1)
        for i in range(len(ends) - 1, -1, -1):
            ends[i] = min(ends[i], n_trajectories - (len(ends) - 1 - i))
        starts = np.concatenate([[0], ends[:-1]])
        return {s: np.arange(a, b) for s, a, b in zip(splits, starts, ends)}
    out, seen = {}, {}
    for s, v in splits.items():
        idx = np.asarray(v).reshape(-1)
        if idx.size == 0 or idx.dtype.kind not in "iu" or (idx < 0).any() or (idx >= n_trajectories).any():
            raise DataError(f"splits[{s!r}]: {np.asarray(v).tolist()}; expected a non-empty list of trajectory "
                            f"indices in 0..{n_trajectories - 1}")
        for i in idx.tolist():
            if i in seen:
                raise DataError(f"splits: trajectory {i} is in both {seen[i]!r} and {s!r}")
            seen[i] = s
        out[s] = idx.astype(np.int64)
    return out


def dataset_dir(root, dataset_name: str) -> str:
    """`<root>/<dataset_name>`: the folder the trainer finds under `data.root`."""
    return os.path.join(os.fspath(root), dataset_name)


def write_dataset(root, dataset_name: str, fields: Mapping, *, splits=None,
                  constant_fields: Mapping | None = None, overwrite: bool = False, **file_kwargs) -> str:
    """Writes a dataset directory the trainer reads (set `data.root` to `root`):

        <root>/<dataset_name>/data/<split>/<dataset_name>.hdf5   one file per split
        <root>/<dataset_name>/stats.yaml                          statistics of the train split

    Args:
      fields, constant_fields: as `write_arrays`, with all trajectories; `splits` divides them.
      splits: {split: fraction (or weight)} or {split: list of trajectory indices}, among train / valid / test
        (default train 0.8, valid 0.1, test 0.1 of the trajectories, in order).
      overwrite: replace an existing dataset folder that write_dataset wrote (only its split files and
        stats.yaml inside; anything else there is refused, naming it); otherwise it is an error.
      file_kwargs: the other `write_arrays` arguments (boundary_conditions, dt, spacing, ...).
    Returns the dataset folder. It is assembled in a temporary folder and renamed into place, so
    a failure leaves nothing half-written.
    """
    from walrus_jax.data.stats import compute_stats

    _check_dataset_name(dataset_name)
    if os.path.exists(os.fspath(root)) and not os.path.isdir(os.fspath(root)):
        raise PathError(f"{os.fspath(root)}: is a file; the root of write_dataset is the folder that holds dataset "
                        "folders (the trainer's data.root)")
    final = dataset_dir(root, dataset_name)
    if os.path.exists(final) and not overwrite:
        raise UserError(f"{final}: already exists (pass overwrite=True to replace it)")
    if os.path.lexists(final):
        _check_replaceable(final, dataset_name)
    _, n_traj, _, spatial, _ = prepare_fields(fields, constant_fields, file_kwargs.get("dim_names"))
    parts = split_trajectories(n_traj, splits if splits is not None else {"train": 0.8, "valid": 0.1, "test": 0.1})
    os.makedirs(os.fspath(root), exist_ok=True)
    tmp = os.path.join(os.fspath(root), f".{dataset_name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split, idx in parts.items():
            sub = {n: (a[idx], r) for n, a, r in _items(fields)}
            # A constant field is per trajectory when it has one axis more than grid + components.
            sub_c = {n: (a[idx] if a.ndim == 1 + len(spatial) + r else a, r) for n, a, r in _items(constant_fields or {})}
            write_arrays(os.path.join(tmp, "data", split, f"{dataset_name}.hdf5"), sub,
                         dataset_name=dataset_name, constant_fields=sub_c, **file_kwargs)
        compute_stats(tmp, split="train")
        if os.path.exists(final):
            old = f"{tmp}-old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _written_files(dataset_name: str) -> set[str]:
    """Relative paths write_dataset may leave in a dataset folder."""
    return {"stats.yaml"} | {os.path.join("data", s, f"{dataset_name}.hdf5") for s in SPLITS}


def _check_replaceable(final: str, dataset_name: str) -> None:
    """overwrite=True replaces only what write_dataset wrote before: UserError naming anything else."""
    if not os.path.isdir(final) or os.path.islink(final):
        raise UserError(f"{final}: exists and is not a dataset folder (a file or link); overwrite=True replaces only "
                        "a dataset folder written by write_dataset")
    allowed = _written_files(dataset_name)
    foreign = []
    for d, _, files in os.walk(final):
        foreign += [os.path.relpath(os.path.join(d, f), final) for f in files
                    if os.path.relpath(os.path.join(d, f), final) not in allowed]
    if foreign:
        foreign.sort()
        raise UserError(f"{final}: holds {foreign[:3]}{' ...' if len(foreign) > 3 else ''}, which write_dataset did "
                        "not write; overwrite=True replaces only an earlier write_dataset output. Move those files "
                        "or choose another dataset name")


def _items(fields: Mapping):
    for name, spec in fields.items():
        a, rank = _field_spec(name, spec, "field")
        yield name, a, rank


if __name__ == "__main__":  # `python -m walrus_jax.data.from_arrays`, the command line of from_arrays_cli.py
    from walrus_jax.data.from_arrays_cli import main

    sys.exit(main())
