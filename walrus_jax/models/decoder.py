"""Decoder: two transposed 3-D convolutions back to the padded grid, output columns
chosen by the field labels, with circular handling of periodic axes; then the padding is cropped."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from walrus_jax.models import initializers
from walrus_jax.models.config import ModelConfig
from walrus_jax.models.convolution import SPATIAL3, conv_transpose3d
from walrus_jax.models.full_resolution import decode_output
from walrus_jax.models.layers import RMSGroupNorm, param


class Decoder(nnx.Module):
    """proj1 transposed conv (k2, stride s2, no bias) -> RMSGroupNorm -> SiLU -> proj2 transposed conv
    (k1, stride s1, with bias), output columns [:, field_indices]. Kernels ~ truncated normal with
    std 1/sqrt(k^3 x in); bias 0."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        k1, k2 = cfg.kernel_sizes
        pdt = jnp.dtype(cfg.param_dtype)
        init = initializers.fan_in(-5, -4, -3, -2)  # kernel taps x input channels
        self.cfg = cfg
        self.proj1 = param(init, (k2, k2, k2, cfg.hidden_dim, cfg.intermediate_dim), ("kh", "kw", "kd", "embed", "inter"),
                           dtype=pdt, rngs=rngs)
        self.norm1 = RMSGroupNorm(cfg.intermediate_dim, param_dtype=pdt, rngs=rngs, logical_axis="inter")
        self.proj2 = param(init, (k1, k1, k1, cfg.intermediate_dim, cfg.n_states), ("kh", "kw", "kd", "inter", "vocab"),
                           dtype=pdt, rngs=rngs)
        self.proj2_bias = param(initializers.ZEROS, (cfg.n_states,), ("vocab",), dtype=pdt)

    def __call__(self, z: jax.Array, field_indices: jax.Array, strides, periodic: Sequence[bool], plans,
                 patch_shift) -> jax.Array:
        """z (N, h, w, d, hid) -> (N, H, W, D, C) on the unpadded grid (the padding and the jitter roll
        of `plans` / `patch_shift` undone)."""
        dtype = jnp.dtype(self.cfg.dtype)
        y = conv_transpose3d(z, self.proj1[...], [s[1] for s in strides], periodic, dtype, self.cfg.kernels)
        y = jax.nn.silu(self.norm1(y, SPATIAL3))
        labels = jnp.asarray(field_indices, jnp.int32)
        w2 = jnp.take(self.proj2[...], labels, axis=4)
        return decode_output(y, w2, jnp.take(self.proj2_bias[...], labels), plans, patch_shift,
                             [s[0] for s in strides], periodic, dtype, self.cfg.kernels)
