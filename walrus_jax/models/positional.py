"""Positional information: T5 relative-position buckets for time and axial RoPE for space
(docs/original.md). Bucket tables and token positions depend only on static shapes, so they are
computed in numpy at trace time; only the frequencies (possibly learned) are traced."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def t5_buckets(relative_position: np.ndarray, bidirectional: bool, num_buckets: int = 32,
               max_distance: int = 32) -> np.ndarray:
    """T5 bucket of each relative position (key - query), as the original computes it in float32."""
    rel = np.asarray(relative_position, np.int64)
    ret = np.zeros_like(rel)
    n = -rel
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(np.int64) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    with np.errstate(divide="ignore"):
        val = (np.log(n.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
               * np.float32(num_buckets - max_exact))
    val_if_large = max_exact + np.where(is_small, 0, val).astype(np.int64)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large)


def time_bias(table: jax.Array, T: int, causal: bool, num_buckets: int = 32, max_distance: int = 32) -> jax.Array:
    """table (num_buckets, heads) -> additive bias (heads, T, T) [query, key]. The causal mask is
    applied separately (as a boolean mask to the attention call)."""
    q = np.arange(T)[:, None]
    k = np.arange(T)[None, :]
    buckets = t5_buckets(k - q, bidirectional=not causal, num_buckets=num_buckets, max_distance=max_distance)
    return jnp.transpose(table[jnp.asarray(buckets)], (2, 0, 1))


def torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace exactly as torch's CPU kernel rounds it (a float32 step, each value computed
    from the nearer end with a fused multiply-add). numpy's linspace differs in the last bit, which
    moves RoPE angles of up to 128*pi by ~1e-5."""
    if n == 1:
        return np.array([start], np.float32)
    step = np.float64(np.float32((end - start) / (n - 1)))
    i = np.arange(n, dtype=np.float64)
    vals = np.where(i < n // 2, np.float64(start) + step * i, np.float64(end) - step * (n - 1 - i))
    return vals.astype(np.float32)


def rope_base_freqs(head_dim: int, max_freq: float = 256.0) -> np.ndarray:
    """lucidrains "pixel" frequencies: pi * linspace(1, max_freq / 2, (head_dim // 4) // 2)."""
    n_f = (head_dim // 4) // 2
    return (torch_linspace(1.0, max_freq / 2, n_f) * np.float32(math.pi)).astype(np.float32)


def rope_angles(freqs: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
    """Angles (h, w, d, 3 * 2 * n_f) for a token grid, blocks [H, W, D], each frequency repeated for
    its interleaved channel pair. freqs: (n_f,) shared by the axes, or (3, n_f) one per axis.
    Positions along each axis are linspace(-1, 1, n) (a singleton axis sits at -1)."""
    freqs = jnp.asarray(freqs, jnp.float32)
    if freqs.ndim == 1:
        freqs = jnp.broadcast_to(freqs, (3,) + freqs.shape)
    blocks = []
    for a, n in enumerate(grid):
        pos = jnp.asarray(torch_linspace(-1.0, 1.0, n))
        ang = pos[:, None] * freqs[a][None, :]  # (n, n_f)
        ang = jnp.repeat(ang, 2, axis=-1)  # interleaved pairs
        shape = [1, 1, 1, ang.shape[-1]]
        shape[a] = n
        blocks.append(jnp.broadcast_to(ang.reshape(shape), tuple(grid) + (ang.shape[-1],)))
    return jnp.concatenate(blocks, axis=-1)


def rope_tables(angles: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """The multipliers of `apply_rope`: cos and signed sin (L, head_dim), float32, for angles
    (L, n_rot): y = x * cos + swap_pairs(x) * sin, with sin = -sin(angle) at even channels and
    +sin(angle) at odd ones, and cos = 1, sin = 0 on the head_dim - n_rot channels not rotated."""
    L, n_rot = angles.shape
    angles = angles.astype(jnp.float32)
    pad = jnp.zeros((L, head_dim - n_rot), jnp.float32)
    sign = jnp.asarray(np.tile(np.array([-1.0, 1.0], np.float32), n_rot // 2))
    return (jnp.concatenate([jnp.cos(angles), pad + 1.0], axis=-1),
            jnp.concatenate([jnp.sin(angles) * sign, pad], axis=-1))


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotates the first angles.shape[-1] channels of each head in interleaved pairs (2m, 2m+1):
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); the remaining channels pass unchanged.

    Written as x * cos + swap_pairs(x) * signed_sin over the whole head (cos = 1, sin = 0 on the
    unrotated channels), so XLA fuses it into one elementwise pass instead of slicing, stacking and
    concatenating. x: (..., L, heads, head_dim); angles: (L, n_rot). Computed in float32."""
    hd, dtype = x.shape[-1], x.dtype
    cos, sin = (t[:, None, :] for t in rope_tables(angles, hd))
    xf = x.astype(jnp.float32)
    swapped = xf.reshape(xf.shape[:-1] + (hd // 2, 2))[..., ::-1].reshape(xf.shape)  # (x1, x0) per pair
    return (xf * cos + swapped * sin).astype(dtype)
