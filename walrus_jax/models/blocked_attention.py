"""Softmax attention computed one (frame, head, query block) at a time: space attention in CPU programs
without the C++ kernel, and float32 space attention on CUDA GPUs (cuDNN's flash attention has no
float32; models/kernels.py).

Space attention over a frame's L tokens builds L x L logits per head (1024^2 for a 128^2 field, 32768^2
for a 128^3 one). Materialising all of them at once, as two einsums around a softmax do, makes the
softmax stream N * heads * L^2 float32 values through main memory several times (300 MB per block
for the medium configuration): on a CPU that, not the matrix products, sets the pace. Here a
`lax.map` walks over the (frame, head) pairs, and within a pair over query blocks; each step computes

    logits = (q_blk * scale) @ k^T        (Q, L), small enough to stay in cache
    e      = exp(logits - rowmax)
    out    = (e @ v) / rowsum(e)           normalisation after the product: one pass fewer over e

with plain 2-D matrix products: XLA:CPU runs a 2-D product at several times the rate of the same work
as a product batched over frames (~1.5x faster attention overall at the small configuration). The
working set of a step is Q * L floats (`block_bytes`), whatever L is. Every key is seen in one step,
so this is the ordinary softmax (no online rescaling); it differs from the materialised version only
by float32 rounding (~1e-7 relative). The frame axis is walked by the map, so under data-parallel
sharding of N XLA gathers q, k, v first; the results are the same.

The backward pass is written out (flash-attention style, `_attend_bwd`): it keeps one log-sum-exp
per query row instead of every block's probabilities, and recomputes them block by block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# float32 products in float32 (this form also serves float32 attention on GPUs, whose default
# precision would round operands to tf32; CPUs ignore the setting).
_HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_BLOCK_BYTES = 8 * 2**20  # float32 logits per step; ~the L2+L3 share of one core on common CPUs


def query_block_size(n: int, length: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Query rows per step: n * rows * length float32 logits fit in `block_bytes` (at least 8 rows, at
    most `length`), then evened out over the blocks so the last one is padded by fewer than n_blocks rows."""
    rows = max(8, block_bytes // (4 * n * length))
    if rows >= length:
        return length
    n_blocks = -(-length // rows)
    return -(-length // n_blocks)  # equal blocks, the last padded by < n_blocks rows


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> jax.Array:
    """Non-causal, unbiased softmax attention. q, k, v (N, L, heads, head_dim) -> (N, L, heads, head_dim).

    Logits, softmax and the row sums are float32; the probabilities are cast to v's dtype for the
    second product (as the materialised path does)."""
    N, L, H, D = q.shape
    if k.shape != (N, L, H, D) or v.shape != (N, L, H, D):
        raise ValueError(f"blocked_attention needs q, k, v of one shape (N, L, heads, head_dim); got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    rows = query_block_size(1, L, block_bytes)
    n_blk = -(-L // rows)
    pairs = lambda a: jnp.transpose(a, (0, 2, 1, 3)).reshape(N * H, L, D)  # one (frame, head) per row
    qp, kp, vp = pairs(q), pairs(k), pairs(v)
    if n_blk * rows != L:
        qp = jnp.pad(qp, ((0, 0), (0, n_blk * rows - L), (0, 0)))  # padded rows are discarded
    o = _attend(qp.reshape(N * H, n_blk, rows, D), kp, vp)  # (N * H, n_blk, rows, D)
    o = o.reshape(N, H, n_blk * rows, D)[:, :, :L]
    return jnp.transpose(o, (0, 2, 1, 3))


def _scale(d: int, dtype):
    return np.float32(1.0 / np.sqrt(d)).astype(dtype)


def _logits(q_blk, k):
    """(rows, D) x (L, D) -> float32 (rows, L) scaled logits, and the scaled queries."""
    qs = q_blk * _scale(q_blk.shape[-1], q_blk.dtype)
    return jnp.dot(qs, k.T, preferred_element_type=jnp.float32, precision=_HIGHEST), qs


def _row_max(logits):
    """max over the last axis. XLA:CPU lowers a row reduction through a windowed reduction that ran
    at ~1/3 of the exponential pass's speed (the largest single cost of the small forward pass);
    folding the row in halves with elementwise maxima first is ~25% faster attention, same value."""
    while logits.shape[-1] > 16 and logits.shape[-1] % 2 == 0:
        half = logits.shape[-1] // 2
        logits = jnp.maximum(logits[..., :half], logits[..., half:])
    return jnp.max(logits, axis=-1)


def _forward(qb, kp, vp):
    """o (P, n_blk, rows, D) and the float32 log-sum-exp of each query row (P, n_blk, rows), which
    the backward pass needs; P = frames x heads."""

    def pair(args):
        q_blocks, k, v = args

        def block(q_blk):
            logits, _ = _logits(q_blk, k)
            row_max = _row_max(logits)
            e = jnp.exp(logits - row_max[:, None])
            row_sum = jnp.sum(e, axis=-1)
            out = jnp.dot(e.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=_HIGHEST)
            # Normalised after the product: one pass fewer over e.
            return (out / row_sum[:, None]).astype(v.dtype), row_max + jnp.log(row_sum)

        if q_blocks.shape[0] == 1:  # no loop of one trip
            return jax.tree.map(lambda a: a[None], block(q_blocks[0]))
        return jax.lax.map(block, q_blocks)

    return jax.lax.map(pair, (qb, kp, vp))


@jax.custom_vjp
def _attend(qb, kp, vp):
    return _forward(qb, kp, vp)[0]


def _attend_fwd(qb, kp, vp):
    o, lse = _forward(qb, kp, vp)
    return o, (qb, kp, vp, o, lse)


def _attend_bwd(residuals, do):
    """Recomputes each block's probabilities from the saved log-sum-exp instead of storing all of
    them (N * heads * L^2 floats): p = exp(logits - lse), dv += p^T do, ds = p * (do v^T - rowsum(do o)),
    dq = scale * ds k, dk += ds^T (scale q). A map over (frame, head) pairs, a scan over the pair's
    query blocks carrying float32 dk, dv; padded query rows have do = 0 and contribute nothing."""
    qb, kp, vp, o, lse = residuals
    L, D = kp.shape[1:]
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # (P, n_blk, rows)

    def pair(args):
        q_blocks, do_blocks, lse_blocks, delta_blocks, k, v = args

        def step(carry, xs):
            dk, dv = carry
            q_blk, do_blk, lse_blk, delta_blk = xs
            logits, qs = _logits(q_blk, k)
            p = jnp.exp(logits - lse_blk[:, None])
            dv = dv + jnp.dot(p.astype(do_blk.dtype).T, do_blk, preferred_element_type=jnp.float32, precision=_HIGHEST)
            dp = jnp.dot(do_blk, v.T, preferred_element_type=jnp.float32, precision=_HIGHEST)
            ds = p * (dp - delta_blk[:, None])
            dq = jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32, precision=_HIGHEST)
            dk = dk + jnp.dot(ds.astype(qs.dtype).T, qs, preferred_element_type=jnp.float32, precision=_HIGHEST)
            return (dk, dv), (dq * _scale(D, jnp.float32)).astype(q_blk.dtype)

        zeros = jnp.zeros((L, D), jnp.float32)
        if q_blocks.shape[0] == 1:  # no loop of one trip
            (dk, dv), dq = step((zeros, zeros), (q_blocks[0], do_blocks[0], lse_blocks[0], delta_blocks[0]))
            dq = dq[None]
        else:
            (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), (q_blocks, do_blocks, lse_blocks, delta_blocks))
        return dq, dk.astype(k.dtype), dv.astype(v.dtype)

    return jax.lax.map(pair, (qb, do, lse, delta, kp, vp))


_attend.defvjp(_attend_fwd, _attend_bwd)
