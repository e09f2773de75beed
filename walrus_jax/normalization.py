"""What goes into the model and what comes out: window formatting, normalization, the object mask.

Training (`training/steps.py`), evaluation and rollouts (`inference/rollouts.py`) all use these, so
the loss and the rollout see the same model inputs and undo the same scaling.

- `format_window`: the variable fields of a window with the constant fields repeated over time.
- `normalize`: asymmetric reversible RMS normalization (the original's SamplewiseRevNormalization):
  inputs are divided by the per-sample, per-channel RMS over (time, space) (clamped below at eps);
  the model predicts a delta normalized by the RMS of the window's consecutive differences. Nothing
  is centered. With a dataset's global statistics instead (fine-tuning as released):
  x / (rms + GLOBAL_EPS) and deltas / (rms_delta + GLOBAL_EPS).
- `next_state`: the next frame from the last predicted delta.
- `mask_from_constants`: the points an object occupies (forced to 0 in every prediction).
All statistics are computed in float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from walrus_jax.errors import DataError

DEFAULT_EPS = 1e-5  # the rollout's / trainer's model_epsilon
GLOBAL_EPS = 1e-8  # with a dataset's global statistics (fine-tuning): x / (rms + eps), deltas / (rms_delta + eps)


def _reduce_axes(x: jax.Array) -> tuple[int, ...]:
    # (B, T, *spatial, C): reduce time and space, keep batch and channel.
    return tuple(range(1, x.ndim - 1))


def _clamped_root(mean_square: jax.Array, eps: float) -> jax.Array:
    """max(sqrt(m), eps), with a finite gradient where m == 0 (a constant field's differences): there
    sqrt's derivative is infinite, and inf * 0 would make every gradient through the statistics NaN."""
    positive = mean_square > 0
    root = jnp.sqrt(jnp.where(positive, mean_square, 1.0))
    return jnp.where(positive, jnp.maximum(root, eps), eps)


def sample_rms(x: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    """x (B, T, *spatial, C) -> (B, 1, *[1]*n_spatial, C): sqrt(mean x^2), clamped below at eps."""
    x = x.astype(jnp.float32)
    return _clamped_root(jnp.mean(jnp.square(x), axis=_reduce_axes(x), keepdims=True), eps)


def delta_rms(x: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    """RMS of the T-1 consecutive differences, same shape as `sample_rms`; 1 when T == 1."""
    x = x.astype(jnp.float32)
    if x.shape[1] < 2:
        return jnp.ones((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],), jnp.float32)
    d = x[:, 1:] - x[:, :-1]
    return _clamped_root(jnp.mean(jnp.square(d), axis=_reduce_axes(d), keepdims=True), eps)


def normalize_window(x: jax.Array, eps: float = DEFAULT_EPS):
    """x (B, T, *spatial, C) -> (x / sample_rms, sample_rms, delta_rms)."""
    s = sample_rms(x, eps)
    return x.astype(jnp.float32) / s, s, delta_rms(x, eps)


def next_state(x_last: jax.Array, y_last: jax.Array, d_rms: jax.Array) -> jax.Array:
    """De-normalizes the last predicted delta: x[last] + y[last] * delta_rms.

    x_last, y_last: (B, *spatial, C); d_rms: (B, 1, *[1]*n_spatial, C) as from `delta_rms`.
    """
    return x_last.astype(jnp.float32) + y_last.astype(jnp.float32) * d_rms[:, 0]


def deltas(window: jax.Array, next_frame: jax.Array) -> jax.Array:
    """Consecutive differences of [window, next_frame]: (B, T, *sp, C), (B, 1, *sp, C) -> (B, T, *sp, C)."""
    full = jnp.concatenate([window, next_frame], axis=1).astype(jnp.float32)
    return full[:, 1:] - full[:, :-1]


def normalized_delta_targets(window: jax.Array, next_frame: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    """Training targets with causal_in_time: for each input frame t the delta to frame
    t+1 (the last one to `next_frame`), divided by the window's delta RMS.

    window (B, T, *spatial, C), next_frame (B, 1, *spatial, C) -> (B, T, *spatial, C).
    """
    return deltas(window, next_frame) / delta_rms(window, eps)


def format_window(input_fields: jax.Array, constant_fields: jax.Array | None) -> jax.Array:
    """(B, T, *sp, C_var) and (B, *sp, C_con) or None -> (B, T, *sp, C_var + C_con) float32, the
    constants repeated over T."""
    if constant_fields is None or constant_fields.shape[-1] == 0:
        return input_fields.astype(jnp.float32)
    c = jnp.broadcast_to(constant_fields[:, None].astype(jnp.float32),
                         (input_fields.shape[0], input_fields.shape[1]) + constant_fields.shape[1:])
    return jnp.concatenate([input_fields.astype(jnp.float32), c], axis=-1)


def normalize(x: jax.Array, eps: float = DEFAULT_EPS, stats=None) -> tuple[jax.Array, jax.Array]:
    """The model input and the delta scale of a formatted window x (B, T, *sp, C).

    stats: None (the window's own RMS statistics, clamped below at eps) or a dataset's global
    (rms, rms_delta), each (C,). Returns (x_n (B, T, *sp, C), d_rms broadcastable to x's frames:
    the factor that turns a normalized delta into a physical one).
    """
    x = x.astype(jnp.float32)
    if stats is None:
        return x / sample_rms(x, eps), delta_rms(x, eps)
    lead = (1,) * (x.ndim - 1)
    rms = jnp.asarray(stats[0], jnp.float32).reshape(lead + (-1,))
    d_rms = jnp.asarray(stats[1], jnp.float32).reshape(lead + (-1,))
    return x / (rms + GLOBAL_EPS), d_rms + GLOBAL_EPS


def mask_from_constants(constant_fields, constant_field_names: Sequence[str]):
    """The original's rule: if a constant field is named exactly "mask", that channel
    (nonzero = True) marks points forced to 0 in every prediction. Returns (B, *spatial) bool or None.

    constant_fields: (B, *spatial, C_con) or (*spatial, C_con) with names (C_con,).
    """
    names = [str(n) for n in constant_field_names]
    if "mask" not in names:
        return None
    if constant_fields is None or np.shape(constant_fields)[-1] != len(names):
        raise DataError(f"constant_field_names {names} name {len(names)} channels but constant_fields has shape "
                        f"{None if constant_fields is None else np.shape(constant_fields)}")
    return np.asarray(constant_fields)[..., names.index("mask")] != 0
