"""Time attention's core on CPU: the C++ kernels in frame_attention.cc (per token, softmax attention
over its T frames with a relative-position bias), wrapped as a differentiable op.

XLA:CPU ran it as broadcast products and reductions over an (N, T, T, heads, head_dim)
intermediate: ~10 ms of the small configuration's ~26 ms time attention per block, forward, and
~25 ms forward and backward. The kernel keeps each token's T x T logits in registers; the backward
recomputes them instead of saving the probabilities. Same formulas as
`models.attention.frame_attention`'s XLA form, to float32 rounding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from walrus_jax import cpu_kernels
from walrus_jax.cpu_kernels import build

_FORWARD, _BACKWARD = "WjFrameAttentionForward", "WjFrameAttentionBackward"
MAX_FRAMES = 64


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call; see `build`)."""
    return build.load("frame_attention", (_FORWARD, _BACKWARD))


def supports(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> bool:
    """float32 q (N, Tq, heads, head_dim), k and v (N, T, heads, head_dim), T <= 64, bias (heads, Tq, T)."""
    return (q.ndim == 4 and k.shape == v.shape and k.ndim == 4 and q.shape[0] == k.shape[0]
            and q.shape[2:] == k.shape[2:] and q.shape[1] <= k.shape[1] <= MAX_FRAMES
            and bias.shape == (k.shape[2], q.shape[1], k.shape[1])
            and all(a.dtype == jnp.float32 for a in (q, k, v, bias)))



@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def frame_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, causal: bool) -> jax.Array:
    """q (N, Tq, heads, head_dim) (the last Tq frames' queries), k, v (N, T, heads, head_dim),
    bias (heads, Tq, T) float32 -> (N, Tq, heads, head_dim). causal (a lower-triangular mask)
    needs Tq = T. Needs `available()`."""
    return _forward(q, k, v, bias, causal)


def _forward(q, k, v, bias, causal):
    # sequential under vmap: bias has no batch axis in the kernel
    return jax.ffi.ffi_call(_FORWARD, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")(
        q, k, v, bias, causal=np.int64(causal))


def _fwd(q, k, v, bias, causal):
    return _forward(q, k, v, bias, causal), (q, k, v, bias)


def _bwd(causal, residuals, do):
    q, k, v, bias = residuals
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32)
    partial = jax.ShapeDtypeStruct((cpu_kernels.partial_items(q.shape[0]),) + bias.shape, jnp.float32)
    dq, dk, dv, dbias = jax.ffi.ffi_call(_BACKWARD, (spec(q), spec(k), spec(v), partial), vmap_method="sequential")(
        q, k, v, bias, do.astype(jnp.float32), causal=np.int64(causal))
    return dq, dk, dv, jnp.sum(dbias, axis=0)


frame_attention.defvjp(_fwd, _bwd)
