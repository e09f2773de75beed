"""Space-bag encoder: the two strided 3-D convolutions that turn the padded, flagged fields
into tokens, with the kernel columns chosen by the field labels."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from walrus_jax.models import initializers
from walrus_jax.models.config import FLAG_LABELS, ModelConfig
from walrus_jax.models.convolution import SPATIAL3, conv3d, fold_singleton_axes
from walrus_jax.models.full_resolution import encode_input
from walrus_jax.models.layers import RMSGroupNorm, param

class SpaceBagEncoder(nnx.Module):
    """proj1 (k1,k1,k1, n_states, inter) -> RMSGroupNorm -> SiLU -> proj2 (k2,k2,k2, inter, hid)
    -> RMSGroupNorm -> SiLU. No biases. Kernels ~ truncated normal, std 1/sqrt(k^3 x in)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        k1, k2 = cfg.kernel_sizes
        pdt = jnp.dtype(cfg.param_dtype)
        init = initializers.fan_in(-5, -4, -3, -2)  # kernel taps x input channels
        self.cfg = cfg
        self.proj1 = param(init, (k1, k1, k1, cfg.n_states, cfg.intermediate_dim), ("kh", "kw", "kd", "vocab", "inter"),
                           dtype=pdt, rngs=rngs)
        self.norm1 = RMSGroupNorm(cfg.intermediate_dim, param_dtype=pdt, rngs=rngs, logical_axis="inter")
        self.proj2 = param(init, (k2, k2, k2, cfg.intermediate_dim, cfg.hidden_dim), ("kh", "kw", "kd", "inter", "embed"),
                           dtype=pdt, rngs=rngs)
        self.norm2 = RMSGroupNorm(cfg.hidden_dim, param_dtype=pdt, rngs=rngs)

    def __call__(self, x: jax.Array, field_indices: jax.Array, scale: jax.Array, plans, bcs3, patch_shift,
                 strides) -> jax.Array:
        """x (N, H, W, D, C) unpadded fields; field_indices (C,) (may be traced); scale () multiplies the
        fields; plans / bcs3 / patch_shift as `patching.pad_and_flag`; strides ((s1, s2),) * 3 ->
        tokens (N, h, w, d, hid), post-SiLU."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        n_fields = x.shape[-1]
        labels = jnp.concatenate([jnp.asarray(field_indices, jnp.int32), jnp.asarray(FLAG_LABELS, jnp.int32)])
        w1 = jnp.take(self.proj1[...], labels, axis=3)
        # The original's "hack to match older weights": scale the field and bias columns, not wall/open.
        col_scale = jnp.concatenate([jnp.full((n_fields + 1,), math.sqrt((cfg.n_states - 3) / n_fields), w1.dtype),
                                     jnp.ones((2,), w1.dtype)])
        w1 = w1 * col_scale[:, None]
        spatial = tuple(p.padded for p in plans)
        w1 = fold_singleton_axes(w1, spatial, jnp.sum)
        s1 = [1 if n == 1 else s[0] for n, s in zip(spatial, strides)]
        y = encode_input(x, w1, scale, plans, bcs3, patch_shift, s1, dtype, cfg.kernels)
        y = jax.nn.silu(self.norm1(y, SPATIAL3))
        spatial = y.shape[1:4]
        w2 = fold_singleton_axes(self.proj2[...], spatial, jnp.sum)
        s2 = [1 if n == 1 else s[1] for n, s in zip(spatial, strides)]
        return jax.nn.silu(self.norm2(conv3d(y, w2, s2, dtype, cfg.kernels), SPATIAL3))
