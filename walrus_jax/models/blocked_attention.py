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

The backward pass is written out (flash-attention style, `_attend_bwd`): it keeps one log-sum-exp
per query row instead of every block's probabilities, and recomputes them block by block.
"""
from __future__ import annotations

import functools

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
    # Heads first; queries cut into blocks: step i of the forward map is head i // n_blk, block i % n_blk.
    qh = jnp.transpose(q, (2, 0, 1, 3))  # (H, N, L, D)
    kh = jnp.transpose(k, (2, 0, 1, 3))
    vh = jnp.transpose(v, (2, 0, 1, 3))
    if n_blk * rows != L:
        qh = jnp.pad(qh, ((0, 0), (0, 0), (0, n_blk * rows - L), (0, 0)))  # padded rows are discarded
    qb = jnp.transpose(qh.reshape(H, N, n_blk, rows, D), (0, 2, 1, 3, 4)).reshape(H * n_blk, N, rows, D)
    o = _attend(qb, kh, vh, n_blk)  # (H * n_blk, N, rows, D)
    o = jnp.transpose(o.reshape(H, n_blk, N, rows, D), (2, 1, 3, 0, 4)).reshape(N, n_blk * rows, H, D)
    return o[:, :L]


def _block_logits(q_blk, k_h):
    """(N, rows, D) x (N, L, D) -> float32 (N, rows, L) scaled logits, and the scaled queries."""
    qs = q_blk * np.float32(1.0 / np.sqrt(q_blk.shape[-1])).astype(q_blk.dtype)
    return jnp.einsum("nqd,nkd->nqk", qs, k_h, preferred_element_type=jnp.float32), qs


def _forward(qb, kh, vh, n_blk):
    """The map over (head, query block). Returns o (H * n_blk, N, rows, D) and the float32
    log-sum-exp of each query row (H * n_blk, N, rows), which the backward pass needs."""
    head = jnp.repeat(jnp.arange(kh.shape[0], dtype=jnp.int32), n_blk)

    def step(args):
        q_blk, h = args
        logits, _ = _block_logits(q_blk, kh[h])
        row_max = jnp.max(logits, axis=-1)
        e = jnp.exp(logits - row_max[..., None])
        row_sum = jnp.sum(e, axis=-1)
        out = jnp.einsum("nqk,nkd->nqd", e.astype(vh.dtype), vh[h], preferred_element_type=jnp.float32)
        # Normalised after the product: one pass fewer over e.
        return (out / row_sum[..., None]).astype(vh.dtype), row_max + jnp.log(row_sum)

    return jax.lax.map(step, (qb, head))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attend(qb, kh, vh, n_blk):
    return _forward(qb, kh, vh, n_blk)[0]


def _attend_fwd(qb, kh, vh, n_blk):
    o, lse = _forward(qb, kh, vh, n_blk)
    return o, (qb, kh, vh, o, lse)


def _attend_bwd(n_blk, residuals, do):
    """Recomputes each block's probabilities from the saved log-sum-exp instead of storing all of
    them (N * heads * L^2 floats): p = exp(logits - lse), dv += p^T do, ds = p * (do v^T - rowsum(do o)),
    dq = scale * ds k, dk += ds^T (scale q). A map over heads, a scan over that head's query blocks
    carrying float32 dk, dv; padded query rows have do = 0 and contribute nothing."""
    qb, kh, vh, o, lse = residuals
    H, N, L, D = kh.shape
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # (H * n_blk, N, rows)
    per_head = lambda x: x.reshape((H, n_blk) + x.shape[1:])

    def head(args):
        q_h, do_h, lse_h, delta_h, k_h, v_h = args

        def step(carry, xs):
            dk, dv = carry
            q_blk, do_blk, lse_blk, delta_blk = xs
            logits, qs = _block_logits(q_blk, k_h)
            p = jnp.exp(logits - lse_blk[..., None])
            dv = dv + jnp.einsum("nqk,nqd->nkd", p.astype(do_blk.dtype), do_blk, preferred_element_type=jnp.float32)
            dp = jnp.einsum("nqd,nkd->nqk", do_blk, v_h, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_blk[..., None])
            dq = jnp.einsum("nqk,nkd->nqd", ds.astype(k_h.dtype), k_h, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("nqk,nqd->nkd", ds.astype(qs.dtype), qs, preferred_element_type=jnp.float32)
            return (dk, dv), (dq * np.float32(1.0 / np.sqrt(D))).astype(q_blk.dtype)

        zeros = jnp.zeros((N, L, D), jnp.float32)
        (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), (q_h, do_h, lse_h, delta_h))
        return dq, dk.astype(k_h.dtype), dv.astype(v_h.dtype)

    dq, dk, dv = jax.lax.map(head, (per_head(qb), per_head(do), per_head(lse), per_head(delta), kh, vh))
    return dq.reshape(qb.shape), dk, dv


_attend.defvjp(_attend_fwd, _attend_bwd)
