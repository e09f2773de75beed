"""Fused softmax attention on CPU: the C++ kernels in attention.cc, wrapped as a differentiable op.

XLA:CPU computes attention as separate passes over the L x L logits, and its small matrix products
run well below the machine's rate: at the small configuration space attention's core took ~52 ms per
block forward and ~186 ms forward + backward, where a fused kernel keeps each block of logits in
cache. The kernel computes what `blocked_attention` does (float32 logits, softmax, the saved
log-sum-exp and the flash-attention style backward), to float32 rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from walrus_jax.cpu_kernels import build

_FORWARD, _BACKWARD = "WjAttentionForward", "WjAttentionBackward"


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call; see `build`)."""
    return build.load("attention", (_FORWARD, _BACKWARD))


def supports(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """The kernel takes float32 q, k, v of one shape (..., L, heads, head_dim)."""
    return (q.ndim >= 3 and q.shape == k.shape == v.shape
            and all(a.dtype == jnp.float32 for a in (q, k, v)))


def _lse_shape(q):
    *lead, L, H, _ = q.shape
    return (*lead, H, L)


def _forward(q, k, v):
    return jax.ffi.ffi_call(_FORWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                       jax.ShapeDtypeStruct(_lse_shape(q), jnp.float32)),
                            vmap_method="broadcast_all")(q, k, v)


@jax.custom_vjp
def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Non-causal, unbiased softmax attention on CPU. q, k, v float32 (..., L, heads, head_dim) ->
    (..., L, heads, head_dim); leading axes are independent (frames). Needs `available()`."""
    return _forward(q, k, v)[0]


# Names of the saved output and log-sum-exp: a remat policy can keep them (models/processor.py's
# "dots_and_attention") so that the backward pass does not run the forward kernel again.
OUTPUT_NAMES = ("fused_attention_out", "fused_attention_lse")


def _fwd(q, k, v):
    o, lse = _forward(q, k, v)
    o, lse = (checkpoint_name(a, n) for a, n in zip((o, lse), OUTPUT_NAMES))
    return o, (q, k, v, o, lse)


def _bwd(residuals, do):
    q, k, v, o, lse = residuals
    spec = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(_BACKWARD, (spec, spec, spec), vmap_method="broadcast_all")(
        q, k, v, o, lse, do.astype(jnp.float32))


fused_attention.defvjp(_fwd, _bwd)
