"""Patch jitter: the explicit random draws of one forward pass (docs/original.md, Randomness).

The roll amounts are carried by `Jitter`, a pytree of integer arrays that stays traced under `jit`:
a new draw never recompiles. The shapes they apply to come from walrus_jax.models.patching.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from walrus_jax.models.config import PERIODIC, ModelConfig
from walrus_jax.models.patching import normalize_bcs, pad_bcs3, plan_axes, token_grid


@struct.dataclass
class Jitter:
    """Explicit random draws of one forward pass. A pytree of int32 arrays.

    patch_shift: (3,) roll r applied to the padded input along (H, W, D) (element i -> i + r);
        0 where the axis is singleton or its patch is 1.
    token_shift: (n_blocks, 3) roll of the token grid before block i, per token axis; 0 on
        non-periodic axes. The accumulated roll is undone after the last block.
    Batched pipelines stack these with a leading batch axis; the model takes one (unbatched) Jitter.
    """

    patch_shift: jax.Array
    token_shift: jax.Array

    @classmethod
    def zeros(cls, n_blocks: int) -> "Jitter":
        return cls(jnp.zeros((3,), jnp.int32), jnp.zeros((n_blocks, 3), jnp.int32))


def sample_jitter(key: jax.Array, cfg: ModelConfig, spatial_shape: Sequence[int], bcs) -> Jitter:
    """Draws a Jitter with the original's distributions (works under jit: shapes are static).

    spatial_shape: (H, W) or (H, W, D). bcs: (n_dims, 2).
    patch_shift[a] ~ U{-(half-1), ..., half-1}, half = the high-side zero padding for WALL/OPEN
    axes, or size // 2 for periodic axes; 0 where the patch is 1.
    token_shift[i, a] ~ U{0, ..., n_tokens_a - 1} on axes whose low BC is PERIODIC.
    """
    spatial3 = tuple(spatial_shape) + (1,) * (3 - len(spatial_shape))
    bcs_t = normalize_bcs(bcs, len(spatial_shape))
    plans = plan_axes(spatial3, pad_bcs3(bcs_t), cfg.kernel_sizes, jitter=True)
    tokens = token_grid(plans, cfg.kernel_sizes)
    k_patch, k_tok = jax.random.split(key)
    half = np.array([(p.size // 2 if p.periodic else p.const_pad) if p.rolls else 1 for p in plans], np.int32)
    u = jax.random.randint(k_patch, (3,), -(half - 1), half)
    patch_shift = jnp.where(jnp.asarray([p.rolls for p in plans]), u, 0).astype(jnp.int32)
    periodic = np.array([a < len(bcs_t) and bcs_t[a][0] == PERIODIC for a in range(3)])
    tok = jax.random.randint(k_tok, (cfg.n_blocks, 3), 0, np.asarray(tokens, np.int32))
    token_shift = jnp.where(jnp.asarray(periodic)[None], tok, 0).astype(jnp.int32)
    return Jitter(patch_shift, token_shift)
