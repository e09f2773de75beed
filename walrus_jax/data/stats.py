"""Dataset statistics in the_well's `stats.yaml` format, and the per-channel reader the trainer uses.

    python -m walrus_jax.data.stats DATASET_DIR [--split train] [--out PATH] [--overwrite]

`DATASET_DIR/stats.yaml` holds six top-level keys, `mean`, `std`, `rms` and `mean_delta`,
`std_delta`, `rms_delta`, each mapping a field's name (as stored in the files: `velocity`, not
`velocity_x`) to a float for a scalar field, a list of n_dims floats for a vector field and an
n_dims x n_dims nested list for a rank-2 field. This follows the_well's `compute_statistics`:

* computed over the files of one split (`train`), as stored: every stored element counts once
  (a field stored without its trajectory axis is not repeated per trajectory);
* statistics per tensor component, over all other axes (trajectory, time, space);
* std is the population standard deviation (divide by N), rms = sqrt(mean of squares);
* deltas are one-step differences u(t+1) - u(t) along the time axis, within each trajectory, for
  time-varying fields only (constant fields have no `*_delta` entries).

Differences from the_well's script: values are written at full float64 precision (the_well rounds
to 5 significant digits), a field with a tiny std is reported as a warning instead of an error,
and the three astrophysics datasets that the_well log10-transforms are not special-cased.
Files are read one trajectory (and time slab) at a time with float64 accumulators, so memory stays
bounded by one slab whatever the dataset size; the file is written to a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import warnings
from typing import Mapping, Sequence

import h5py
import numpy as np
import yaml

from walrus_jax.data import filesystem as fsys
from walrus_jax.data.fields import flattened_names
from walrus_jax.data.well import FIELD_GROUPS, WellFormatError, inspect_file
from walrus_jax.errors import DataError, PathError, UserError, run_command, verbose_requested

STAT_KEYS = ("mean", "std", "rms", "mean_delta", "std_delta", "rms_delta")
SLAB_ELEMENTS = 1 << 24  # values read per slab (128 MiB in float64)


class _Moments:
    """Streaming per-component count, mean and sum of squared deviations (Chan et al.'s update)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray, order: int) -> None:
        """x: (..., (n_dims,) * order) float64; reduces every axis except the last `order`."""
        axes = tuple(range(x.ndim - order))
        nb = int(np.prod([x.shape[a] for a in axes]))
        if nb == 0:
            return
        mb = x.mean(axis=axes)
        m2b = ((x - mb) ** 2).sum(axis=axes)
        n = self.n + nb
        d = mb - self.mean
        self.mean = self.mean + d * (nb / n)
        self.m2 = self.m2 + m2b + d ** 2 * (self.n * nb / n)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        var = np.maximum(self.m2 / self.n, 0.0)
        return np.asarray(self.mean), np.sqrt(var), np.sqrt(var + np.asarray(self.mean) ** 2)


def split_files(dataset_dir, split: str = "train") -> list[str]:
    """The .hdf5/.h5 files of `dataset_dir/data/<split>`, sorted (a clear PathError otherwise)."""
    dataset_dir = os.fspath(dataset_dir)
    if not os.path.isdir(dataset_dir):
        raise PathError(f"{dataset_dir}: no such directory (expected a dataset folder holding data/{split}/*.hdf5)")
    folder = os.path.join(dataset_dir, "data", split)
    if not os.path.isdir(folder):
        raise PathError(f"{dataset_dir}: no data/{split} folder (a dataset folder holds data/{{train,valid,test}}/"
                        "*.hdf5)")
    files = sorted(glob.glob(os.path.join(folder, "*.hdf5")) + glob.glob(os.path.join(folder, "*.h5")))
    if not files:
        raise PathError(f"{folder}: no .hdf5/.h5 files")
    return files


def _slabs(ds: h5py.Dataset, sample_varying: bool, time_varying: bool):
    """Yields (array float64, more, trajectory, first step) pieces of one stored field.

    Time-varying data come in time slabs; `more` says the slab's last frame is also the first of
    the next slab (it is there for the delta across the two, and counted in the next slab)."""
    n_traj = ds.shape[0] if sample_varying else 1
    for j in range(n_traj):
        if not time_varying:
            yield np.asarray(ds[j] if sample_varying else ds[()], np.float64), False, j, None
            continue
        n_t = ds.shape[1 if sample_varying else 0]
        frame = int(np.prod(ds.shape[2 if sample_varying else 1:]))
        step = max(1, SLAB_ELEMENTS // max(frame, 1) - 1)
        start = 0
        while True:
            stop = min(n_t, start + step + 1)
            sl = (j, slice(start, stop)) if sample_varying else (slice(start, stop),)
            yield np.asarray(ds[sl], np.float64), stop < n_t, j, start
            if stop >= n_t:
                break
            start = stop - 1


def compute_stats(dataset_dir, split: str = "train", out: str | None = None, overwrite: bool = True) -> dict:
    """Computes the_well-style statistics of `dataset_dir/data/<split>` and writes them to `out`
    (default `dataset_dir/stats.yaml`; `out=""` writes nothing). Returns the stats dict.

    Raises PathError for a missing folder/files, DataError for an invalid Well file or NaN/Inf
    (naming file, field and trajectory), UserError if `out` exists and overwrite is False.
    """
    from walrus_jax.data import filesystem

    if filesystem.is_remote(dataset_dir):
        raise PathError(f"{dataset_dir}: a URL; statistics are computed from a local dataset folder (they are "
                        "written beside it as stats.yaml): run this where the files are, or on a local copy, and "
                        "put stats.yaml beside the data on the server")
    files = split_files(dataset_dir, split)
    out = os.path.join(os.fspath(dataset_dir), "stats.yaml") if out is None else out
    if out and os.path.exists(out) and not overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    fields: dict[str, tuple[int, bool]] = {}  # name -> (order, time_varying)
    mom: dict[str, _Moments] = {}
    mom_d: dict[str, _Moments] = {}
    for path in files:
        try:
            info = inspect_file(path)
        except WellFormatError as e:
            raise DataError(str(e)) from None
        with h5py.File(path, "r") as f:
            for fld in info["fields"]:
                prev = fields.setdefault(fld.name, (fld.order, fld.time_varying))
                if prev != (fld.order, fld.time_varying):
                    raise DataError(f"{path}: field {fld.name!r} has tensor order {fld.order}, time_varying "
                                    f"{fld.time_varying}, unlike the split's earlier files ({prev[0]}, {prev[1]})")
                ds = f[f"{FIELD_GROUPS[fld.order]}/{fld.name}"]
                for x, more, j, start in _slabs(ds, fld.sample_varying, fld.time_varying):
                    if not np.isfinite(x).all():
                        bad = [int(i) for i in np.argwhere(~np.isfinite(x))[0]]
                        where = (f"trajectory {j}" if fld.sample_varying else "") + \
                            (f" time step {start + bad.pop(0)}" if start is not None else "")
                        raise DataError(f"{path}: field {fld.name!r} holds NaN/Inf at {where.strip()} position {tuple(bad)}")
                    mom.setdefault(fld.name, _Moments()).add(x[:-1] if more else x, fld.order)
                    if fld.time_varying and x.shape[0] > 1:
                        mom_d.setdefault(fld.name, _Moments()).add(np.diff(x, axis=0), fld.order)
    stats: dict[str, dict] = {k: {} for k in STAT_KEYS}
    for name in fields:
        for suffix, table in (("", mom), ("_delta", mom_d)):
            if name not in table:
                continue
            mean, std, rms = table[name].result()
            if (std < 1e-4).any():
                warnings.warn(f"{dataset_dir}: field {name!r} has {'delta ' if suffix else ''}std {std.tolist()} "
                              "(below 1e-4): normalizing by it amplifies noise", stacklevel=2)
            stats["mean" + suffix][name] = _to_yaml(mean)
            stats["std" + suffix][name] = _to_yaml(std)
            stats["rms" + suffix][name] = _to_yaml(rms)
    if out:
        tmp = f"{out}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as fh:
                yaml.safe_dump(stats, fh, sort_keys=False)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return stats


def _to_yaml(v: np.ndarray):
    v = np.asarray(v, np.float64)
    return float(v) if v.ndim == 0 else v.tolist()


# ----------------------------------------------------------------------------------- reading
def _stats_path(path) -> tuple[str, str | None]:
    path = os.fspath(path)
    if fsys.is_remote(path) and path.endswith((".yaml", ".yml")):  # a file URL: no directory check
        return path, fsys.dirname(path)
    if fsys.isdir(path):
        return fsys.join(path, "stats.yaml"), path
    return path, fsys.dirname(path)


def _dim_names(dataset_dir: str | None) -> tuple[str, ...] | None:
    """The spatial axis names of the dataset's files (they name vector components), if any file is there."""
    if not dataset_dir:
        return None
    for split in ("train", "valid", "test"):
        folder = fsys.join(dataset_dir, "data", split)
        files = fsys.list_files(folder) if fsys.isdir(folder) else []
        if files:
            try:
                return tuple(inspect_file(files[0])["spatial_dims"])
            except WellFormatError as e:
                raise DataError(str(e)) from None
    return None


def load_stats(path, field_names: Sequence[str], *, keys: Sequence[str] = ("rms", "rms_delta"),
               padded_field_mask: Sequence[bool] | None = None,
               dim_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per-channel statistics from a stats.yaml, in the order of a sample's flattened channels.

    Args:
      path: a dataset folder (reads `<path>/stats.yaml`) or the stats.yaml file itself.
      field_names: C flattened channel names, as in a sample's `field_names` (`pressure`,
        `velocity_x`, `D_xy`, ...); a vector/tensor entry of stats.yaml gives its components in
        the files' axis order (`dim_names`: read from the dataset's files, else x, y, z).
      keys: which statistics to return (any of mean, std, rms and the *_delta ones).
      padded_field_mask: (C,) or (C_var,) bool, False on components added by 2D -> 3D inflation.
        Without it, such components are recognized by name (velocity_z, D_xz, ... of a field that
        stats.yaml holds with 2 components on axes x, y). Their statistics are 0, so a
        normalization floors them at its eps (as the original does for padded fields).
    Returns:
      {key: float32 (C,)}. A channel named `zeros_like_<field>` (the release's zeroed density) is 0;
      a `*_delta` key is 0 for a field without deltas in stats.yaml (a constant field: it never
      enters the delta normalization).
    Raises:
      PathError if stats.yaml is missing, DataError naming the key or channel that is not in it.
    """
    stats_file, dataset_dir = _stats_path(path)
    if not fsys.isfile(stats_file):
        raise PathError(f"{stats_file}: no such file (compute it with `python -m walrus_jax.data.stats "
                        f"{dataset_dir or '<dataset folder>'}`)")
    try:
        with fsys.open_text(stats_file) as fh:
            stats = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        raise DataError(f"{stats_file}: not valid YAML ({e})") from None
    if not isinstance(stats, Mapping):
        raise DataError(f"{stats_file}: expected a mapping with keys {list(STAT_KEYS)}")
    field_names = [str(n) for n in field_names]
    if padded_field_mask is None:
        padded = [False] * len(field_names)
    else:
        mask = np.asarray(padded_field_mask, bool).reshape(-1)
        padded = [not m for m in mask] + [False] * (len(field_names) - len(mask))
        if len(mask) > len(field_names):
            raise DataError(f"padded_field_mask has {len(mask)} entries for {len(field_names)} field names")
    dims = tuple(dim_names) if dim_names is not None else _dim_names(dataset_dir)
    out = {}
    for key in keys:
        if key not in STAT_KEYS:
            raise DataError(f"load_stats: unknown statistic {key!r}; expected one of {list(STAT_KEYS)}")
        table = stats.get(key)
        if not isinstance(table, Mapping):
            raise DataError(f"{stats_file}: missing top-level key {key!r} (found {sorted(stats)})")
        channels = _channel_table(table, dims, f"{stats_file}: {key}")
        # Every field is in the value statistics; the *_delta ones lack the constant fields.
        every = _component_names(stats.get(key[:-6] if key.endswith("_delta") else key) or {}, dims)
        known = {fl for _, comps in every for fl in comps}
        inflated = _inflated_names(every, dims)
        vals = []
        for name, pad in zip(field_names, padded):
            if pad or name.startswith("zeros_like_") or name in inflated:
                vals.append(0.0)
            elif name in channels:
                vals.append(channels[name])
            elif key.endswith("_delta") and name in known:
                vals.append(0.0)  # a field of stats.yaml without deltas: a constant field
            else:
                raise DataError(f"{stats_file}: {key} has no entry for channel {name!r} (its fields: "
                                f"{sorted(table)}; channels {sorted(channels)}). Recompute it with "
                                "`python -m walrus_jax.data.stats` or check the field name")
        out[key] = np.asarray(vals, np.float32)
    return out


def _component_names(table: Mapping, dims) -> list[tuple[str, list[str]]]:
    out = []
    for core, v in table.items():
        a = np.asarray(v, np.float64)
        if a.ndim > 2 or (a.ndim == 2 and a.shape[0] != a.shape[1]):
            raise DataError(f"stats entry {core!r}: shape {a.shape}; expected a number, a list or a square nested list")
        n = a.shape[0] if a.ndim else 0
        names = dims if dims is not None and len(dims) == n else ("x", "y", "z")[:n]
        out.append((str(core), flattened_names(str(core), a.ndim, names)))
    return out


def _inflated_names(components: list[tuple[str, list[str]]], dims) -> set[str]:
    """Channel names that 2D -> 3D inflation adds to the fields of a dataset on axes x, y."""
    xyz = ("x", "y", "z")
    out = set()
    if dims is not None and tuple(dims) != xyz[:len(dims)]:
        return out  # not cartesian x, y: never inflated
    for core, comps in components:
        order = 0 if comps == [core] else len(comps[0]) - len(core) - 1
        if order and len(comps) < 3 ** order:
            out.update(set(flattened_names(core, order, xyz)) - set(comps))
    return out


def _channel_table(table: Mapping, dims, where: str) -> dict[str, float]:
    """{core: value | [values] | [[values]]} -> {flattened channel name: value}."""
    out = {}
    for core, names in _component_names(table, dims):
        try:
            vals = np.asarray(table[core], np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"{where}: entry {core!r} = {table[core]!r} is not numeric") from None
        for n, v in zip(names, vals):
            out[n] = float(v)
    return out


# ----------------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, as for every other user mistake
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    ap = _Parser(prog="python -m walrus_jax.data.stats",
                 description="Compute the_well-style stats.yaml (mean/std/rms, and of one-step deltas) of a dataset.")
    ap.add_argument("dataset_dir", help="dataset folder holding data/<split>/*.hdf5")
    ap.add_argument("--split", default="train", help="split to compute over (default train, as the_well)")
    ap.add_argument("--out", help="output file (default DATASET_DIR/stats.yaml)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing stats file")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(args.dataset_dir, "stats.yaml")

    def job():
        stats = compute_stats(args.dataset_dir, split=args.split, out=out, overwrite=args.overwrite)
        print(f"wrote {out}: {len(stats['mean'])} fields ({', '.join(stats['mean'])}) over data/{args.split}")

    # A mistake (missing folder, bad file, NaN) or a full disk: one `error:` line, exit status 2.
    return run_command(job, args.verbose or verbose_requested())


if __name__ == "__main__":
    sys.exit(main())
