"""Decoder (SPEC §9): two transposed 3-D convolutions back to the padded grid, output columns
chosen by the field labels, with circular handling of periodic axes."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from walrus_jax.models.config import ModelConfig
from walrus_jax.models.convolution import conv_stride1
from walrus_jax.models.encoder import SPATIAL3, fold_singleton_axes
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
    y = _transposed_conv_subpixel(x, w, s_eff, dtype)
    if any(pads):
        sl = [slice(None)] + [slice(p * s, y.shape[1 + a] - p * s) for a, (p, s) in enumerate(zip(pads, s_eff))]
        y = y[tuple(sl) + (slice(None),)]
    return y


def _transposed_conv_subpixel(x: jax.Array, w: jax.Array, strides: Sequence[int], dtype) -> jax.Array:
    """Transposed convolution (no padding) as one stride-1 convolution followed by depth-to-space.

    With m = ceil(k / s), output sample l * s + p receives sum_q x[l - q] * w[q * s + p]: for each
    phase p this is a plain convolution with an m-tap kernel. Stacking the s phases of every axis as
    output channels gives one dense convolution; XLA's CPU path for a stride-dilated input
    (`lhs_dilation`) is a slow generic loop, ~100x slower on the decoder's second convolution.
    x (N, n1, n2, n3, I), w (k1, k2, k3, I, O) -> (N, (n_a - 1) * s_a + k_a, O).
    """
    k = w.shape[:3]
    m = [-(-ka // sa) for ka, sa in zip(k, strides)]
    n_in, n_out = w.shape[3], w.shape[4]
    w = jnp.pad(w, [(0, ma * sa - ka) for ma, sa, ka in zip(m, strides, k)] + [(0, 0), (0, 0)])
    s1, s2, s3 = strides
    w = w.reshape(m[0], s1, m[1], s2, m[2], s3, n_in, n_out)
    w = jnp.flip(w, axis=(0, 2, 4))  # tap q of the conv reads x[l - (m - 1 - q)]
    w = jnp.transpose(w, (0, 2, 4, 6, 1, 3, 5, 7)).reshape(m[0], m[1], m[2], n_in, s1 * s2 * s3 * n_out)
    y = conv_stride1(x.astype(dtype), w.astype(dtype), tuple((ma - 1, ma - 1) for ma in m))
    N, L1, L2, L3 = y.shape[:4]
    y = y.reshape(N, L1, L2, L3, s1, s2, s3, n_out)
    y = jnp.transpose(y, (0, 1, 4, 2, 5, 3, 6, 7)).reshape(N, L1 * s1, L2 * s2, L3 * s3, n_out)
    n = x.shape[1:4]
    return y[:, :(n[0] - 1) * s1 + k[0], :(n[1] - 1) * s2 + k[1], :(n[2] - 1) * s3 + k[2]]


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
