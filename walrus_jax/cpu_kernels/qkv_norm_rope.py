"""Query / key LayerNorm (and rotary embedding) of both attentions on CPU: the C++ kernels in
qkv_norm_rope.cc, wrapped as a differentiable op.

XLA:CPU computed the head LayerNorms (reductions over the 48-channel minor axis) and the RoPE pair
swap at ~3 ns per element: ~12 ms of the small configuration's ~95 ms space-attention forward per
block, and ~6 ms of its ~26 ms time attention. The kernel does each head vector in one pass,
forward and backward, with the formulas of `models.layers.HeadLayerNorm` followed by
`models.positional.apply_rope`, to float32 rounding, and hands q, k and v on as contiguous arrays.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from walrus_jax import cpu_kernels
from walrus_jax.cpu_kernels import build

_FORWARD, _BACKWARD = "WjQkvNormRopeForward", "WjQkvNormRopeBackward"
MAX_HEAD_DIM = 256


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call; see `build`)."""
    return build.load("qkv_norm_rope", (_FORWARD, _BACKWARD))


def supports(qkv: jax.Array, scale: jax.Array, bias: jax.Array, heads_major: bool = False) -> bool:
    """The kernel takes float32 qkv (..., L, 3, heads, head_dim), or (..., L, heads, 3, head_dim)
    with heads_major, head_dim even and at most 256, and float32 LayerNorm weights."""
    return (qkv.ndim >= 4 and qkv.shape[-2 if heads_major else -3] == 3 and qkv.shape[-1] % 2 == 0
            and qkv.shape[-1] <= MAX_HEAD_DIM and all(a.dtype == jnp.float32 for a in (qkv, scale, bias)))


def _out_shape(qkv, heads_major):
    heads = qkv.shape[-3] if heads_major else qkv.shape[-2]
    return jax.ShapeDtypeStruct(qkv.shape[:-3] + (heads, qkv.shape[-1]), jnp.float32)


def _forward(qkv, scale, bias, cos, sin, heads_major):
    out = _out_shape(qkv, heads_major)
    # sequential under vmap: the kernel reads cos / sin per token and has no batch axis for them
    return jax.ffi.ffi_call(_FORWARD, (out, out, out), vmap_method="sequential")(
        qkv, scale, bias, cos, sin, heads_major=np.int64(heads_major))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def qkv_norm_rope(qkv: jax.Array, scale: jax.Array, bias: jax.Array, cos: jax.Array, sin: jax.Array,
                  heads_major: bool = False):
    """qkv (..., L, 3, heads, head_dim) float32 [q, k, v], or (..., L, heads, 3, head_dim) with
    heads_major. scale, bias (2, head_dim): LayerNorm weight and bias (eps 1e-5), row 0 for q,
    row 1 for k. cos, sin (L, head_dim): the rotary tables of `models.positional.rope_tables` (sin
    signed; ones and zeros for no rotation); they get no gradient (fixed frequencies only).
    -> q, k, v (..., L, heads, head_dim): q and k normalised and rotated, v as given. Needs `available()`."""
    return _forward(qkv, scale, bias, cos, sin, heads_major)


def _fwd(qkv, scale, bias, cos, sin, heads_major):
    return _forward(qkv, scale, bias, cos, sin, heads_major), (qkv, scale, cos, sin)



def _bwd(heads_major, residuals, cotangents):
    qkv, scale, cos, sin = residuals
    dq, dk, dv = (c.astype(jnp.float32) for c in cotangents)
    rows = int(np.prod(qkv.shape[:-3]))
    partial = jax.ShapeDtypeStruct((cpu_kernels.partial_items(rows), 2, 2, qkv.shape[-1]), jnp.float32)
    dqkv, part = jax.ffi.ffi_call(_BACKWARD, (jax.ShapeDtypeStruct(qkv.shape, jnp.float32), partial),
                                  vmap_method="sequential")(qkv, scale, cos, sin, dq, dk, dv,
                                                            heads_major=np.int64(heads_major))
    sums = jnp.sum(part, axis=0)  # (2, 2, head_dim): [scale, bias] x [q, k]
    return dqkv, sums[0], sums[1], jnp.zeros_like(cos), jnp.zeros_like(sin)


qkv_norm_rope.defvjp(_fwd, _bwd)
