"""Decoder (SPEC §9): two transposed 3-D convolutions back to the padded grid, output columns
chosen by the field labels, with circular handling of periodic axes."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from walrus_jax.models.config import ModelConfig
from walrus_jax.models.encoder import DIMS, SPATIAL3, fold_singleton_axes
from walrus_jax.models.layers import RMSGroupNorm


def conv_transpose3d(x: jax.Array, w: jax.Array, strides: Sequence[int], periodic: Sequence[bool], dtype) -> jax.Array:
    """PyTorch ConvTranspose3d (no padding) on channels-last data, with the original's periodic
    wrap: on a periodic, non-singleton axis the input is padded circularly by p = (k - s) // s
    tokens and p * s samples are cropped from each side of the output.

    The original crops k - s instead of p * s, which is the same whenever s divides k - s and
    loses 4 samples for kernel 8 / stride 6 (SPEC §9). walrus_jax uses p * s (the fix).

    x (N, n1, n2, n3, I), w (k1, k2, k3, I, O) -> (N, (n - 1) * s + k per axis, O).
    Singleton axes use the kernel averaged over that axis and stride 1.
    """
    spatial = x.shape[1:4]
    w = fold_singleton_axes(w, spatial, jnp.mean)
    s_eff, pads = [], []
    for a, n in enumerate(spatial):
        s = 1 if n == 1 else strides[a]
        s_eff.append(s)
        pads.append((w.shape[a] - s) // s if (periodic[a] and n > 1) else 0)
    if any(pads):
        x = jnp.pad(x, [(0, 0)] + [(p, p) for p in pads] + [(0, 0)], mode="wrap")
    # A transposed convolution is the forward convolution of the stride-dilated input with the
    # spatially flipped kernel and full padding.
    wf = jnp.flip(w, axis=(0, 1, 2))
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), wf.astype(dtype), (1, 1, 1), [(k - 1, k - 1) for k in w.shape[:3]],
        lhs_dilation=tuple(s_eff), dimension_numbers=DIMS)
    if any(pads):
        sl = [slice(None)] + [slice(p * s, y.shape[1 + a] - p * s) for a, (p, s) in enumerate(zip(pads, s_eff))]
        y = y[tuple(sl) + (slice(None),)]
    return y


class Decoder(nnx.Module):
    """proj1 transposed conv (k2, stride s2, no bias) -> RMSGroupNorm -> SiLU -> proj2 transposed conv
    (k1, stride s1, with bias), output columns [:, field_indices]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        k1, k2 = cfg.kernel_sizes
        pdt = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2, 3), out_axis=4)
        self.cfg = cfg
        self.proj1 = nnx.Param(init(rngs.params(), (k2, k2, k2, cfg.hidden_dim, cfg.intermediate_dim), pdt),
                               logical_axes=("kh", "kw", "kd", "embed", "inter"))
        self.norm1 = RMSGroupNorm(cfg.intermediate_dim, param_dtype=pdt, rngs=rngs, logical_axis="inter")
        self.proj2 = nnx.Param(init(rngs.params(), (k1, k1, k1, cfg.intermediate_dim, cfg.n_states), pdt),
                               logical_axes=("kh", "kw", "kd", "inter", "vocab"))
        self.proj2_bias = nnx.Param(jnp.zeros((cfg.n_states,), pdt), logical_axes=("vocab",))

    def __call__(self, z: jax.Array, field_indices: jax.Array, strides, periodic: Sequence[bool]) -> jax.Array:
        """z (N, h, w, d, hid) -> (N, H', W', D', C) on the padded grid."""
        dtype = jnp.dtype(self.cfg.dtype)
        y = conv_transpose3d(z, self.proj1[...], [s[1] for s in strides], periodic, dtype)
        y = jax.nn.silu(self.norm1(y, SPATIAL3))
        labels = jnp.asarray(field_indices, jnp.int32)
        w2 = jnp.take(self.proj2[...], labels, axis=4)
        y = conv_transpose3d(y, w2, [s[0] for s in strides], periodic, dtype)
        return y + jnp.take(self.proj2_bias[...], labels).astype(y.dtype)
