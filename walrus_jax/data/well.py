"""Reader for The Well's HDF5 format (the_well's docs/data_format.md and `the_well.data.WellDataset`).

Index semantics follow the_well exactly: files sorted by path, then trajectories, then start times;
a trajectory of T steps holds T - (1 + min_dt_stride * (T_in + T_out - 1)) + 1 windows. Fields
are read one file open per read (nothing large is cached, so memory stays flat), broadcast over
the axes their `sample_varying` / `time_varying` / `dim_varying` flags say are not stored, and
flattened into channels (t0 fields, then t1, then t2, components row-major over the spatial axes).
Boundary conditions are reduced to (n_dims, 2) codes as the_well's "padding" mode does: every axis
starts OPEN; each group sets a face to its type if any point of that face is in its mask (WALL
only if the whole face is).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Mapping, Sequence

import h5py
import numpy as np

from walrus_jax.data import filesystem as fsys
from walrus_jax.data import transforms
from walrus_jax.data.fields import FieldVocabulary, flattened_names, normalize_field_transforms
from walrus_jax.errors import DataError, PathError
from walrus_jax.models.config import OPEN, PERIODIC, WALL

BC_CODES = {"WALL": WALL, "OPEN": OPEN, "PERIODIC": PERIODIC}
FIELD_GROUPS = ("t0_fields", "t1_fields", "t2_fields")
REQUIRED_ROOT_ATTRS = ("dataset_name", "grid_type", "n_spatial_dims", "n_trajectories")
REQUIRED_GROUPS = ("dimensions", "boundary_conditions", "scalars", *FIELD_GROUPS)


class WellFormatError(DataError):
    """A Well file (or a set of them) does not follow the format; the message names file and key."""


# ----------------------------------------------------------------------------------- metadata
@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str  # name in the file (core name, before flattening)
    order: int  # tensor order: 0 (t0_fields), 1, 2
    time_varying: bool
    sample_varying: bool
    dim_varying: tuple[bool, ...]


@dataclasses.dataclass(frozen=True)
class ScalarInfo:
    name: str
    time_varying: bool
    sample_varying: bool


@dataclasses.dataclass(frozen=True)
class FileInfo:
    path: str
    n_trajectories: int
    n_steps: int
    boundary_conditions: np.ndarray  # (n_dims, 2) int64


@dataclasses.dataclass
class WellMetadata:
    """Dataset-level description (the_well's WellMetadata plus the raw dimension names)."""

    dataset_name: str
    n_spatial_dims: int
    spatial_resolution: tuple[int, ...]
    spatial_dims: tuple[str, ...]
    grid_type: str
    field_names: dict[int, list[str]]  # variable fields by tensor order, flattened, as in the file
    constant_field_names: dict[int, list[str]]
    scalar_names: list[str]
    constant_scalar_names: list[str]
    boundary_condition_types: list[str]
    n_files: int
    n_trajectories_per_file: list[int]
    n_steps_per_trajectory: list[int]

    @property
    def n_fields(self) -> int:
        return sum(map(len, self.field_names.values()))

    @property
    def n_constant_fields(self) -> int:
        return sum(map(len, self.constant_field_names.values()))


def _s(v) -> str:
    return v.decode() if isinstance(v, (bytes, np.bytes_)) else str(v)


def _strs(v) -> list[str]:
    if isinstance(v, (str, bytes, np.bytes_)):
        return [_s(v)]
    return [_s(x) for x in np.asarray(v).reshape(-1)]


def _attr(obj, key: str, where: str):
    if key not in obj.attrs:
        raise WellFormatError(f"{where}: missing attribute '{key}'")
    return obj.attrs[key]


def _flag(obj, key: str, where: str) -> bool:
    return bool(np.asarray(_attr(obj, key, where)).reshape(-1)[0])


def reduce_boundary_conditions(f: h5py.File, spatial_dims: Sequence[str], where: str) -> np.ndarray:
    """the_well's padding-mode reduction of the boundary_conditions groups to (n_dims, 2) codes."""
    out = np.full((len(spatial_dims), 2), OPEN, np.int64)
    index = {d: i for i, d in enumerate(spatial_dims)}
    grp = f["boundary_conditions"]
    for name in grp.keys():  # h5py's (name) order, as the_well iterates
        bc = grp[name]
        w = f"{where}: boundary_conditions/{name}"
        bc_type = _s(_attr(bc, "bc_type", w)).upper()
        if bc_type not in BC_CODES:
            raise WellFormatError(f"{w}: bc_type {bc_type!r} is not one of {sorted(BC_CODES)}")
        dims = _strs(_attr(bc, "associated_dims", w))
        unknown = [d for d in dims if d not in index]
        if unknown:
            raise WellFormatError(f"{w}: associated_dims {dims} name {unknown}, not in spatial_dims {list(spatial_dims)}")
        if "mask" not in bc:
            raise WellFormatError(f"{w}: missing dataset 'mask'")
        mask = np.asarray(bc["mask"][()], bool)
        if mask.ndim != len(dims):
            raise WellFormatError(f"{w}: mask has shape {mask.shape}; expected one axis per associated dim {dims}")
        agg = np.min if bc_type == "WALL" else np.max
        for a, d in enumerate(dims):
            first = tuple(0 if b == a else slice(None) for b in range(len(dims)))
            last = tuple(-1 if b == a else slice(None) for b in range(len(dims)))
            if agg(mask[first]):
                out[index[d], 0] = BC_CODES[bc_type]
            if agg(mask[last]):
                out[index[d], 1] = BC_CODES[bc_type]
    return out


def inspect_file(path: str) -> dict:
    """Reads and validates one file's structure (no field values). Raises WellFormatError."""
    if not fsys.is_remote(path):
        if not os.path.isfile(path):
            raise WellFormatError(f"{path}: no such file")
        if not h5py.is_hdf5(path):
            raise WellFormatError(f"{path}: not an HDF5 file")
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(fsys.open_h5(path))
        except PathError:
            raise  # a missing remote object or refused credentials: the message names the URL
        except DataError as e:
            raise WellFormatError(str(e)) from None
        except OSError as e:
            raise WellFormatError(f"{path}: cannot be opened as HDF5 ({e})") from None
        for key in REQUIRED_ROOT_ATTRS:
            _attr(f, key, path)
        for g in REQUIRED_GROUPS:
            if g not in f:
                raise WellFormatError(f"{path}: missing group '{g}' (a Well file has {list(REQUIRED_GROUPS)})")
        n_dims = int(np.asarray(f.attrs["n_spatial_dims"]).reshape(-1)[0])
        n_traj = int(np.asarray(f.attrs["n_trajectories"]).reshape(-1)[0])
        dims_g = f["dimensions"]
        spatial_dims = _strs(_attr(dims_g, "spatial_dims", f"{path}: dimensions"))
        if len(spatial_dims) != n_dims:
            raise WellFormatError(f"{path}: dimensions.spatial_dims {spatial_dims} has {len(spatial_dims)} names but "
                                  f"n_spatial_dims = {n_dims}")
        for d in ["time", *spatial_dims]:
            if d not in dims_g:
                raise WellFormatError(f"{path}: missing dataset 'dimensions/{d}'")
        time = dims_g["time"]
        t_sv = _flag(time, "sample_varying", f"{path}: dimensions/time")
        if time.ndim != 1 + t_sv or (t_sv and time.shape[0] != n_traj):
            raise WellFormatError(f"{path}: dimensions/time has shape {time.shape}; expected "
                                  f"{'(n_trajectories, T)' if t_sv else '(T,)'} with n_trajectories={n_traj}")
        n_steps = int(time.shape[-1])
        res = []
        for d in spatial_dims:
            c = dims_g[d]
            sv = _flag(c, "sample_varying", f"{path}: dimensions/{d}")
            if c.ndim != 1 + sv:
                raise WellFormatError(f"{path}: dimensions/{d} has shape {c.shape}; expected {'(B, N)' if sv else '(N,)'}")
            res.append(int(c.shape[-1]))
        res = tuple(res)
        fields: list[FieldInfo] = []
        for order, g in enumerate(FIELD_GROUPS):
            grp = f[g]
            names = _strs(_attr(grp, "field_names", f"{path}: {g}")) if len(grp.attrs.get("field_names", [])) else []
            extra = sorted(set(grp.keys()) - set(names))
            if extra:
                raise WellFormatError(f"{path}: {g} holds datasets {extra} that are not listed in its field_names {names}")
            for name in names:
                w = f"{path}: {g}/{name}"
                if name not in grp:
                    raise WellFormatError(f"{w}: listed in field_names but missing")
                ds = grp[name]
                tv, sv = _flag(ds, "time_varying", w), _flag(ds, "sample_varying", w)
                dv = tuple(bool(x) for x in np.asarray(_attr(ds, "dim_varying", w)).reshape(-1))
                if len(dv) != n_dims:
                    raise WellFormatError(f"{w}: dim_varying {list(dv)} has {len(dv)} entries; expected {n_dims}")
                lead = ((n_traj,) if sv else ()) + ((n_steps,) if tv else ())
                comps = (n_dims,) * order
                full = lead + tuple(n if v else 1 for n, v in zip(res, dv)) + comps
                squeezed = lead + tuple(n for n, v in zip(res, dv) if v) + comps
                if tuple(ds.shape) not in (full, squeezed):
                    raise WellFormatError(
                        f"{w}: shape {tuple(ds.shape)} does not match its flags (sample_varying={sv}, time_varying={tv}, "
                        f"dim_varying={list(dv)}) for n_trajectories={n_traj}, T={n_steps}, spatial {res}, tensor order "
                        f"{order}: expected {full}" + (f" or {squeezed}" if squeezed != full else ""))
                fields.append(FieldInfo(name, order, tv, sv, dv))
        scalars: list[ScalarInfo] = []
        sg = f["scalars"]
        for name in (_strs(sg.attrs["field_names"]) if len(sg.attrs.get("field_names", [])) else []):
            w = f"{path}: scalars/{name}"
            if name not in sg:
                raise WellFormatError(f"{w}: listed in field_names but missing")
            ds = sg[name]
            tv, sv = _flag(ds, "time_varying", w), _flag(ds, "sample_varying", w)
            lead = ((n_traj,) if sv else ()) + ((n_steps,) if tv else ())
            if tuple(ds.shape) not in (lead, lead + (1,)) and not (not lead and ds.shape == ()):
                raise WellFormatError(f"{w}: shape {tuple(ds.shape)} does not match its flags; expected {lead or '() or (1,)'}")
            scalars.append(ScalarInfo(name, tv, sv))
        bcs = reduce_boundary_conditions(f, spatial_dims, path)
        bc_types = sorted({_s(f["boundary_conditions"][k].attrs["bc_type"]).upper() for k in f["boundary_conditions"]})
        return dict(dataset_name=_s(f.attrs["dataset_name"]), grid_type=_s(f.attrs["grid_type"]), n_dims=n_dims,
                    n_trajectories=n_traj, n_steps=n_steps, spatial_dims=tuple(spatial_dims), resolution=res,
                    fields=tuple(fields), scalars=tuple(scalars), bcs=bcs, bc_types=bc_types, time_sample_varying=t_sv)


def windows_per_trajectory(n_steps: int, n_in: int, n_out: int, dt: int) -> int:
    """the_well's raw_steps_to_possible_sample_t0s."""
    return max(0, n_steps - (1 + dt * (n_in + n_out - 1)) + 1)


def max_stride_for_start(t0: int, n_steps: int, n_in: int, n_out: int) -> int:
    """the_well's maximum_stride_for_initial_index."""
    return max(0, (n_steps - t0 - 1) // (n_in + n_out - 1))


def resolve_files(path: str, split: str | None = None, include_filters=(), exclude_filters=()) -> list[str]:
    """The sorted .h5/.hdf5 files of a dataset: `path` is a file, a folder of files, or (with
    `split`) a dataset root holding data/<split>/. Local paths or URLs (`filesystem`)."""
    path = os.fspath(path)
    data_path = fsys.join(path, "data", split) if split else path
    if fsys.is_remote(data_path) and data_path.endswith(fsys.HDF5_SUFFIXES):
        files = [data_path]  # a URL of a file (an HTTP "directory" check would fetch it)
    elif fsys.isfile(data_path):
        files = [data_path if fsys.is_remote(data_path) else fsys.local(data_path)]
    elif fsys.isdir(data_path):
        files = fsys.list_files(data_path)
    else:
        raise WellFormatError(f"{data_path}: no such file or directory")
    if include_filters:
        files = [f for f in files if any(s in f for s in include_filters)]
    files = [f for f in files if not any(s in f for s in exclude_filters)]
    if not files:
        hint = ""
        if not split and fsys.isdir(fsys.join(path, "data")):
            hint = f" (it has a data/ folder: pass split='train', 'valid' or 'test')"
        raise WellFormatError(f"{data_path}: no .h5/.hdf5 files found{hint}")
    return sorted(files)


# ----------------------------------------------------------------------------------- dataset
class WellDataset:
    """Windows (or full trajectories) of a Well dataset as sample dicts (see `walrus_jax.data`).

    Args:
      path: a directory of .h5/.hdf5 files, one file, or a dataset root when `split` is given.
      n_steps_input, n_steps_output: frames per window before / after the split.
      min_dt_stride, max_dt_stride: time stride range; the window count uses min_dt_stride.
      split: "train" / "valid" / "test": read `path/data/<split>`.
      vocab: FieldVocabulary (default: the released 67-entry map).
      allow_new_fields: unknown field names get new indices (`self.vocab` is the extended map);
        otherwise an unknown name is an error.
      field_transforms: {core field name: "log10" | "zeros_like"} (the release's per-dataset transforms).
      inflate_to_3d: embed 2D cartesian data in 3D (walrus' pretraining layout).
      full_trajectory_mode: one sample per trajectory from t=0, output = the rest (<= max_rollout_steps).
      check_finite: every read checks for NaN/Inf and reports file, field, trajectory and step.
      seed: seeds the per-index stride draw when min_dt_stride < max_dt_stride.
      name: overrides the dataset name (default: the files' dataset_name attribute).
    """

    def __init__(self, path, n_steps_input: int = 1, n_steps_output: int = 1, min_dt_stride: int = 1,
                 max_dt_stride: int = 1, *, split: str | None = None, vocab: FieldVocabulary | None = None,
                 allow_new_fields: bool = False, field_transforms: Mapping[str, str] | None = None,
                 inflate_to_3d: bool = False, full_trajectory_mode: bool = False, max_rollout_steps: int = 100,
                 include_filters: Sequence[str] = (), exclude_filters: Sequence[str] = (),
                 check_finite: bool = True, seed: int = 0, name: str | None = None,
                 normalize_time_grid: bool = True):
        if n_steps_input < 1 or n_steps_output < 0:
            raise ValueError(f"n_steps_input must be >= 1 and n_steps_output >= 0, got {n_steps_input}, {n_steps_output}")
        if not 1 <= min_dt_stride <= max_dt_stride:
            raise ValueError(f"need 1 <= min_dt_stride <= max_dt_stride, got {min_dt_stride}, {max_dt_stride}")
        if full_trajectory_mode and min_dt_stride != max_dt_stride:
            raise ValueError("full_trajectory_mode needs a fixed stride (min_dt_stride == max_dt_stride)")
        self.path = os.fspath(path)
        self.split = split
        self.n_steps_input = int(n_steps_input)
        self.n_steps_output = int(n_steps_output)
        self.min_dt_stride, self.max_dt_stride = int(min_dt_stride), int(max_dt_stride)
        self.full_trajectory_mode = bool(full_trajectory_mode)
        self.max_rollout_steps = int(max_rollout_steps)
        self.check_finite = bool(check_finite)
        self.seed = int(seed)
        self.inflate = bool(inflate_to_3d)
        self.normalize_time_grid = bool(normalize_time_grid)
        self.field_transforms = normalize_field_transforms(field_transforms)
        self.max_cache_size = 1_000_000  # elements: larger constant fields are read per sample
        self._caches: dict[int, dict] = {}
        self.files_paths = resolve_files(self.path, split, include_filters, exclude_filters)
        self._build_index()
        self.dataset_name = name or self.metadata.dataset_name
        self._build_channels(vocab or FieldVocabulary.released(), allow_new_fields)

    # ------------------------------------------------------------------ construction
    def _build_index(self):
        headers, errors = [], []
        for p in self.files_paths:
            try:
                headers.append(inspect_file(p))
            except WellFormatError as e:
                errors.append(str(e))
        if errors:
            raise WellFormatError(f"{len(errors)} of {len(self.files_paths)} files in {self.path} are invalid:\n  "
                                  + "\n  ".join(errors))
        h0 = headers[0]
        for p, h in zip(self.files_paths[1:], headers[1:]):
            for key in ("dataset_name", "grid_type", "n_dims", "spatial_dims", "resolution", "fields", "scalars"):
                if h[key] != h0[key]:
                    raise WellFormatError(f"{p}: {key} = {h[key]!r} differs from {self.files_paths[0]} ({h0[key]!r}); "
                                          "all files of a dataset must agree")
        n_in, n_out = self.n_steps_input, self.n_steps_output
        self.files: list[FileInfo] = []
        for p, h in zip(self.files_paths, headers):
            self.files.append(FileInfo(p, h["n_trajectories"], h["n_steps"], h["bcs"]))
        self._fields = h0["fields"]
        self._scalars = h0["scalars"]
        self._time_sample_varying = [h["time_sample_varying"] for h in headers]
        lowest = min(fi.n_steps for fi in self.files)
        if self.full_trajectory_mode:
            n_out = (lowest - n_in * self.min_dt_stride) // self.min_dt_stride
            if n_out < 1:
                raise WellFormatError(f"{self.path}: full trajectory mode needs more than {n_in * self.min_dt_stride} "
                                      f"steps; the shortest trajectory has {lowest}")
            self.n_steps_output = min(n_out, self.max_rollout_steps)
            self._windows = [1] * len(self.files)
        else:
            self._windows = []
            for fi in self.files:
                w = windows_per_trajectory(fi.n_steps, n_in, n_out, self.min_dt_stride)
                if w <= 0:
                    raise WellFormatError(
                        f"{fi.path}: trajectories have {fi.n_steps} steps, fewer than a window needs: "
                        f"{n_in} input + {n_out} output steps at stride {self.min_dt_stride} span "
                        f"{1 + self.min_dt_stride * (n_in + n_out - 1)} steps")
                self._windows.append(w)
        counts = [fi.n_trajectories * w for fi, w in zip(self.files, self._windows)]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._traj_offsets = np.concatenate([[0], np.cumsum([fi.n_trajectories for fi in self.files])]).astype(np.int64)
        bcs0 = self.files[0].boundary_conditions
        for fi in self.files[1:]:
            if not np.array_equal(fi.boundary_conditions, bcs0):
                raise WellFormatError(f"{fi.path}: boundary conditions {fi.boundary_conditions.tolist()} differ from "
                                      f"{self.files_paths[0]} ({bcs0.tolist()})")
        dims = h0["spatial_dims"]
        var = {i: [] for i in range(3)}
        con = {i: [] for i in range(3)}
        for fld in self._fields:
            (var if fld.time_varying else con)[fld.order].extend(flattened_names(fld.name, fld.order, dims))
        self.metadata = WellMetadata(
            dataset_name=h0["dataset_name"], n_spatial_dims=h0["n_dims"], spatial_resolution=h0["resolution"],
            spatial_dims=dims, grid_type=h0["grid_type"], field_names=var, constant_field_names=con,
            scalar_names=[s.name for s in self._scalars if s.time_varying],
            constant_scalar_names=[s.name for s in self._scalars if not s.time_varying],
            boundary_condition_types=sorted({t for h in headers for t in h["bc_types"]}),
            n_files=len(self.files), n_trajectories_per_file=[fi.n_trajectories for fi in self.files],
            n_steps_per_trajectory=[fi.n_steps for fi in self.files])

    def _build_channels(self, vocab: FieldVocabulary, allow_new: bool):
        # Run the per-sample postprocessing on a one-point template to learn the final channel layout.
        md = self.metadata
        n = md.n_spatial_dims
        var = [f for f in self._fields if f.time_varying]
        con = [f for f in self._fields if not f.time_varying]
        names = [nm for f in var + con for nm in flattened_names(f.name, f.order, md.spatial_dims)]
        orders = [f.order for f in var + con for _ in range(n ** f.order)]
        c_var = sum(n ** f.order for f in var)
        sp = (1,) * n
        tmpl = {"input_fields": np.ones((1, *sp, c_var), np.float32),
                "constant_fields": np.ones((*sp, len(names) - c_var), np.float32),
                "field_names": np.asarray(names), "field_tensor_orders": np.asarray(orders, np.int64),
                "padded_field_mask": np.ones(c_var, bool), "grid_type": np.asarray(md.grid_type),
                "boundary_conditions": self.files[0].boundary_conditions.copy()}
        unknown_tf = sorted(set(self.field_transforms) - {f.name for f in self._fields})
        if unknown_tf:
            raise WellFormatError(f"{self.path}: field_transforms name fields {unknown_tf} that the dataset does not "
                                  f"have (fields: {[f.name for f in self._fields]})")
        tmpl = self._postprocess(tmpl)
        self.field_names = [str(s) for s in tmpl["field_names"]]
        self.field_tensor_orders = np.asarray(tmpl["field_tensor_orders"], np.int64)
        self.padded_field_mask = np.asarray(tmpl["padded_field_mask"], bool)
        self.n_variable_channels = int(tmpl["input_fields"].shape[-1])
        missing = [nm for nm in self.field_names if nm not in vocab]
        if missing and not allow_new:
            raise KeyError(f"{self.path}: fields {missing} are not in the field vocabulary ({len(vocab)} names). "
                           "Rename them to vocabulary names (velocity_x, pressure, density, ...) or pass "
                           "allow_new_fields=True to give them new indices for fine-tuning")
        self.vocab = vocab.extend(missing) if missing else vocab
        self.field_indices = self.vocab.indices(self.field_names, self.path)

    def _postprocess(self, sample: dict) -> dict:
        # Order as in walrus' InflatedWellDataset: inflate, then field transforms (then rotation, elsewhere).
        if self.inflate:
            sample = transforms.inflate_to_3d(sample)
        if self.field_transforms:
            sample = transforms.apply_field_transforms(sample, self.field_transforms)
        return sample

    # ------------------------------------------------------------------ sizes and indices
    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def n_trajectories(self) -> int:
        return int(self._traj_offsets[-1])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Spatial shape of the samples (after inflation, before any rotation)."""
        res = self.metadata.spatial_resolution
        if self.inflate and self.metadata.grid_type == "cartesian" and len(res) < 3:
            res = res + (1,) * (3 - len(res))
        return res

    @property
    def n_spatial_dims(self) -> int:
        return len(self.spatial_shape)

    def windows_of_first_trajectories(self, n: int) -> int:
        """How many windows the first n trajectories hold: windows are numbered file-major, then by
        trajectory, so those of the first n trajectories are indices [0, result)."""
        n = max(0, min(int(n), self.n_trajectories))
        fidx = int(np.searchsorted(self._traj_offsets, n, side="right") - 1)
        if fidx >= len(self.files):
            return len(self)
        return int(self._offsets[fidx] + (n - int(self._traj_offsets[fidx])) * self._windows[fidx])

    def locate(self, index: int) -> tuple[int, int, int]:
        """Global window index -> (file index, trajectory in file, start time index)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.dataset_name} with {len(self)} samples")
        fidx = int(np.searchsorted(self._offsets, index, side="right") - 1)
        local = index - int(self._offsets[fidx])
        w = self._windows[fidx]
        return fidx, local // w, local % w

    def stride_range(self, index: int) -> tuple[int, int]:
        """(min, max) stride usable at this window, as the_well computes it."""
        fidx, _, t0 = self.locate(index)
        if self.max_dt_stride == self.min_dt_stride:
            return self.min_dt_stride, self.min_dt_stride
        eff = min(max_stride_for_start(t0, self.files[fidx].n_steps, self.n_steps_input, self.n_steps_output),
                  self.max_dt_stride)
        return self.min_dt_stride, max(self.min_dt_stride, eff)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        lo, hi = self.stride_range(index)
        dt = lo if hi == lo else int(np.random.default_rng([self.seed, index]).integers(lo, hi + 1))
        return self.read(index, dt)

    # ------------------------------------------------------------------ reading
    def read(self, index: int, dt: int | None = None) -> dict:
        """Window `index` at time stride `dt` (default min_dt_stride) -> sample dict."""
        fidx, traj, t0 = self.locate(int(index))
        dt = self.min_dt_stride if dt is None else int(dt)
        n = self.n_steps_input + self.n_steps_output
        steps = self.files[fidx].n_steps
        if dt < 1 or t0 + (n - 1) * dt > steps - 1:
            raise ValueError(f"{self.files[fidx].path}: a window of {n} frames at stride {dt} from step {t0} needs "
                             f"step {t0 + (n - 1) * dt}, but trajectories have {steps} steps (0..{steps - 1})")
        sample = self._read(fidx, traj, t0, n, dt)
        sample["time_index"] = np.asarray(t0, np.int64)
        return sample

    def trajectory(self, j: int) -> dict:
        """Full trajectory j (all frames at stride 1): fields (T, *spatial, C_var) plus constants etc."""
        if not 0 <= j < self.n_trajectories:
            raise IndexError(f"trajectory {j} out of range for {self.dataset_name} with {self.n_trajectories}")
        fidx = int(np.searchsorted(self._traj_offsets, j, side="right") - 1)
        traj = j - int(self._traj_offsets[fidx])
        s = self._read(fidx, traj, 0, self.files[fidx].n_steps, 1)
        out = {k: v for k, v in s.items() if not k.startswith(("input_", "output_"))}
        out["fields"] = np.concatenate([s["input_fields"], s["output_fields"]])
        out["scalars"] = np.concatenate([s["input_scalars"], s["output_scalars"]])
        out["time_grid"] = np.concatenate([s["input_time_grid"], s["output_time_grid"]])
        return out

    def _small_cache(self, fidx: int) -> dict:
        """Sample-invariant small arrays of a file (coordinates, time, constant scalars / fields),
        read once: the_well caches them too. Bounded by the file's structure, so memory stays flat."""
        cache = self._caches.get(fidx)
        if cache is not None:
            return cache
        cache = {}
        with fsys.open_h5(self.files[fidx].path) as f:
            for d in self.metadata.spatial_dims:
                c = f["dimensions"][d]
                if c.ndim == 1:
                    cache[f"dimensions/{d}"] = np.asarray(c[()], np.float32)
            if not self._time_sample_varying[fidx]:
                cache["dimensions/time"] = np.asarray(f["dimensions"]["time"][()], np.float32)
            for sc in self._scalars:
                if not sc.sample_varying and not sc.time_varying:
                    cache[f"scalars/{sc.name}"] = np.asarray(f["scalars"][sc.name][()], np.float32)
            for fld in self._fields:
                key = f"{FIELD_GROUPS[fld.order]}/{fld.name}"
                if not fld.sample_varying and not fld.time_varying and f[key].size <= self.max_cache_size:
                    cache[key] = np.asarray(f[key][()], np.float32)
        self._caches[fidx] = cache
        return cache

    def _read(self, fidx: int, traj: int, t0: int, n: int, dt: int) -> dict:
        fi = self.files[fidx]
        md = self.metadata
        res = md.spatial_resolution
        tsl = slice(t0, t0 + (n - 1) * dt + 1, dt)
        var, con, svar, scon = [], [], [], []
        cache = self._small_cache(fidx)
        remote = fsys.is_remote(fi.path)
        with fsys.open_h5(fi.path) as f, \
                fsys.read_ahead(fi.path, self._window_ranges(f, traj, tsl, cache) if remote else ()):
            for fld in self._fields:
                key = f"{FIELD_GROUPS[fld.order]}/{fld.name}"
                if key in cache:
                    a = cache[key]
                else:
                    idx = ((traj,) if fld.sample_varying else ()) + ((tsl,) if fld.time_varying else ())
                    ds = f[key]
                    a = np.asarray(ds[idx] if idx else ds[()], np.float32)
                lead = (n,) if fld.time_varying else ()
                stored = lead + tuple(r if v else 1 for r, v in zip(res, fld.dim_varying)) + (md.n_spatial_dims,) * fld.order
                a = np.broadcast_to(a.reshape(stored), lead + res + (md.n_spatial_dims,) * fld.order)
                a = np.ascontiguousarray(a).reshape(lead + res + (-1,))
                if self.check_finite:
                    self._check_finite(a, fi, key, traj, t0, dt, fld.time_varying)
                (var if fld.time_varying else con).append(a)
            for sc in self._scalars:
                key = f"scalars/{sc.name}"
                if key in cache:
                    a = cache[key]
                else:
                    idx = ((traj,) if sc.sample_varying else ()) + ((tsl,) if sc.time_varying else ())
                    ds = f[key]
                    a = np.asarray(ds[idx] if idx else ds[()], np.float32)
                (svar if sc.time_varying else scon).append(a.reshape((n,) if sc.time_varying else ()))
            if "dimensions/time" in cache:
                tg = cache["dimensions/time"][tsl]
            else:
                tg = np.asarray(f["dimensions/time"][traj, tsl], np.float32)
            coords = [cache[f"dimensions/{d}"] if f"dimensions/{d}" in cache else
                      np.asarray(f[f"dimensions/{d}"][traj], np.float32) for d in md.spatial_dims]
        if self.normalize_time_grid and tg.size:
            tg = tg - tg.min()
        n_in = self.n_steps_input
        vf = np.concatenate(var, -1) if var else np.zeros((n,) + res + (0,), np.float32)
        cf = np.concatenate(con, -1) if con else np.zeros(res + (0,), np.float32)
        sv = np.stack(svar, -1) if svar else np.zeros((n, 0), np.float32)
        raw_names = [nm for f in [x for x in self._fields if x.time_varying] + [x for x in self._fields if not x.time_varying]
                     for nm in flattened_names(f.name, f.order, md.spatial_dims)]
        raw_orders = [f.order for f in [x for x in self._fields if x.time_varying] + [x for x in self._fields if not x.time_varying]
                      for _ in range(md.n_spatial_dims ** f.order)]
        sample = {
            "input_fields": vf[:n_in], "output_fields": vf[n_in:], "constant_fields": cf,
            "input_scalars": sv[:n_in], "output_scalars": sv[n_in:],
            "constant_scalars": np.asarray(scon, np.float32).reshape(-1),
            "boundary_conditions": fi.boundary_conditions.copy(),
            "space_grid": np.stack(np.meshgrid(*coords, indexing="ij"), -1).astype(np.float32),
            "input_time_grid": tg[:n_in], "output_time_grid": tg[n_in:],
            "field_names": np.asarray(raw_names), "field_tensor_orders": np.asarray(raw_orders, np.int64),
            "padded_field_mask": np.ones(vf.shape[-1], bool), "grid_type": np.asarray(md.grid_type),
        }
        sample = self._postprocess(sample)
        sample["field_indices"] = self.field_indices.copy()
        sample["dataset_name"] = np.asarray(self.dataset_name)
        sample["time_stride"] = np.asarray(dt, np.int64)
        sample["file_index"] = np.asarray(fidx, np.int64)
        sample["trajectory_index"] = np.asarray(int(self._traj_offsets[fidx]) + traj, np.int64)
        return sample

    def _window_ranges(self, f, traj: int, tsl: slice, cache: dict) -> list[tuple[int, int]]:
        """Byte ranges [start, end) of the frames a window reads from the contiguous (unchunked) field
        datasets, adjacent frames merged: a remote read fetches them all at once, ahead of h5py's
        reads (which then cost no round trip each). Chunked datasets read through the block cache."""
        ranges = []
        base = f.userblock_size
        for fld in self._fields:
            key = f"{FIELD_GROUPS[fld.order]}/{fld.name}"
            if key in cache:
                continue
            ds = f[key]
            offset = ds.id.get_offset()
            if ds.chunks is not None or offset is None:
                continue
            lead = int(fld.sample_varying) + int(fld.time_varying)
            frame = int(np.prod(ds.shape[lead:], dtype=np.int64)) * ds.dtype.itemsize
            n_t = ds.shape[int(fld.sample_varying)] if fld.time_varying else 1
            row = traj if fld.sample_varying else 0
            for t in (range(n_t)[tsl] if fld.time_varying else [0]):
                start = base + offset + (row * n_t + t) * frame
                if ranges and ranges[-1][1] == start:
                    ranges[-1] = (ranges[-1][0], start + frame)
                else:
                    ranges.append((start, start + frame))
        return ranges

    @staticmethod
    def _check_finite(a, fi: FileInfo, field: str, traj: int, t0: int, dt: int, time_varying: bool):
        if np.isfinite(a).all():
            return
        bad = np.argwhere(~np.isfinite(a))[0]
        step = f"time step {t0 + int(bad[0]) * dt}" if time_varying else "(constant field)"
        raise WellFormatError(f"{fi.path}: {field} has NaN/Inf in trajectory {traj} at {step}, "
                              f"position {tuple(int(i) for i in bad[1 if time_varying else 0:-1])}")

    def validate(self, check_values: bool = True) -> None:
        """Re-inspects every file; with check_values, reads every trajectory and checks NaN/Inf."""
        for p in self.files_paths:
            inspect_file(p)
        if check_values:
            saved = self.check_finite
            self.check_finite = True
            try:
                for j in range(self.n_trajectories):
                    self.trajectory(j)
            finally:
                self.check_finite = saved

    def __repr__(self) -> str:
        return (f"WellDataset({self.dataset_name!r}, {len(self)} windows, {self.n_trajectories} trajectories, "
                f"spatial {self.spatial_shape}, {len(self.field_names)} channels)")
