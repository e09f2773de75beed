"""The model's two full-resolution ends: padded, flagged input -> first encoder convolution, and last
decoder convolution -> unpadded output, in the form each platform runs well (models/kernels.py).

Everything else in the model works on tokens with hundreds of channels. These two ends hold the
fields themselves: a 3-D sample of 128^3 points with a handful of channels (5 fields + 3 flags). On
CPU and GPU they run channels-last as the rest of the model does (`xla` and `cpu` forms: pad and flag,
strided convolution; transposed convolution, crop and roll back). A TPU stores the last axis of an
array in 128 lanes, so a channels-last array of 8 channels takes 16 times its size: the 1.3B model's
3-D train step held over 20 GiB of such arrays per sample. The TPU form keeps the spatial axes minor
(channels-first) at full resolution and meets the convolutions through space-to-depth:

- the encoder's first convolution (kernel k, stride s) is a stride-1 convolution of the s^3-phase
  space-to-depth input (`space_to_depth`) with the rearranged kernel, as the CPU form computes it;
  the fields' and the flags' parts are separate convolutions (the convolution is linear in its input
  channels): the flags are the same for every sample and go through once, and the input scale
  (`encoder_dummy`) multiplies the fields' part after the convolution, so its gradient is taken at
  the token resolution rather than through a full-resolution input gradient;
- the decoder's last transposed convolution is a stride-1 convolution to s^3 phases per point, then
  depth-to-space (`depth_to_space`) into channels-first, where the crop and the roll back happen.

Space-to-depth itself keeps every intermediate's last two axes wide: the minor spatial axis is put in
phase-major order by a one-hot matrix product (exact: one product by 1 per output), the other two
axes are folded into the channels, and one transposition of two wide axes moves the minor axis. The
phases are ordered (a3, c, a1, a2) on the channel axis (a_i: phase along spatial axis i, c: channel).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from walrus_jax.models import patching
from walrus_jax.models.activation_sharding import batch_sharded
from walrus_jax.models.convolution import (conv3d, conv_stride1, conv_transpose3d, phase_kernel, phase_lengths,
                                          subpixel_kernel, transposed_geometry)
from walrus_jax.models.kernels import select
from walrus_jax.models.layers import precision

CF_SPATIAL = (2, 3, 4)  # spatial axes of an (N, C, H, W, D) tensor


def _phase_major(n: int, s: int, dtype) -> jax.Array:
    """(n, n) one-hot: column a * (n / s) + b is row s * b + a (phase-major order of an axis)."""
    nb = n // s
    rows = (s * np.arange(nb)[None, :] + np.arange(s)[:, None]).reshape(-1)
    m = np.zeros((n, n), np.float32)
    m[rows, np.arange(n)] = 1.0
    return jnp.asarray(m, dtype)


def space_to_depth(x: jax.Array, strides: Sequence[int]) -> jax.Array:
    """x (N, C, H, W, D) channels-first, H = s1 h, W = s2 w, D = s3 d -> (N, h, w, d, s3 C s1 s2), point
    (s1 i + a1, s2 j + a2, s3 k + a3) of channel c at [i, j, k, ((a3 C + c) s1 + a1) s2 + a2]."""
    N, C, H, W, D = x.shape
    s1, s2, s3 = strides
    h, w, d = H // s1, W // s2, D // s3
    x = jnp.einsum("nchwe,ed->nchwd", x, _phase_major(D, s3, x.dtype), precision=precision(x.dtype))
    x = x.reshape(N, C, h, s1, w, s2, D).transpose(0, 2, 4, 1, 3, 5, 6).reshape(N, h, w, C * s1 * s2, D)
    x = jnp.swapaxes(x, -1, -2)
    x = x.reshape(N, h, w, s3, d, C * s1 * s2).transpose(0, 1, 2, 4, 3, 5)
    return x.reshape(N, h, w, d, s3 * C * s1 * s2)


def depth_to_space(y: jax.Array, strides: Sequence[int], channels: int) -> jax.Array:
    """Inverse of `space_to_depth`: (N, h, w, d, s3 C s1 s2) -> (N, C, s1 h, s2 w, s3 d)."""
    N, h, w, d, _ = y.shape
    s1, s2, s3 = strides
    C = channels
    y = y.reshape(N, h, w, d, s3, C * s1 * s2).transpose(0, 1, 2, 4, 3, 5).reshape(N, h, w, s3 * d, C * s1 * s2)
    y = jnp.swapaxes(y, -1, -2)
    y = y.reshape(N, h, w, C, s1, s2, s3 * d).transpose(0, 3, 1, 4, 2, 5, 6).reshape(N, C, s1 * h, s2 * w, s3 * d)
    return jnp.einsum("nchwd,ed->nchwe", y, _phase_major(s3 * d, s3, y.dtype), precision=precision(y.dtype))


def _crop_to_phases(x: jax.Array, k: Sequence[int], strides: Sequence[int]) -> jax.Array:
    """Crops or zero-pads the spatial axes of (N, C, H, W, D) to the samples a VALID stride-s convolution
    with kernel k reads, in whole phases (`convolution.phase_lengths`; the extra samples meet zero taps)."""
    length = phase_lengths(x.shape[2:], k, strides)
    x = x[(slice(None),) * 2 + tuple(slice(0, la) for la in length)]
    return jnp.pad(x, [(0, 0)] * 2 + [(0, la - n) for la, n in zip(length, x.shape[2:])])


# ------------------------------------------------------------------------- the encoder's input end
def encode_input(x: jax.Array, w: jax.Array, scale: jax.Array, plans, bcs3, patch_shift, strides, dtype,
                 kernels: str) -> jax.Array:
    """The encoder's first convolution of the padded, flagged input.

    x (N, H, W, D, C) float32 fields (channels-last, unpadded); w (k1, k2, k3, C + 3, O) the kernel
    for the fields and the flags [bias, wall, open] (singleton axes folded); scale () multiplies the
    fields; strides (3,) -> (N, h, w, d, O) in `dtype`, the VALID convolution of
    `patching.pad_and_flag(x * scale)` (see the module doc for the forms)."""

    def portable(x, w, scale):
        xp = patching.pad_and_flag(x * scale, plans, bcs3, patch_shift)
        return conv3d(batch_sharded(xp), w, strides, dtype, kernels)

    def phases(x, w, scale):
        n_fields = x.shape[-1]
        fields = jnp.moveaxis(batch_sharded(x.astype(dtype)), -1, 1)  # channels-first
        fields = patching.roll_and_wrap(patching.zero_pad(fields, plans, CF_SPATIAL), plans, patch_shift, CF_SPATIAL)
        # The flags are a constant when the patch shift is (no jitter): the barrier keeps XLA from
        # folding their space-to-depth product at compile time, which its evaluator does slowly.
        flags = jnp.asarray(np.moveaxis(patching.flag_grid(plans, bcs3), -1, 0)[None], dtype)
        flags = jax.lax.optimization_barrier(flags)
        flags = patching.roll_and_wrap(flags, plans, patch_shift, CF_SPATIAL)
        y = None
        for part, wp in ((fields, w[..., :n_fields, :]), (flags, w[..., n_fields:, :])):
            part = space_to_depth(_crop_to_phases(part, wp.shape[:3], strides), strides)
            out = conv_stride1(part, phase_kernel(wp.astype(dtype), strides, "a3,i,a1,a2"), ((0, 0),) * 3, kernels="xla")
            y = out * scale.astype(dtype) if y is None else y + out  # flags: one sample, broadcast
        return y

    return select(kernels, x, w, scale, xla=portable, tpu=phases)


# ------------------------------------------------------------------------- the decoder's output end
def decode_output(z: jax.Array, w: jax.Array, bias: jax.Array, plans, patch_shift, strides, periodic, dtype,
                  kernels: str) -> jax.Array:
    """The decoder's last transposed convolution, its bias, and the inverse of the padding and roll.

    z (N, h, w, d, I); w (k1, k2, k3, I, C); bias (C,); strides (3,) -> (N, H, W, D, C) in `dtype` on
    the unpadded grid: `patching.unjitter(conv_transpose3d(z, w) + bias)` (module doc)."""

    def portable(z, w, bias):
        y = conv_transpose3d(z, w, strides, periodic, dtype, kernels)
        return patching.unjitter(batch_sharded(y + bias.astype(y.dtype)), plans, patch_shift)

    def phases(z, w, bias):
        w, s_eff, pads = transposed_geometry(z.shape[1:4], w, strides, periodic)
        if any(pads):
            z = jnp.pad(z, [(0, 0)] + [(p, p) for p in pads] + [(0, 0)], mode="wrap")
        kernel, m = subpixel_kernel(w, s_eff, phase_order="a3,o,a1,a2")
        yc = conv_stride1(z.astype(dtype), kernel.astype(dtype), tuple((ma - 1, ma - 1) for ma in m), kernels="xla")
        y = depth_to_space(batch_sharded(yc), s_eff, w.shape[-1])  # (N, C, L1 s1, L2 s2, L3 s3)
        k, n = w.shape[:3], z.shape[1:4]
        sl = [slice(None)] * 2 + [slice(p * s, (na - 1) * s + ka - p * s)
                                  for p, s, na, ka in zip(pads, s_eff, n, k)]
        y = y[tuple(sl)] + bias.astype(dtype)[None, :, None, None, None]
        y = patching.unjitter(y, plans, patch_shift, CF_SPATIAL)
        return jnp.moveaxis(y, 1, -1)

    return select(kernels, z, w, bias, xla=portable, tpu=phases)

