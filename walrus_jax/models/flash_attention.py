"""Space attention on TPU: Pallas flash attention (jax's TPU kernel), forward and backward.

Space attention attends over all L tokens of a frame: 1024-1089 for a 2-D 128^2 field, 4096-4913 for
a 3-D 128^3 one. Written as two einsums around a softmax it writes the L x L logits of every head and
frame to HBM (at 4913 tokens, 16 heads and 6 frames that is 9.3 GB per sample, forward alone); the
flash kernel keeps one (block_q, block_k) tile of them in VMEM with an online softmax, and its
backward recomputes them from the saved log-sum-exp.

The kernel wants a token count that is a multiple of its block sizes, so the tokens are zero-padded
to one and the padding is masked through segment ids: real tokens are segment 0, padded ones
segment 1, and a query only sees keys of its own segment. Real queries therefore attend to the real
keys alone (the result is exact), padded queries to the padded keys alone (finite, then cut off; their
gradient is zero). The head dimension (88 in the released model) is passed as it is; the softmax scale
is 1/sqrt(head_dim). Logits and the softmax are float32 for float32 and bf16 inputs alike.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

TOKEN_BLOCKS = (512, 256, 128)  # candidate tile lengths (queries and keys), the TPU's lane multiples


def block_length(length: int) -> int:
    """The tile length for `length` tokens: the largest candidate whose padding adds at most ~5% to
    the smallest candidate's (4913 tokens: 512, padded to 5120; 4096: 512; 1089: 128, padded to 1152)."""
    smallest = TOKEN_BLOCKS[-1]
    least = -(-length // smallest) * smallest
    return next(b for b in TOKEN_BLOCKS if -(-length // b) * b <= 1.05 * least)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Non-causal, unbiased softmax attention. q, k, v (N, L, heads, head_dim) -> (N, L, heads, head_dim)."""
    N, L, H, D = q.shape
    block = block_length(L)
    padded = -(-L // block) * block

    def heads_major(a):  # (N, L, H, D) -> (N, H, padded, D)
        return jnp.pad(jnp.transpose(a, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, padded - L), (0, 0)))

    segments = jnp.broadcast_to((jnp.arange(padded) >= L).astype(jnp.int32), (N, padded))
    sizes = pallas_flash.BlockSizes(
        block_q=block, block_k_major=block, block_k=block, block_b=1,
        block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
        block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
    o = pallas_flash.flash_attention(heads_major(q), heads_major(k), heads_major(v),
                                     segment_ids=pallas_flash.SegmentIds(segments, segments),
                                     sm_scale=float(1.0 / np.sqrt(D)), block_sizes=sizes)
    return jnp.transpose(o[:, :, :L], (0, 2, 1, 3))
