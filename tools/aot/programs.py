"""The jitted programs a training job runs, with abstract arguments placed on a mesh: what `tools.aot`
lowers and compiles. They are the job's own functions (`walrus_jax.training.steps`' train and eval
steps, `walrus_jax.inference.rollouts.predict_next`), built from the config as `training.setup` does,
without data, weights or devices.

Shapes: a train step per spatial shape (the recipe's 2-D 128^2 and 3-D 128^3 by default), an eval
step and a rollout step (one autoregressive prediction, last frame only) on the first shape. Each
window has data.n_steps_input frames of n_dims + 2 variable fields (velocity components, density,
pressure: the usual Well dataset), periodic boundaries, and `batch_per_chip` samples per chip.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from walrus_jax import sharding
from walrus_jax.inference import rollouts
from walrus_jax.models.config import PERIODIC
from walrus_jax.training import optim, setup, steps
from walrus_jax.training.config import micro_steps_per_update, model_config, output_steps, step_options


@dataclasses.dataclass
class Program:
    """One program to compile: `fn` (jitted) and its abstract arguments."""

    name: str  # "train_2d", "eval_2d", "rollout_2d", ...
    kind: str  # "train", "eval" or "rollout"
    shape: tuple[int, ...]  # spatial shape of one sample
    batch: int  # global batch
    fn: Any
    args: tuple
    forward_passes: float  # model forwards per step in the analytic count (train: 3, +1 with remat "full" or "offload")


def build(config, mesh, shapes, batch_per_chip: int, kinds=("train", "eval", "rollout")) -> list[Program]:
    """The programs of `config`'s job on `mesh` (see the module doc)."""
    cfg = model_config(config)
    parts = setup.model_parts(cfg, mesh, config.sharding.rules)
    opt = dataclasses.replace(optim.optimizer_config(config.train), grad_accum=micro_steps_per_update(config))
    schedule = optim.make_schedule(config.train)
    tx = optim.build(opt, schedule)
    state_abs, state_sh = setup.state_shardings(parts, tx, None, mesh)
    state = setup.with_shardings(state_abs, state_sh)
    rest = setup.with_shardings(parts.rest_abstract, parts.rest_shardings)
    params = setup.with_shardings(parts.params_abstract, parts.param_shardings)
    opts = step_options(config)
    n_chips = sharding.n_devices(mesh)
    batch = batch_per_chip * n_chips
    t_in = int(config.data.n_steps_input)
    rep = NamedSharding(mesh, P())
    remat_forward = 1.0 if cfg.remat in ("full", "offload") else 0.0

    def window(shape, steps_):
        fields = len(shape) + 2
        x = jax.ShapeDtypeStruct((batch, steps_) + tuple(shape) + (fields,), jnp.float32,
                                 sharding=sharding.batch_sharding(mesh, 3 + len(shape)))
        return x, fields

    programs = []
    train_fn = steps.build_train_step(parts.graphdef, tx, schedule, opts, state_sh, parts.rest_shardings)
    for shape in shapes:
        bcs = ((PERIODIC, PERIODIC),) * len(shape)
        tag = f"{len(shape)}d"
        x, fields = window(shape, t_in)
        y, _ = window(shape, output_steps(config))
        fi = jax.ShapeDtypeStruct((fields,), jnp.int32, sharding=rep)
        batch_args = {"input_fields": x, "output_fields": y, "field_indices": fi}
        if "train" in kinds:
            programs.append(Program(f"train_{tag}", "train", tuple(shape), batch, train_fn,
                                    (state, batch_args, rest, bcs), (3.0 + remat_forward) * opts.rollout_steps))
        if shape is not shapes[0]:
            continue
        if "eval" in kinds:
            eval_fn = steps.build_eval_loss(parts.graphdef, opts, mesh)
            programs.append(Program(f"eval_{tag}", "eval", tuple(shape), batch,
                                    _bind_kw(eval_fn, bcs=bcs), (params, batch_args, rest), 1.0))
        if "rollout" in kinds:
            programs.append(Program(f"rollout_{tag}", "rollout", tuple(shape), batch,
                                    _rollout_step(parts.graphdef, mesh, bcs, fields),
                                    (params, rest, x), 1.0))  # an upper bound: most blocks see every frame
    return programs


class _bind_kw:
    """A jitted function with keyword arguments fixed, keeping `.lower` and `.trace`."""

    def __init__(self, fn, **kwargs):
        self.fn, self.kwargs = fn, kwargs

    def lower(self, *args):
        return self.fn.lower(*args, **self.kwargs)

    def trace(self, *args):
        return self.fn.trace(*args, **self.kwargs)


def _rollout_step(graphdef, mesh, bcs, fields: int) -> Callable:
    """jit(one autoregressive step): window (B, T_in, *spatial, C) -> next frame (B, *spatial, C)."""
    field_indices = np.arange(3, 3 + fields, dtype=np.int32)

    def step(params, rest, window):
        with steps.placed_on(mesh):
            model = nnx.merge(graphdef, params, rest)
            return rollouts.predict_next(model, window, field_indices, bcs)

    return jax.jit(step)
