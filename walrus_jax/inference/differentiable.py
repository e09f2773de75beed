"""Rollouts as pure, differentiable functions: gradients of a late state with respect to the initial
condition, the constant fields or the weights, through tens to hundreds of autoregressive steps.

    f = wj.rollout_fn(model, field_indices=fi, bcs=bcs, n_steps=100)
    preds = f(input_fields)                                  # == wj.rollout(..., jitter=None)
    g = jax.grad(lambda x: loss(f(x)))(input_fields)         # initial condition
    g = jax.grad(lambda c: loss(f(x, c)))(constant_fields)   # constant fields
    g = nnx.grad(lambda m: loss(wj.rollout_fn(m, ...)(x)))(model)   # weights

Each step is the one `wj.rollout` takes (`rollouts.predict_next`: normalize, model, de-normalize,
mask, slide the window), without jitter, host-side chunking or finiteness checks.

Memory. Differentiated naively, a scan keeps every step's activations for the backward pass, so
memory grows with n_steps times one step's activations. `checkpoint` chooses what is kept instead:

- ``"sqrt"`` (default): two-level checkpointing. The steps run as ceil(n / k) segments of k =
  ceil(sqrt(n)) steps; the forward pass keeps only each segment's input window; the backward pass
  reruns one segment at a time, keeping its k windows, and reruns each step's forward just before
  its backward. Memory: (n / k + k) ~ 2 sqrt(n) windows plus one step's activations; compute: about
  three forward passes plus one backward per step.
- ``"step"``: every step is rematerialised from its input window: n windows plus one step's
  activations (windows are small beside activations: a (B, T_in, *spatial, C) array against the
  model's (B, T_in, tokens, hidden) per block); two forwards plus one backward per step.
- ``"none"``: everything is kept (fastest; for short rollouts).

Within a step, what the model keeps for that step's own backward pass is its remat policy:
`remat="full"` (default) keeps each block's input only, so the backward pass holds little more than
the forward pass (S preset, 2-D 128², 100 steps, "sqrt": 2.7x the forward rollout's memory, against
6.5x with the model's activations all kept); None keeps the model's own `ModelConfig.remat`.
Values never depend on either choice.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from walrus_jax.inference import rollouts
from walrus_jax.models.walrus import Walrus, with_settings

CHECKPOINT_CHOICES = ("sqrt", "step", "none")


def segment_length(n_steps: int, checkpoint: str) -> int:
    """Steps per checkpointed segment: ceil(sqrt(n)) for "sqrt", 1 for "step", n for "none"."""
    if checkpoint == "sqrt":
        return max(1, math.ceil(math.sqrt(n_steps)))
    return 1 if checkpoint == "step" else n_steps


def rollout_fn(model, *, field_indices, bcs, n_steps: int, constant_fields=None, padded_field_mask=None,
               mask=None, normalization_stats=None, eps: float = rollouts.DEFAULT_EPS,
               checkpoint: str = "sqrt", remat: str | None = "full") -> Callable:
    """A pure function `f(input_fields, constant_fields=<the given ones>) -> preds`.

    input_fields (B, T_in, *spatial, C_var) physical units; constant_fields (B, *spatial, C_con) or
    None; preds (B, n_steps, *spatial, C_var) float32, the numbers of `wj.rollout(model, ...,
    jitter=None)`. field_indices, bcs, padded_field_mask, mask, normalization_stats and eps as in
    `wj.rollout`. `checkpoint`: what the backward pass keeps across steps; `remat`: within a step
    (the model's remat policy, None: the model's own; module doc).

    `f` works under jax.grad / jax.vjp / jax.jit / jax.vmap. The model's weights are read when `f`
    is called (not when it is built), so `f` follows later updates of the model, and a model
    differentiated with nnx.grad (build `f` inside the differentiated function) carries its
    gradient through. Under a plain `jax.jit(f)` the weights are constants of the program; to pass
    them as arguments, jit a function of the model (nnx.jit) that builds and calls `f`.
    """
    if checkpoint not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint={checkpoint!r} not in {CHECKPOINT_CHOICES}")
    n_steps = int(n_steps)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    default_consts = constant_fields
    stats = None
    if normalization_stats is not None:
        n_channels = len(np.asarray(field_indices).reshape(-1))
        stats = rollouts._global_stats(normalization_stats, n_channels)
    k = segment_length(n_steps, checkpoint)

    def f(input_fields, constant_fields=default_consts):
        st, consts, msk, pmask, _, _ = rollouts._prepare(
            model, input_fields, field_indices, bcs, n_steps, constant_fields, padded_field_mask, mask,
            None, None, eps, 1, False)
        m = with_settings(model, remat=remat) if isinstance(model, Walrus) and remat is not None else model
        graphdef, state = nnx.split(m) if isinstance(m, nnx.Module) else (None, None)
        get_model = (lambda: nnx.merge(graphdef, state, copy=True)) if graphdef is not None else (lambda: m)
        step = rollouts._scan_body(get_model, st, input_fields, consts, msk, pmask, None, None, None, stats)

        def one_step(carry, _):
            carry, (nxt, _finite) = step(carry, None)
            return carry, nxt

        if checkpoint != "none":
            one_step = jax.checkpoint(one_step, prevent_cse=False)

        def segment(carry, length: int):
            return jax.lax.scan(one_step, carry, None, length=length)

        carry = (jnp.asarray(input_fields, jnp.float32), jnp.zeros((), jnp.int32))
        if k >= n_steps or k == 1:
            _, preds = segment(carry, n_steps)
        else:
            n_full, rest = divmod(n_steps, k)
            run = jax.checkpoint(segment, static_argnums=(1,), prevent_cse=False)
            carry, ys = jax.lax.scan(lambda c, _: run(c, k), carry, None, length=n_full)
            preds = ys.reshape((n_full * k,) + ys.shape[2:])  # (n_full, k, B, ...) -> (n_full * k, B, ...)
            if rest:
                _, tail = segment(carry, rest)
                preds = jnp.concatenate([preds, tail], axis=0)
        return jnp.moveaxis(preds, 0, 1)  # (n, B, ...) -> (B, n, ...)

    return f
