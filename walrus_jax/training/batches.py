"""Training data from the config: the datasets, the pipeline, and each global batch on the mesh.

Every process steps through the same *global* batches (so a global batch holds one dataset, one
shape, on every host) but reads only its own rows [p·B/P, (p+1)·B/P) of each (`data.pipeline`):
I/O per host falls as 1/P. `load_batch` lays those rows out as global arrays over the mesh.
"""
from __future__ import annotations

import jax
import numpy as np

from walrus_jax import sharding
from walrus_jax.errors import DataError
from walrus_jax.models.config import ModelConfig
from walrus_jax.training import steps
from walrus_jax.training.config import micro_batch_size, output_steps


def build_datasets(config, paths, vocab=None):
    """(datasets, weights, batch factors, vocabulary) of the training split (`data.pipeline.build_datasets`)."""
    from walrus_jax.data import pipeline

    d = config.data
    return pipeline.build_datasets(
        paths, n_steps_input=d.n_steps_input, n_steps_output=output_steps(config), min_dt_stride=d.min_dt_stride,
        max_dt_stride=d.max_dt_stride, inflate_to_3d=d.inflate_to_3d, split="train", vocab=vocab,
        allow_new_fields=d.allow_new_fields, seed=config.seed)


def make_pipeline(config, paths, datasets, model_cfg: ModelConfig):
    """The data iterator over `build_datasets`' output (this process's rows of every global batch)."""
    from walrus_jax.data import pipeline

    d = config.data
    dss, weights, bfactors, vocab = datasets
    norm_stats = pipeline.dataset_norm_stats(paths, dss) if d.normalization == "global" else None
    return pipeline.assemble_pipeline(
        dss, weights, bfactors, vocab, batch_size=micro_batch_size(config), seed=config.seed,
        cfg=model_cfg if config.train.jitter else None, worker_count=d.worker_count, rotate=d.rotate,
        process_index=jax.process_index(), process_count=jax.process_count(), norm_stats=norm_stats,
        max_trajectories=d.max_trajectories, max_samples=d.max_samples)


def load_batch(mesh, batch) -> tuple[dict, tuple]:
    """This process's rows of a global batch (process p of P holds rows [p·B/P, (p+1)·B/P), arrays
    (B/P, ...)) -> (global device arrays sharded over the mesh, static bcs). The rows are taken as
    they are: `jax.make_array_from_process_local_data` lays them out."""
    dbatch, bcs = steps.device_batch(batch)
    jitter = dbatch.pop("jitter", None)
    b = np.shape(dbatch["input_fields"])[0] * jax.process_count()  # the global batch size
    n_dev = sharding.n_devices(mesh)
    if b % n_dev:
        raise DataError(f"a batch of dataset {batch.get('dataset_name', '?')!r} has {b} samples, not divisible by "
                        f"the mesh's {n_dev} devices (data.batch_size and the dataset's batch_downsample_factor "
                        "decide it)")
    local = {k: np.asarray(v, np.int32) if k == "field_indices" else np.asarray(v) for k, v in dbatch.items()}
    out = sharding.global_batch(mesh, local, steps.BATCH_KEYS)
    if jitter is not None:
        rep = sharding.replicated(mesh)
        out["jitter"] = jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(rep, np.asarray(a, np.int32), np.shape(a)), jitter)
    return out, bcs
