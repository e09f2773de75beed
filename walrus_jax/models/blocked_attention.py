"""Softmax attention computed one (head, query block) at a time: the CPU path of space attention.

Space attention over a frame's L tokens builds L x L logits per head (1024^2 for a 128^2 field, 32768^2
for a 128^3 one). Materialising all of them at once, as two einsums around a softmax do, makes the
softmax stream N * heads * L^2 float32 values through main memory several times (300 MB per block
for the medium configuration): on a CPU that, not the matrix products, sets the pace. Here a
`lax.map` walks over (head, query block) pairs and each step computes

    logits = (q_blk * scale) @ k^T        (N, Q, L), small enough to stay in cache
    e      = exp(logits - rowmax)
    out    = (e @ v) / rowsum(e)           normalisation after the product: one pass fewer over e

so the working set of a step is N * Q * L floats (`block_bytes`), whatever L is. Every key is seen in
one step, so this is the ordinary softmax (no online rescaling); it differs from the materialised
version only by float32 rounding (~1e-7 relative). The batch axis N stays an array axis inside each
step, so data-parallel sharding of N is untouched.

Gradients flow through `lax.map` by ordinary autodiff.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
    rows = query_block_size(N, L, block_bytes)
    n_blk = -(-L // rows)
    scale = np.float32(1.0 / np.sqrt(D))
    # Heads first: step i reads head i // n_blk of k and v and query block i % n_blk of q.
    qh = jnp.transpose(q, (2, 0, 1, 3))  # (H, N, L, D)
    kh = jnp.transpose(k, (2, 0, 1, 3))
    vh = jnp.transpose(v, (2, 0, 1, 3))
    if n_blk * rows != L:
        qh = jnp.pad(qh, ((0, 0), (0, 0), (0, n_blk * rows - L), (0, 0)))  # padded rows are discarded
    qb = jnp.transpose(qh.reshape(H, N, n_blk, rows, D), (0, 2, 1, 3, 4)).reshape(H * n_blk, N, rows, D)
    head = jnp.repeat(jnp.arange(H, dtype=jnp.int32), n_blk)

    def step(args):
        q_blk, h = args
        k_h, v_h = kh[h], vh[h]  # (N, L, D)
        logits = jnp.einsum("nqd,nkd->nqk", q_blk * scale.astype(q_blk.dtype), k_h,
                            preferred_element_type=jnp.float32)
        e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        out = jnp.einsum("nqk,nkd->nqd", e.astype(v_h.dtype), v_h, preferred_element_type=jnp.float32)
        return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)

    o = jax.lax.map(step, (qb, head))  # (H * n_blk, N, rows, D)
    o = jnp.transpose(o.reshape(H, n_blk, N, rows, D), (2, 1, 3, 0, 4)).reshape(N, n_blk * rows, H, D)
    return o[:, :L]
