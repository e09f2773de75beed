"""Grain training pipeline: system-uniform mixture sampling, one dataset and one rotation per batch,
random time strides, per-dataset batch/history downsampling, patch jitter, host split.

Batch k (a global index) is a pure function of (seed, k): `BatchSource.plan(k)` draws the dataset
(uniformly, or by weight, independently per batch), takes the dataset's next B_d windows from a
seeded permutation of all its windows (without replacement within a pass, recycled after it, as the
original's sampler), a stride per window (uniform over the strides that fit, as the_well draws
them) and one rotation; `BatchSource.load(k)` reads and collates. Every host h of P steps through
the same global batches k = 0, 1, 2, ... (so all hosts agree on the dataset, hence the shapes, of
each batch) and reads only its rows [h·B/P, (h+1)·B/P) of the plan's windows: I/O per host falls
as 1/P, and the P hosts' rows, stacked in host order, are the one-process batch. Grain's
`mp_prefetch` hands consecutive elements to workers round-robin and returns them in order, so any
worker count yields the same stream, and the iterator state (`get_state` / `set_state`) resumes it
exactly. The jitter is drawn in the consuming process with
`sample_jitter(fold_in(PRNGKey(seed), k), cfg, spatial, bcs)` (JAX never runs inside the data
workers). Paths may be URLs (`filesystem`); a remote batch's windows are read in threads.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
from typing import Mapping, Sequence

import numpy as np

from walrus_jax.data import filesystem as fsys
from walrus_jax.data import transforms
from walrus_jax.data.fields import RELEASED_DATASET_OPTIONS, FieldVocabulary
from walrus_jax.data.well import WellDataset, WellFormatError
from walrus_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a mixture. Options left as None take the released config's value for a
    dataset of that name (RELEASED_DATASET_OPTIONS), else the neutral value."""

    path: str
    split: str | None = "train"  # ignored when `path` is itself a folder of files or a file
    name: str | None = None
    weight: float = 1.0
    step_downsample_factor: float | None = None
    batch_downsample_factor: float | None = None
    field_transforms: Mapping[str, str] | None = None
    include_filters: tuple[str, ...] = ()
    exclude_filters: tuple[str, ...] = ()


def _split_path(path: str, split: str | None) -> str | None:
    """Use the split folder only when the path is a dataset root (holds data/<split>)."""
    if split and fsys.isdir(fsys.join(path, "data", split)):
        return split
    return None


def _dataset_name_of(path: str, split: str | None) -> str:
    from walrus_jax.data.well import inspect_file, resolve_files
    return inspect_file(resolve_files(path, split)[0])["dataset_name"]


BLOCK = 4096  # batches per block of dataset draws (BatchSource.dataset_of)
REMOTE_READ_THREADS = 16  # windows of a batch read at once from a remote store


class BatchSource:
    """Random-access batches: element k = one collated batch (picklable, so grain workers can use it)."""

    def __init__(self, datasets: Sequence[WellDataset], batch_sizes: Sequence[int], weights: Sequence[float],
                 vocab: FieldVocabulary, seed: int, rotate: bool, norm_stats: Sequence[Mapping] | None = None,
                 max_trajectories: int = 0, max_samples: int = 0, process_index: int = 0, process_count: int = 1):
        self.datasets = list(datasets)
        # Windows drawn from each dataset: all, or those of its first max_trajectories trajectories,
        # or its first max_samples windows (fine-tuning on a subset); 0 = no limit.
        self.n_windows = []
        for ds in self.datasets:
            n = len(ds)
            if max_trajectories > 0:
                n = min(n, ds.windows_of_first_trajectories(max_trajectories))
            if max_samples > 0:
                n = min(n, int(max_samples))
            self.n_windows.append(int(n))
        # Per dataset {"rms": (C,), "rms_delta": (C,)} from its stats.yaml (global normalization), or None.
        self.norm_stats = None if norm_stats is None else [dict(s) for s in norm_stats]
        # draws_before's memo: draw counts per dataset before each block of BLOCK batches
        self._block_counts = [np.zeros(len(self.datasets), np.int64)]
        self.batch_sizes = [int(b) for b in batch_sizes]
        # Host split: every process plans the same global batch k and reads only its rows.
        self.process_index, self.process_count = int(process_index), int(process_count)
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        for ds, b in zip(self.datasets, self.batch_sizes):
            if b % self.process_count:
                raise ConfigError(f"dataset {ds.dataset_name!r} ({ds.path}) draws batches of {b} samples (the batch "
                                  f"size times its batch_downsample_factor), not divisible by the {self.process_count} "
                                  "processes that each read an equal share of its rows")
        w = np.asarray(weights, np.float64)
        if (w <= 0).any() or not np.isfinite(w).all():
            raise ValueError(f"dataset weights must be positive, got {w.tolist()}")
        self.probs = w / w.sum()
        self.vocab = vocab
        self.seed = int(seed)
        self.rotate = bool(rotate)
        self.field_indices = [vocab.indices(ds.field_names, ds.path) for ds in self.datasets]
        self.rotations = [transforms.proper_rotations(ds.n_spatial_dims) if rotate and ds.metadata.grid_type == "cartesian"
                          else None for ds in self.datasets]

    def dataset_of(self, k: int) -> int:
        """The dataset of batch k: drawn by weight (uniform by default), independently per batch, from
        a block of BLOCK draws seeded by (seed, k // BLOCK), so counting draws needs no per-batch RNG."""
        return int(self._choices(k // BLOCK)[k % BLOCK])

    def _choices(self, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(block), 0xDA7A])
        return rng.choice(len(self.datasets), size=BLOCK, p=self.probs)

    def draws_before(self, k: int) -> np.ndarray:
        """(n_datasets,) how many batches before batch k drew each dataset (memoized per block)."""
        cache = self._block_counts
        b = k // BLOCK
        while len(cache) <= b:
            cache.append(cache[-1] + np.bincount(self._choices(len(cache) - 1), minlength=len(self.datasets)))
        return cache[b] + np.bincount(self._choices(b)[: k % BLOCK], minlength=len(self.datasets))

    def windows(self, d: int, first: int, n: int) -> np.ndarray:
        """Window indices of dataset d's draws first .. first + n − 1: each pass over the dataset is a
        permutation seeded by (seed, d, pass), so windows come without replacement and are recycled."""
        n_win = self.n_windows[d]
        m = np.arange(first, first + n)
        out = np.empty(n, np.int64)
        for p in np.unique(m // n_win):
            perm = np.random.default_rng([self.seed, d, int(p), 0x5A3F]).permutation(n_win)
            sel = m // n_win == p
            out[sel] = perm[m[sel] % n_win]
        return out

    def plan(self, k: int) -> dict:
        """The random choices of batch k: dataset, window indices, strides, rotation index."""
        d = self.dataset_of(k)
        ds = self.datasets[d]
        b = self.batch_sizes[d]
        idx = self.windows(d, int(self.draws_before(k)[d]) * b, b)
        rng = np.random.default_rng([self.seed, int(k)])
        strides = []
        for i in idx:
            lo, hi = ds.stride_range(int(i))
            strides.append(int(rng.integers(lo, hi + 1)))
        rot = int(rng.integers(len(self.rotations[d]))) if self.rotations[d] is not None else -1
        return {"dataset": d, "indices": idx.astype(np.int64), "strides": np.asarray(strides, np.int64),
                "rotation": rot}

    def rows(self, k: int) -> slice:
        """The rows of global batch k that this process reads: [p·B/P, (p+1)·B/P)."""
        n = self.batch_sizes[self.dataset_of(k)] // self.process_count
        return slice(self.process_index * n, (self.process_index + 1) * n)

    def load(self, k: int) -> dict:
        """This process's rows of global batch k (all of them with one process): arrays (B/P, ...)."""
        p = self.plan(k)
        d = p["dataset"]
        ds = self.datasets[d]
        rows = self.rows(k)
        jobs = [(int(i), int(dt)) for i, dt in zip(p["indices"][rows], p["strides"][rows])]
        if fsys.is_remote(ds.path) and len(jobs) > 1:
            # A remote window waits on the network outside h5py's lock (data.filesystem's read-ahead),
            # so reading the batch's windows in threads overlaps their round trips.
            with concurrent.futures.ThreadPoolExecutor(min(len(jobs), REMOTE_READ_THREADS)) as ex:
                samples = list(ex.map(lambda job: ds.read(*job), jobs))
        else:
            samples = [ds.read(i, dt) for i, dt in jobs]
        if p["rotation"] >= 0:
            samples = [transforms.rotate(s, self.rotations[d][p["rotation"]]) for s in samples]
        s0 = samples[0]
        return {
            "input_fields": np.stack([s["input_fields"] for s in samples]),
            "output_fields": np.stack([s["output_fields"] for s in samples]),
            "constant_fields": np.stack([s["constant_fields"] for s in samples]),
            "boundary_conditions": s0["boundary_conditions"],
            "field_indices": self.field_indices[d].copy(),
            "padded_field_mask": s0["padded_field_mask"],
            "field_names": s0["field_names"],  # (C_var + C_con,): the loss masks a constant field "mask"
            **({} if self.norm_stats is None else {
                "norm_rms": self.norm_stats[d]["rms"], "norm_rms_delta": self.norm_stats[d]["rms_delta"]}),
            "dataset_name": ds.dataset_name,
            "time_stride": p["strides"][rows],
            "batch_index": int(k),
        }

    def __call__(self, k: int) -> dict:
        return self.load(k)


_JITTER_FNS: dict = {}  # (cfg, spatial shape, bcs) -> jitted draw, shared by all pipelines of a process


class _JitterDraw:
    """Adds batch['jitter'] in the consuming process (compiled once per config / shape / BC set)."""

    def __init__(self, cfg, seed: int):
        self.cfg, self.seed = cfg, int(seed)

    def __call__(self, batch: dict) -> dict:
        if self.cfg is None or not self.cfg.jitter_patches:
            batch["jitter"] = None
            return batch
        import jax

        from walrus_jax.models.jitter import Jitter, sample_jitter
        shape = tuple(int(n) for n in batch["input_fields"].shape[2:-1])
        bcs = tuple(tuple(int(c) for c in row) for row in np.asarray(batch["boundary_conditions"]))
        fn = _JITTER_FNS.get((self.cfg, shape, bcs))
        if fn is None:
            cfg = self.cfg
            fn = _JITTER_FNS[(cfg, shape, bcs)] = jax.jit(lambda key: sample_jitter(key, cfg, shape, np.asarray(bcs)))
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), batch["batch_index"])
        j = fn(key)
        batch["jitter"] = Jitter(np.asarray(j.patch_shift), np.asarray(j.token_shift))
        return batch


class TrainPipeline:
    """Iterator over training batches with `get_state` / `set_state` (grain iterator state)."""

    def __init__(self, source: BatchSource, iter_ds, vocab: FieldVocabulary):
        self.source = source
        self.vocab = vocab
        self.datasets = source.datasets
        self._iter_ds = iter_ds
        self._it = iter(iter_ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def build_datasets(datasets, *, n_steps_input: int, n_steps_output: int, min_dt_stride: int, max_dt_stride: int,
                   inflate_to_3d: bool, split: str | None, vocab: FieldVocabulary | None, allow_new_fields: bool,
                   use_released_options: bool = True, seed: int = 0, full_trajectory_mode: bool = False,
                   max_rollout_steps: int = 100) -> tuple[list[WellDataset], list[float], list[float], FieldVocabulary]:
    """Paths / DatasetSpecs / WellDatasets -> (datasets, weights, batch factors, shared vocabulary)."""
    if not datasets:
        raise ValueError("make_train_pipeline: no datasets given")
    vocab = vocab or FieldVocabulary.released()
    out, weights, bfactors = [], [], []
    for item in datasets:
        if isinstance(item, WellDataset):
            for nm in item.field_names:
                if nm not in vocab:
                    if not allow_new_fields:
                        vocab.index(nm, item.path)
                    vocab = vocab.extend([nm])
            out.append(item)
            weights.append(1.0)
            bfactors.append(1.0)
            continue
        spec = DatasetSpec(os.fspath(item), split=split) if isinstance(item, (str, os.PathLike)) else item
        if not isinstance(spec, DatasetSpec):
            raise TypeError(f"datasets entries must be paths, DatasetSpec or WellDataset, got {type(item).__name__}")
        sp = _split_path(spec.path, spec.split)
        released = {}
        if use_released_options:
            released = RELEASED_DATASET_OPTIONS.get(spec.name or _dataset_name_of(spec.path, sp), {})
        sdf = spec.step_downsample_factor if spec.step_downsample_factor is not None else \
            released.get("step_downsample_factor", 1.0)
        bdf = spec.batch_downsample_factor if spec.batch_downsample_factor is not None else \
            released.get("batch_downsample_factor", 1.0)
        ft = spec.field_transforms if spec.field_transforms is not None else released.get("field_transforms", {})
        ds = WellDataset(spec.path, max(1, int(n_steps_input * sdf)), n_steps_output, min_dt_stride, max_dt_stride,
                         split=sp, vocab=vocab, allow_new_fields=allow_new_fields, field_transforms=ft,
                         inflate_to_3d=inflate_to_3d, include_filters=spec.include_filters,
                         exclude_filters=spec.exclude_filters, name=spec.name, seed=seed,
                         full_trajectory_mode=full_trajectory_mode, max_rollout_steps=max_rollout_steps)
        vocab = ds.vocab  # extensions only append, so earlier datasets keep their indices
        out.append(ds)
        weights.append(spec.weight)
        bfactors.append(bdf)
    return out, weights, bfactors, vocab


def make_train_pipeline(
    datasets: Sequence,
    *,
    batch_size: int,
    n_steps_input: int,
    n_steps_output: int = 1,
    min_dt_stride: int = 1,
    max_dt_stride: int = 1,
    seed: int = 0,
    cfg=None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 1,
    rotate: bool = True,
    inflate_to_3d: bool = True,
    split: str | None = "train",
    vocab: FieldVocabulary | None = None,
    allow_new_fields: bool = True,
    use_released_options: bool = True,
    num_batches: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainPipeline:
    """Builds the training iterator (module doc). Batches are described in `walrus_jax.data`.

    datasets: paths (dataset roots with data/<split>, folders of files, or files), DatasetSpec, or
      WellDataset objects (used as they are). batch_size / n_steps_input are the 2D values; each
      dataset scales them by its batch/step downsample factors (the released 3D datasets: 0.5).
    cfg: ModelConfig for the jitter draw; None (or cfg.jitter_patches False) gives jitter None.
    num_batches: global batches in the stream (None: endless).
    process_index / process_count: host split (default jax.process_index() / jax.process_count()):
      every process reads every global batch, but only its rows (module doc).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dss, weights, bfactors, vocab = build_datasets(
        datasets, n_steps_input=n_steps_input, n_steps_output=n_steps_output, min_dt_stride=min_dt_stride,
        max_dt_stride=max_dt_stride, inflate_to_3d=inflate_to_3d, split=split, vocab=vocab,
        allow_new_fields=allow_new_fields, use_released_options=use_released_options, seed=seed)
    return assemble_pipeline(dss, weights, bfactors, vocab, batch_size=batch_size, seed=seed, cfg=cfg,
                             worker_count=worker_count, worker_buffer_size=worker_buffer_size,
                             read_threads=read_threads, rotate=rotate, num_batches=num_batches,
                             process_index=process_index, process_count=process_count)


def assemble_pipeline(dss, weights, bfactors, vocab: FieldVocabulary, *, batch_size: int, seed: int = 0, cfg=None,
                      worker_count: int = 0, worker_buffer_size: int = 2, read_threads: int = 1,
                      rotate: bool = True, num_batches: int | None = None, process_index: int | None = None,
                      process_count: int | None = None, norm_stats: Sequence[Mapping] | None = None,
                      max_trajectories: int = 0, max_samples: int = 0) -> TrainPipeline:
    """The second half of `make_train_pipeline`, from `build_datasets`' output: a caller that must
    know the data's vocabulary before choosing the model (fine-tuning on new fields) builds the
    datasets first, grows the model, then assembles the pipeline with that model's config.
    norm_stats: per dataset {"rms", "rms_delta"} (C,) arrays (`dataset_norm_stats`): every batch then
    carries `norm_rms` / `norm_rms_delta` and the loss normalizes by them instead of per sample.
    max_trajectories / max_samples: train on each dataset's first trajectories / windows only (0: all)."""
    import grain

    if cfg is not None and vocab.n_states > cfg.n_states:
        raise ValueError(f"the datasets need a field vocabulary of {vocab.n_states} rows but cfg.n_states = "
                         f"{cfg.n_states}; extend the model's vocabulary (new rows for {vocab.n_states - cfg.n_states} "
                         "fields) before training")
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    sizes = [max(1, int(batch_size * f)) for f in bfactors]
    source = BatchSource(dss, sizes, weights, vocab, seed, rotate, norm_stats, max_trajectories, max_samples,
                         process_index, process_count)
    stop = sys.maxsize if num_batches is None else int(num_batches)
    ds = grain.MapDataset.range(0, stop).map(source)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, read_threads), prefetch_buffer_size=2 * max(1, read_threads)))
    if worker_count > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():
            # Grain's worker processes read absl flags; outside an absl app (notebooks, pytest)
            # nothing parsed them, so take their defaults.
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=worker_buffer_size))
    it = it.map(_JitterDraw(cfg, seed))
    return TrainPipeline(source, it, vocab)


def dataset_norm_stats(dataset_dirs: Sequence[str], dss: Sequence[WellDataset]) -> list[dict]:
    """Per dataset {"rms": (C,), "rms_delta": (C,)} float32 from `<dataset_dir>/stats.yaml`, in the
    order of its samples' channels (variable fields, then constants); padded components get 0."""
    from walrus_jax.data.stats import load_stats

    out = []
    for path, ds in zip(dataset_dirs, dss):
        s0 = ds[0]
        out.append(load_stats(path, [str(n) for n in s0["field_names"]], keys=("rms", "rms_delta"),
                              padded_field_mask=s0["padded_field_mask"]))
    return out


def make_eval_datasets(datasets: Sequence, *, n_steps_input: int, split: str = "valid",
                       inflate_to_3d: bool = False, vocab: FieldVocabulary | None = None,
                       allow_new_fields: bool = True, max_rollout_steps: int = 100,
                       use_released_options: bool = True) -> tuple[list[WellDataset], FieldVocabulary]:
    """Full-trajectory datasets for validation rollouts: `ds.trajectory(j)` gives every frame;
    `ds[j]` gives the_well's full-trajectory sample (input = first T_in frames, output = the rest)."""
    dss, _, _, vocab = build_datasets(
        datasets, n_steps_input=n_steps_input, n_steps_output=1, min_dt_stride=1, max_dt_stride=1,
        inflate_to_3d=inflate_to_3d, split=split, vocab=vocab, allow_new_fields=allow_new_fields,
        use_released_options=use_released_options, full_trajectory_mode=True, max_rollout_steps=max_rollout_steps)
    return dss, vocab


__all__ = ["DatasetSpec", "BatchSource", "TrainPipeline", "make_train_pipeline", "make_eval_datasets",
           "build_datasets", "WellFormatError"]
