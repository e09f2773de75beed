"""The training objective and the pure, jitted train / eval steps (SPEC §11, §14).

Loss (the release: the_well MAE on normalized deltas × loss_multiplier):
  x       = [input_fields | constant_fields repeated over time]            (B, T, *spatial, C)
  x_n     = x / sample_rms(x)                                               (the model input)
  target  = normalized_delta_targets(x, next frame)                         (B, T, *spatial, C)
  y       = model(x_n, field_indices, bcs, jitter, train=True, key=k)       (B, T, *spatial, C)
  mae     = mean over space |y − target|, variable channels only            (B, T, C_var)
  loss    = loss_multiplier · mean over (batch, time) of the mean over the sample's real
            (not padded) variable fields.
Constant channels are not scored: the formatter's output map drops them (SPEC §0, §12) and their
targets are identically zero. Only the first output frame is used (causal training, T_out = 1 in
the release).

The state is a plain dict of arrays (params as a pure dict, optimizer state, counters, RNG key
data) so that it shards, donates and checkpoints without NNX objects in the way.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from walrus_jax import normalization, xla_options
from walrus_jax.models.jitter import Jitter, normalize_bcs, sample_jitter

# Batch entries that are arrays with a leading batch axis (sharded over the mesh).
BATCH_KEYS = ("input_fields", "output_fields", "constant_fields")
# Batch entries shared by the whole batch (replicated).
SHARED_KEYS = ("field_indices", "padded_field_mask")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static (hashable) options of a step; part of the compilation key."""

    loss_multiplier: float = 100.0
    eps: float = normalization.DEFAULT_EPS
    jitter: bool = True  # apply patch/token jitter in training (the release: jitter_patches=True)


# ---------------------------------------------------------------------------------- formatting
def format_window(input_fields: jax.Array, constant_fields: jax.Array | None) -> jax.Array:
    """(B, T, *sp, C_var) and (B, *sp, C_con) -> (B, T, *sp, C_var + C_con) (the formatter, SPEC §0)."""
    if constant_fields is None or constant_fields.shape[-1] == 0:
        return input_fields.astype(jnp.float32)
    c = jnp.broadcast_to(constant_fields[:, None].astype(jnp.float32),
                         (input_fields.shape[0], input_fields.shape[1]) + constant_fields.shape[1:])
    return jnp.concatenate([input_fields.astype(jnp.float32), c], axis=-1)


def field_weights(padded_field_mask: jax.Array | None, batch: int, c_var: int) -> jax.Array:
    """(B, C_var) float weights: 1 for real fields, 0 for padded ones (mask (C_var,) or (B, C_var))."""
    if padded_field_mask is None:
        return jnp.ones((batch, c_var), jnp.float32)
    m = jnp.asarray(padded_field_mask).astype(jnp.float32)
    if m.shape[-1] != c_var:
        raise ValueError(f"padded_field_mask has {m.shape[-1]} entries but input_fields has {c_var} variable fields")
    return jnp.broadcast_to(m, (batch, c_var))


def per_field_l1(pred: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
    """pred, target (B, T, *sp, C_var); weights (B, C_var) -> scalar.

    the_well MAE (mean over space, keeping batch, time and field), then the mean over real fields
    per sample, then the mean over time and batch.
    """
    sp_axes = tuple(range(2, pred.ndim - 1))
    mae = jnp.mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=sp_axes)  # (B, T, C)
    per_sample = jnp.sum(mae * weights[:, None, :], axis=-1) / jnp.maximum(jnp.sum(weights, -1), 1.0)[:, None]
    return jnp.mean(per_sample)


def compute_loss(model, batch: Mapping[str, jax.Array], key: jax.Array | None, *, bcs, opts: StepOptions,
                 train: bool) -> tuple[jax.Array, dict]:
    """Loss of `model` on one batch (see the module docstring). bcs: static (n_dims, 2) tuple."""
    inp = batch["input_fields"]
    c_var = inp.shape[-1]
    const = batch.get("constant_fields")
    x = format_window(inp, const)
    x_n = x / normalization.sample_rms(x, opts.eps)
    nxt = format_window(batch["output_fields"][:, :1], const)
    target = normalization.normalized_delta_targets(x, nxt, opts.eps)
    cfg = model.cfg
    k_jit = k_model = None
    if key is not None:
        k_jit, k_model = jax.random.split(key)
    jitter = None
    if opts.jitter and cfg.jitter_patches:
        if "jitter" in batch and batch["jitter"] is not None:
            jitter = batch["jitter"]
        elif k_jit is not None:
            jitter = sample_jitter(k_jit, cfg, inp.shape[2:-1], bcs)
    y = model(x_n, batch["field_indices"], bcs, jitter, train=train, key=k_model if train else None)
    w = field_weights(batch.get("padded_field_mask"), inp.shape[0], c_var)
    loss = per_field_l1(y[..., :c_var], target[..., :c_var], w) * opts.loss_multiplier
    return loss, {}


# ------------------------------------------------------------------------------------ state
def init_state(params: Mapping[str, Any], tx: optax.GradientTransformation, seed_key: jax.Array) -> dict:
    """The train state bundle: params (pure dict), opt_state, micro-step counter, RNG key data."""
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),  # micro-batches done
        # A copy: the state is donated to the step, the caller's key must survive.
        "rng": jnp.array(jax.random.key_data(seed_key) if jnp.issubdtype(seed_key.dtype, jax.dtypes.prng_key)
                         else seed_key, copy=True),
    }


def _split_rng(rng_data):
    key = jax.random.wrap_key_data(rng_data)
    key, sub = jax.random.split(key)
    return jax.random.key_data(key), sub


# ------------------------------------------------------------------------------------ steps
def train_step(state: dict, batch: Mapping[str, Any], rest, *, graphdef, tx, bcs, opts: StepOptions):
    """One micro-batch: loss, gradients, optimizer (accumulation is inside `tx`). Pure.

    state: see `init_state`; batch: arrays (BATCH_KEYS with a leading batch axis, SHARED_KEYS,
    optionally `jitter`); rest: the model's non-parameter variables (pure dict).
    Returns (new_state, metrics{loss, grad_norm}).
    """
    rng, key = _split_rng(state["rng"])

    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest)
        return compute_loss(model, batch, key, bcs=bcs, opts=opts, train=True)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_loss(params, batch, rest, *, graphdef, bcs, opts: StepOptions):
    """Loss in eval mode (no drop path / field dropout, no jitter): a deterministic number."""
    model = nnx.merge(graphdef, params, rest)
    loss, _ = compute_loss(model, batch, None, bcs=bcs, opts=dataclasses.replace(opts, jitter=False), train=False)
    return loss


def build_train_step(graphdef, tx, opts: StepOptions, state_shardings=None, rest_shardings=None):
    """jit(train_step) with donated state, static bcs (one compile per bcs / shape / field count).

    With shardings, the state keeps its layout across steps (out_shardings = in_shardings).
    Usage: step(state, batch, rest, bcs) with bcs a normalized (static, hashable) tuple.
    """
    def fn(state, batch, rest, bcs):
        return train_step(state, batch, rest, graphdef=graphdef, tx=tx, bcs=bcs, opts=opts)

    kw = {}
    if state_shardings is not None:
        kw = dict(in_shardings=(state_shardings, None, rest_shardings), out_shardings=(state_shardings, None))
    return xla_options.jit(fn, static_argnums=(3,), donate_argnums=(0,), **kw)


def build_eval_loss(graphdef, opts: StepOptions):
    return xla_options.jit(functools.partial(eval_loss, graphdef=graphdef, opts=opts), static_argnames=("bcs",))


def device_batch(batch: Mapping[str, Any]) -> tuple[dict, tuple]:
    """Splits a pipeline batch into (arrays for the step, static bcs tuple).

    Drops non-array entries (dataset_name, ...), reads `boundary_conditions` ((n_dims, 2), or
    (B, n_dims, 2) identical across the batch) into a static tuple.
    """
    if "boundary_conditions" not in batch:
        raise KeyError(f"batch has no 'boundary_conditions' entry (keys: {sorted(batch)})")
    bcs = normalize_bcs(np.asarray(batch["boundary_conditions"]))
    out = {}
    for k in BATCH_KEYS + SHARED_KEYS:
        if k in batch and batch[k] is not None:
            out[k] = batch[k]
    for k in ("input_fields", "output_fields", "field_indices"):
        if k not in out:
            raise KeyError(f"batch has no '{k}' entry (keys: {sorted(batch)})")
    if batch.get("jitter") is not None:
        j = batch["jitter"]
        if not isinstance(j, Jitter):
            raise TypeError(f"batch['jitter'] must be a walrus_jax Jitter, got {type(j).__name__}")
        out["jitter"] = j
    return out, bcs
