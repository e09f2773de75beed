"""Space attention's query / key LayerNorm and rotary embedding on CPU: the C++ kernels in
qk_norm_rope.cc, wrapped as a differentiable op.

XLA:CPU computed the two head LayerNorms (reductions over the 48-channel minor axis) and the RoPE
pair swap at ~3 ns per element: ~12 ms of the small configuration's ~95 ms space-attention forward
per block. The kernel does each head vector in one pass, forward and backward, with the same
formulas as `models.layers.HeadLayerNorm` followed by `models.positional.apply_rope`, to float32
rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from walrus_jax.cpu_kernels import build

_FORWARD, _BACKWARD = "WjQkNormRopeForward", "WjQkNormRopeBackward"
MAX_HEAD_DIM = 256


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call; see `build`)."""
    return build.load("qk_norm_rope", (_FORWARD, _BACKWARD))


def supports(qk: jax.Array, scale: jax.Array, bias: jax.Array) -> bool:
    """The kernel takes float32 qk (..., L, 2, heads, head_dim), head_dim even and at most 256, and
    float32 LayerNorm weights."""
    return (qk.ndim >= 4 and qk.shape[-3] == 2 and qk.shape[-1] % 2 == 0 and qk.shape[-1] <= MAX_HEAD_DIM
            and all(a.dtype == jnp.float32 for a in (qk, scale, bias)))


def _n_items(rows: int) -> int:
    return min(rows, 64)  # as n_items in qk_norm_rope.cc: the backward's partial sums


def _forward(qk, scale, bias, cos, sin):
    out = jax.ShapeDtypeStruct(qk.shape[:-3] + qk.shape[-2:], jnp.float32)
    return jax.ffi.ffi_call(_FORWARD, (out, out), vmap_method="sequential")(qk, scale, bias, cos, sin)


@jax.custom_vjp
def qk_norm_rope(qk: jax.Array, scale: jax.Array, bias: jax.Array, cos: jax.Array, sin: jax.Array):
    """qk (..., L, 2, heads, head_dim) float32: [..., 0, :, :] the queries, [..., 1, :, :] the keys.
    scale, bias (2, head_dim): LayerNorm weight and bias (eps 1e-5), row 0 for q, row 1 for k.
    cos, sin (L, head_dim): the rotary tables of `models.positional.rope_tables` (sin signed, 1 and
    0 on channels that are not rotated); they get no gradient (fixed frequencies only).
    -> q, k (..., L, heads, head_dim). Needs `available()`."""
    return _forward(qk, scale, bias, cos, sin)


def _fwd(qk, scale, bias, cos, sin):
    return _forward(qk, scale, bias, cos, sin), (qk, scale, cos, sin)


def _bwd(residuals, cotangents):
    qk, scale, cos, sin = residuals
    dq, dk = (c.astype(jnp.float32) for c in cotangents)
    rows = 1
    for n in qk.shape[:-3]:
        rows *= n
    partial = jax.ShapeDtypeStruct((_n_items(rows), 2, 2, qk.shape[-1]), jnp.float32)
    dqk, part = jax.ffi.ffi_call(_BACKWARD, (jax.ShapeDtypeStruct(qk.shape, jnp.float32), partial),
                                 vmap_method="sequential")(qk, scale, cos, sin, dq, dk)
    sums = jnp.sum(part, axis=0)  # (2, 2, head_dim): [scale, bias] x [q, k]
    return dqk, sums[0], sums[1], jnp.zeros_like(cos), jnp.zeros_like(sin)


qk_norm_rope.defvjp(_fwd, _bwd)
