"""The Well data layer: reader, field vocabulary, tensor-law-aware augmentation, Grain pipelines,
and miniwell (real-physics datasets written in Well format).

Public API
==========

Reading Well HDF5 files (`well.py`)::

    ds = wj.data.WellDataset(path, n_steps_input=6, n_steps_output=1, min_dt_stride=1, max_dt_stride=1,
                             *, split=None,                 # "train" | "valid" | "test": reads path/data/<split>
                             vocab=None,                    # FieldVocabulary; None = the released 67-entry map
                             allow_new_fields=False,        # True: unknown names get new indices (fine-tuning)
                             field_transforms=None,         # {"density": "log10" | "zeros_like"} (released names)
                             inflate_to_3d=False,           # 2D cartesian data -> (H, W, 1), 3-component tensors
                             full_trajectory_mode=False, max_rollout_steps=100,
                             include_filters=(), exclude_filters=(), check_finite=True, seed=0, name=None)
    len(ds); ds[i] -> sample dict; ds.read(i, dt) -> sample with an explicit time stride
    ds.trajectory(j) -> full trajectory j (validation rollouts, below); ds.n_trajectories
    ds.metadata -> WellMetadata (dataset_name, n_spatial_dims, spatial_resolution, field names by
                   tensor order, constant field names, bc types, files, trajectories and steps per file)
    ds.validate(check_values=True) -> scans every file (NaN/Inf), raises WellFormatError

`path` is a directory of .h5/.hdf5 files, one file, or a dataset root (with `split`). Every file is
checked when the dataset is built: a bad file among good ones raises `WellFormatError` naming it.
With min_dt_stride == max_dt_stride, index i is the same window as the_well's `WellDataset[i]`
(file-major, then trajectory, then start time). With min < max the stride is drawn (as the_well
does: uniform in [min, largest stride that fits]) from a RNG seeded by (seed, i) — `read(i, dt)`
takes it explicitly (the pipeline does). A dataset is a grain `RandomAccessDataSource`.

A *sample* is a dict of numpy arrays with the_well's key names and layouts (channels last):

    input_fields        float32 (T_in, *spatial, C_var)   variable fields: t0, then t1, then t2, flattened
    output_fields       float32 (T_out, *spatial, C_var)
    constant_fields     float32 (*spatial, C_con)         C_con may be 0
    input_scalars       float32 (T_in, S_var)   output_scalars (T_out, S_var)   constant_scalars (S_con,)
    boundary_conditions int64   (n_dims, 2)               [low, high] per axis; WALL=0, OPEN=1, PERIODIC=2
    space_grid          float32 (*spatial, n_dims)        coordinates of each point
    input_time_grid     float32 (T_in,)   output_time_grid (T_out,)   (relative to the first frame)
    field_names         str     (C_var + C_con,)          flattened names ("velocity_x", "D_xy", ...)
    field_tensor_orders int64   (C_var + C_con,)          0 scalar, 1 vector component, 2 rank-2 component
    field_indices       int64   (C_var + C_con,)          vocabulary rows (variable fields first)
    padded_field_mask   bool    (C_var,)                  False on components added by 2D->3D inflation
    grid_type           str     ()                        "cartesian" or other (never rotated)
    dataset_name        str     ()
    time_stride, file_index, trajectory_index, time_index   int64 ()

Full trajectories (validation rollouts)::

    traj = ds.trajectory(j)   # dict: fields (T_total, *spatial, C_var), constant_fields, boundary_conditions,
                              # time_grid (T_total,), space_grid, field_names, field_indices,
                              # padded_field_mask, field_tensor_orders, dataset_name, scalars

Field vocabulary (`fields.py`)::

    vocab = wj.data.FieldVocabulary.released()        # the released 67-entry field_index_map_override
    vocab.index("velocity_x") -> 4; vocab.extend(["my_field"]) -> new vocabulary (index 67)
    vocab.to_dict() / FieldVocabulary.from_dict(d)    # recorded in the training config
    wj.data.RELEASED_DATASET_OPTIONS                  # per-dataset step/batch downsampling, field transforms

Augmentation (`transforms.py`, pure numpy functions of the sample alone)::

    wj.data.proper_rotations(n)        -> int64 (4, 2, 2) for n=2, (24, 3, 3) for n=3 (identity first)
    wj.data.rotate(sample, R)          -> sample with fields moved as f'(x) = f(R^T x), vectors R u,
                                          rank-2 tensors R T R^T, bcs rows permuted / swapped, grids as
                                          vectors, padded_field_mask permuted. Non-cartesian: unchanged.
    wj.data.inflate_to_3d(sample, vocab) -> (H, W, 1), zero z-components, 3x3 tensors, extra axis PERIODIC
    wj.data.apply_field_transforms(sample, {"density": "log10"}, vocab)

Training pipeline (`pipeline.py`)::

    it = wj.data.make_train_pipeline(
        datasets,                        # paths, WellDataset or DatasetSpec(path, split=..., weight=...,
                                         # step_downsample_factor=..., batch_downsample_factor=...,
                                         # field_transforms=...)
        batch_size=2, n_steps_input=6, n_steps_output=1, min_dt_stride=1, max_dt_stride=5,
        seed=0, cfg=model_cfg,           # ModelConfig for the jitter draw (None: batch["jitter"] is None)
        worker_count=0, rotate=True, inflate_to_3d=True, split="train",
        vocab=None, allow_new_fields=True,
        process_index=None, process_count=None)   # default jax.process_index() / process_count()
    batch = next(it); state = it.get_state(); it.set_state(state)   # exact resume
    it.vocab                              # the shared FieldVocabulary (record it in the config)

A *batch* holds one dataset (one shape) and one rotation:

    input_fields        float32 (B, T_in, *spatial, C_var)
    output_fields       float32 (B, T_out, *spatial, C_var)
    constant_fields     float32 (B, *spatial, C_con)          C_con may be 0
    boundary_conditions int64   (n_dims, 2)                   one set for the whole batch
    field_indices       int64   (C_var + C_con,)
    padded_field_mask   bool    (C_var,)
    jitter              walrus_jax.models.jitter.Jitter (numpy leaves) or None
    dataset_name        str
    time_stride         int64   (B,)       batch_index   int  (global index of the batch)

B and T_in are per dataset: B_d = max(1, int(batch_size * batch_downsample_factor)),
T_in,d = max(1, int(n_steps_input * step_downsample_factor)) (the released 3D datasets: 0.5, 0.5).
Batch k (global index) is a pure function of (seed, k): the dataset is drawn uniformly (or by
weight), then B_d windows uniformly, a stride per window, one rotation, and the jitter from
`sample_jitter(fold_in(PRNGKey(seed), k), cfg, spatial, bcs)`. Host h of P (process_index /
process_count) steps through every k but reads only rows [h·B_d/P, (h+1)·B_d/P) of it: its arrays
are (B_d/P, ...), and the hosts' rows stacked in host order are the one-host batch. Paths may be
URLs (gs://, s3://, hf://, http(s)://: `filesystem.py`).

Your own arrays (`from_arrays.py`, its command line `from_arrays_cli.py`) and statistics (`stats.py`)::

    wj.data.write_arrays(path, {"my_tracer": c, "velocity": (u, 1)},      # (B, T, *spatial[, n_dims[, n_dims]])
                         dataset_name="mine", boundary_conditions={"x": "periodic", "y": ("wall", "open")},
                         dt=0.1, spacing=0.05, constant_fields=None)      # checked: DataError names field/axis
    wj.data.write_dataset(root, "mine", fields, splits={"train": 0.8, "valid": 0.1, "test": 0.1}, **same)
    -> root/mine/data/{train,valid,test}/mine.hdf5 + root/mine/stats.yaml  (set data.root = root)
    python -m walrus_jax.data.from_arrays --root DIR --name mine --field my_tracer=run.npz:c ...
    wj.data.compute_stats(dataset_dir)     # the_well's stats.yaml (mean/std/rms and *_delta) of the train split
    python -m walrus_jax.data.stats DATASET_DIR
    wj.data.load_stats(dataset_dir, field_names, padded_field_mask=None) -> {"rms": (C,), "rms_delta": (C,)}

miniwell (`miniwell.py`)::

    python -m walrus_jax.data.miniwell --out DIR [--quick] [--systems a,b]
    -> DIR/<name>/data/{train,valid,test}/*.hdf5 and DIR/<name>/stats.yaml
"""

from walrus_jax.data.fields import (
    FIELD_TRANSFORMS,
    RELEASED_DATASET_OPTIONS,
    RELEASED_FIELD_INDEX_MAP,
    RELEASED_FIELD_NAMES,
    FieldVocabulary,
)
from walrus_jax.data.pipeline import (
    BatchSource,
    DatasetSpec,
    TrainPipeline,
    build_datasets,
    make_eval_datasets,
    make_train_pipeline,
)
from walrus_jax.data.transforms import apply_field_transforms, inflate_to_3d, proper_rotations, rotate
from walrus_jax.data.well import WellDataset, WellFormatError, WellMetadata, inspect_file
from walrus_jax.data.writer import WellBoundary, WellField, WellScalar, axis_boundaries, write_well_file

# Loaded on first use: `python -m walrus_jax.data.stats` / `.from_arrays` run these modules as
# __main__, and importing them here as well would make runpy warn about a double import.
_LAZY = {"write_arrays": "from_arrays", "write_dataset": "from_arrays", "compute_stats": "stats",
         "load_stats": "stats"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"walrus_jax.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'walrus_jax.data' has no attribute {name!r}")
