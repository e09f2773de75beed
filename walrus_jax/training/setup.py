"""Everything a training run needs before its first step, built once: `setup(config, workdir) -> Run`.

Order (each stage needs the one before):
1. the mesh and the data directories (`walrus_jax.data.resolve`: the miniwell is generated when no
   data is configured);
2. with `config.init_from`, the fine-tuning plan (the base checkpoint's architecture and vocabulary);
3. the training datasets: their field vocabulary decides the model's (new fields add rows), so the
   final model config comes after them, and the pipeline (whose jitter draws need it) after that;
4. the model built abstractly (`checkpoints.params.abstract_model`), its parameter shardings from
   the logical axis names and `config.sharding.rules`, the optimizer and the train state's shardings;
5. the workdir's checkpoints: another architecture is an error; the newest restorable one is
   restored (params, optimizer, step, data-iterator state, RNG), else a fresh state is initialised
   directly sharded (a 1.3B model is never materialised on one device). A resumed run never draws
   a random initialization;
6. the jitted train step and the validation sets; last the metrics writer, which cuts the metrics
   log back to the restored step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from walrus_jax import sharding
from walrus_jax.checkpoints import params as parameters
from walrus_jax.checkpoints.train_state import Checkpointer
from walrus_jax.data.resolve import resolve_data
from walrus_jax.inference import evaluation
from walrus_jax.models.config import ModelConfig
from walrus_jax.training import batches, optim, steps
from walrus_jax.training.config import micro_steps_per_update, model_config, step_options
from walrus_jax.training.reporting import MetricsWriter

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- the model
@dataclasses.dataclass
class ModelParts:
    """The model split for training: graph definition, abstract variables and their shardings.
    params: the nnx.Param variables; rest: every other variable (the fixed RoPE frequency buffer)."""

    cfg: ModelConfig
    graphdef: Any
    params_abstract: dict  # pure dict of ShapeDtypeStruct
    rest_abstract: dict
    param_shardings: dict
    rest_shardings: dict


def model_parts(model_cfg: ModelConfig, mesh, rules) -> ModelParts:
    """`model_cfg`'s abstract model with shardings over `mesh` (logical axis names -> `rules`)."""
    graphdef, p_abs, r_abs = nnx.split(parameters.abstract_model(model_cfg), nnx.Param, ...)
    specs = sharding.param_specs(p_abs, sharding.rules_dict(rules), mesh)
    p_pure, r_pure = nnx.to_pure_dict(p_abs), nnx.to_pure_dict(r_abs)
    rep = sharding.replicated(mesh)
    return ModelParts(model_cfg, graphdef, p_pure, r_pure, sharding.named(mesh, specs),
                      jax.tree.map(lambda _: rep, r_pure))


def init_params(parts: ModelParts, seed: int) -> tuple[dict, dict]:
    """Random parameters (and the other variables) placed with their shardings, from the model's
    own initializer (`walrus_jax.models.init`).

    On an accelerator mesh the initialiser is compiled with out_shardings, so each device creates
    only its shard. On a CPU mesh, where compiling the random initialisers costs far more than
    running them, the model is built eagerly and then placed.
    """
    from walrus_jax.models import Walrus

    def make():
        _, p, r = nnx.split(Walrus(parts.cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
        return nnx.to_pure_dict(p), nnx.to_pure_dict(r)

    devices = next(iter(jax.tree.leaves(parts.param_shardings))).device_set
    if all(d.platform == "cpu" for d in devices):
        p, r = make()
        return jax.device_put(p, parts.param_shardings), jax.device_put(r, parts.rest_shardings)
    return jax.jit(make, out_shardings=(parts.param_shardings, parts.rest_shardings))()


def fixed_rest(parts: ModelParts) -> dict:
    """The non-parameter variables (fixed buffers, never checkpointed) without any random init:
    what a resumed run needs beside the restored parameters."""
    flat = {}
    declared = parameters.variables(parameters.abstract_model(parts.cfg))  # with their Init metadata
    for path, a in parameters.flatten(parts.rest_abstract, sep=None).items():
        value = parameters.fixed_buffer(declared[path])
        if value is None:
            raise ValueError(f"no fixed value for the non-parameter variable {parameters.SEP.join(path)}")
        flat[path] = jnp.asarray(value, a.dtype)
    return jax.device_put(parameters.unflatten(flat, sep=None), parts.rest_shardings)


def state_shardings(parts: ModelParts, tx, mask, mesh) -> tuple[dict, dict]:
    """(abstract train state, its shardings) for `steps.init_state` with the optimizer `tx`."""
    state_abs = jax.eval_shape(lambda p: steps.init_state(p, tx, jax.random.key(0), mask), parts.params_abstract)
    rep = sharding.replicated(mesh)
    sh = {"params": parts.param_shardings,
          "opt_state": sharding.like_params(state_abs["opt_state"], parts.params_abstract, parts.param_shardings,
                                            mesh),
          "step": rep, "rng": rep}
    return state_abs, sh


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying their shardings (what Orbax restores into)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """A training run ready to step (module docstring)."""

    config: Any
    workdir: str
    is_main: bool
    mesh: Any
    model_cfg: ModelConfig
    parts: ModelParts
    vocab: Any  # FieldVocabulary of the data (and of the model)
    schedule: optim.Schedule
    step_fn: Any  # (state, batch, rest, bcs) -> (state, metrics), jitted
    state: dict  # params, opt_state, step, rng: sharded device arrays
    rest: dict  # the model's non-parameter variables
    pipeline: Any  # the data iterator (get_state / set_state)
    checkpointer: Checkpointer
    plan: Any  # the fine-tuning plan (config.init_from) or None
    meta: dict  # what every checkpoint's meta records besides the step and the losses
    eval_sets: list | None
    writer: MetricsWriter
    start_step: int = 0  # optimizer updates already done (resumed runs)
    resumed_from: int | None = None
    losses: list = dataclasses.field(default_factory=list)  # one per optimizer update, across resumes
    timing: dict = dataclasses.field(default_factory=dict)


def setup(config, workdir: str, timing: dict | None = None) -> Run:
    """The Run for `config` in `workdir` (module docstring); `timing` gains data_seconds."""
    timing = {} if timing is None else timing
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    t_data = time.time()
    paths = resolve_data(config)
    timing["data_seconds"] = time.time() - t_data

    plan, model_cfg, datasets = _model_and_data(config, paths)
    vocab = datasets[3]
    pipeline = batches.make_pipeline(config, paths, datasets, model_cfg)
    parts = model_parts(model_cfg, mesh, config.sharding.rules)
    mask = plan.trainable_mask(parts.params_abstract) if plan is not None else None
    opt = dataclasses.replace(optim.optimizer_config(config.train), grad_accum=micro_steps_per_update(config))
    schedule = optim.make_schedule(config.train)
    tx = optim.build(opt, schedule, mask)
    state_abs, state_sh = state_shardings(parts, tx, mask, mesh)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save)
    fp = parameters.fingerprint(parts.params_abstract)
    ckpt.check_compatible(model_cfg.to_dict(), fp)
    run = Run(config=config, workdir=workdir, is_main=jax.process_index() == 0, mesh=mesh, model_cfg=model_cfg,
              parts=parts, vocab=vocab, schedule=schedule,
              step_fn=steps.build_train_step(parts.graphdef, tx, schedule, step_options(config), state_sh,
                                             parts.rest_shardings, mask),
              state={}, rest={}, pipeline=pipeline, checkpointer=ckpt, plan=plan,
              meta={"model_config": model_cfg.to_dict(), "fingerprint": fp, "vocab": vocab.to_dict(),
                    "config": json.loads(config.to_json_best_effort()),
                    **(plan.checkpoint_meta() if plan is not None else {})},
              eval_sets=evaluation.eval_sets_from_config(config, paths, vocab, config.eval.n_trajectories,
                                                         config.data.allow_new_fields)
              if config.eval.n_trajectories > 0 else None,
              writer=None, timing=timing)
    if not _resume(run, with_shardings(state_abs, state_sh)):
        _fresh_state(run, plan, tx, mask, state_sh)
    # After the restore: the metrics log is cut back to the step the run goes on from.
    run.writer = MetricsWriter(workdir, run.is_main, start_step=run.start_step)
    return run


def _model_and_data(config, paths):
    """(fine-tuning plan or None, final model config, training datasets) (module docstring, 2-3)."""
    base_cfg, vocab, plan = model_config(config), None, None
    if config.init_from:
        from walrus_jax.training import finetune

        plan = finetune.prepare(config)
        base_cfg, vocab = plan.model_cfg, plan.vocab
    datasets = batches.build_datasets(config, paths, vocab)
    n_data = datasets[3].n_states
    if plan is not None:
        return plan, plan.finalize_config(n_data), datasets
    model_cfg = base_cfg.replace(n_states=max(base_cfg.n_states, n_data))
    if model_cfg.n_states != base_cfg.n_states:
        log.warning("the data's field vocabulary has %d entries: model.n_states %d -> %d", n_data,
                    base_cfg.n_states, model_cfg.n_states)
    return None, model_cfg, datasets


def _resume(run: Run, abstract_state) -> bool:
    """Restores the newest restorable checkpoint into `run` (state, data position, losses); False if none."""
    restored = run.checkpointer.restore_latest(abstract_state)
    if restored is None:
        return False
    ck_step, run.state, meta, data_state = restored
    if data_state is not None:
        run.pipeline.set_state(data_state)
    run.rest = fixed_rest(run.parts)
    run.losses = [float(v) for v in meta.get("losses", [])]
    run.start_step = run.resumed_from = int(meta["opt_step"])
    log.warning("resuming from %s/%d (optimizer step %d)", run.checkpointer.directory, ck_step, run.resumed_from)
    return True


def _fresh_state(run: Run, plan, tx, mask, state_sh) -> None:
    """A new train state: random parameters (mapped from the base checkpoint when fine-tuning)."""
    seed = run.config.seed
    params, run.rest = init_params(run.parts, seed)
    if plan is not None:
        params = plan.initial_params(run.parts, params, seed)
    key = jax.random.key(seed)
    run.state = jax.jit(lambda p: steps.init_state(p, tx, key, mask), out_shardings=state_sh,
                        donate_argnums=0)(params)
