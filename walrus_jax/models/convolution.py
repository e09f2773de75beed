"""Channels-last 3-D convolutions as XLA:CPU runs them fast, forward and backward.

XLA:CPU has fast paths for stride-1 convolutions and slow generic loops for the rest: a strided
convolution's input gradient (an input-dilated convolution) took 825 ms where the equivalent
stride-1 form takes 38 ms, and the weight gradient of any convolution (a convolution whose "kernel"
is the output gradient) took 0.3-0.9 s per layer. So, in CPU programs (`kernels`, models/kernels.py;
other platforms use XLA's convolutions as they are):

- `conv3d` computes a strided VALID convolution as a stride-1 convolution of the space-to-depth input
  (each s-block of samples becomes s * I channels) with the matching rearranged kernel: the same
  products, summed in a different order (float32 rounding only);
- `conv_stride1` is a stride-1 convolution as one large matrix product (`_gemm_conv`): XLA:CPU's own
  convolutions ran these layers at 25-45 GFLOP/s where its matrix products reach ~200, e.g. the
  decoder's last layer took 81 ms forward for 0.8 GFLOP, 20 ms as a product. Either
  * patches: the k^3 shifted windows of x side by side on the channel axis, (P, k^3 I), times the
    kernel (k^3 I, O); its gradient is a product and a sum of shifted windows (chosen when I <= O), or
  * taps: x (P, I) times all taps' kernels side by side (I, k^3 O), then the sum of each tap's
    output shifted into place (chosen when O < I: k^3 O columns are fewer than k^3 I).
  Convolutions under `GEMM_CONV_MIN_FLOPS` keep XLA's form: they take a few milliseconds either
  way, and the k^3 windows make the program slower to compile (a tiny model's gradient on 32^2, with
  64-tap stride-1 convolutions: 7 s -> 11 s).
  Both forms hold a k^3-times-wider intermediate; a forward pass processes frames in groups of about
  `GEMM_CONV_GROUP_BYTES` of it (~25 MB less peak memory in the small configuration's forward pass;
  a gradient keeps the intermediate for the backward pass anyway, so it takes all frames at once),
  and where one frame's exceeds `GEMM_CONV_MAX_FRAME_BYTES`
  (large 3-D grids) XLA's convolution is used, with its weight gradient written out as one product
  per tap (XLA's own took 0.3-0.9 s per layer);
- `conv_transpose3d` (the decoder's) is one stride-1 convolution followed by depth-to-space.

`fold_singleton_axes` collapses kernel axes over singleton input axes (2-D data through 3-D weights).

Layout: x (N, n1, n2, n3, I), w (k1, k2, k3, I, O), y (N, m1, m2, m3, O).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from walrus_jax.models.kernels import select
from walrus_jax.models.layers import precision

DIMS = ("NHWDC", "HWDIO", "NHWDC")
SPATIAL3 = (1, 2, 3)  # spatial axes of an (N, H, W, D, C) tensor


def conv3d(x: jax.Array, w: jax.Array, strides: Sequence[int], dtype, kernels: str = "auto") -> jax.Array:
    """VALID convolution with the given strides, computed in `dtype`. The CPU form is the module
    doc's; elsewhere (`kernels`, see models/kernels.py) it is XLA's strided convolution (cuDNN's and
    the TPU's kernels handle strides and gradients well)."""
    x, w = x.astype(dtype), w.astype(dtype)

    def cpu(x, w):
        if any(s > 1 for s in strides):
            x, w = space_to_depth(x, w, strides)
        return conv_stride1(x, w, ((0, 0),) * 3, kernels="cpu")

    xla = lambda x, w: jax.lax.conv_general_dilated(x, w, tuple(strides), "VALID", dimension_numbers=DIMS,
                                                    precision=precision(x.dtype))
    return select(kernels, x, w, xla=xla, cpu=cpu)


def space_to_depth(x: jax.Array, w: jax.Array, strides: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Rewrites a stride-s VALID convolution as a stride-1 one. Per axis, with m = ceil(k / s) and
    n_out = (n - k) // s + 1: the kernel is zero-padded to m * s taps, the input cropped or zero-padded
    to (n_out - 1 + m) * s samples (the extra samples only meet zero taps), and both are folded into
    (length / s, s) with the s phases moved to the channel axis.
    x (N, n1, n2, n3, I), w (k1, k2, k3, I, O) -> x' (N, n1', n2', n3', s1 s2 s3 I), w' (m1, m2, m3, s1 s2 s3 I, O)."""
    k = w.shape[:3]
    length = phase_lengths(x.shape[1:4], k, strides)
    x = x[:, :length[0], :length[1], :length[2]]
    x = jnp.pad(x, [(0, 0)] + [(0, la - xa) for la, xa in zip(length, x.shape[1:4])] + [(0, 0)])
    (s1, s2, s3), (N, I) = strides, (x.shape[0], x.shape[-1])
    x = x.reshape(N, length[0] // s1, s1, length[1] // s2, s2, length[2] // s3, s3, I)
    x = jnp.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7)).reshape(N, length[0] // s1, length[1] // s2, length[2] // s3,
                                                          s1 * s2 * s3 * I)
    return x, phase_kernel(w, strides)


def phase_lengths(n: Sequence[int], k: Sequence[int], strides: Sequence[int]) -> list[int]:
    """Per axis, the (n_out - 1 + m) * s samples a VALID stride-s convolution with kernel k reads, in whole
    phases (m = ceil(k / s), n_out = (n - k) // s + 1)."""
    return [((na - ka) // sa + -(-ka // sa)) * sa for na, ka, sa in zip(n, k, strides)]


def phase_kernel(w: jax.Array, strides: Sequence[int], phase_order: str = "a1,a2,a3,i") -> jax.Array:
    """The stride-1 kernel over space-to-depth input: w (k1, k2, k3, I, O) of a stride-s convolution ->
    (m1, m2, m3, s1 s2 s3 I, O), m = ceil(k / s), zero taps where m s > k; input channels in
    `phase_order`: "a1,a2,a3,i" (`space_to_depth` here) or "a3,i,a1,a2" (models/full_resolution.py)."""
    k, (I, O) = w.shape[:3], w.shape[3:]
    m = [-(-ka // sa) for ka, sa in zip(k, strides)]
    s1, s2, s3 = strides
    w = jnp.pad(w, [(0, ma * sa - ka) for ma, sa, ka in zip(m, strides, k)] + [(0, 0), (0, 0)])
    order = {"a1,a2,a3,i": (1, 3, 5, 6), "a3,i,a1,a2": (5, 6, 1, 3)}[phase_order]
    w = jnp.transpose(w.reshape(m[0], s1, m[1], s2, m[2], s3, I, O), (0, 2, 4) + order + (7,))
    return w.reshape(m[0], m[1], m[2], s1 * s2 * s3 * I, O)


def _conv(x, w, padding):
    return jax.lax.conv_general_dilated(x, w, (1, 1, 1), [tuple(p) for p in padding], dimension_numbers=DIMS,
                                        precision=precision(x.dtype))


GEMM_CONV_MIN_FLOPS = 2.5e8  # smaller convolutions keep XLA's form (module doc)
GEMM_CONV_GROUP_BYTES = 16 * 2**20  # the widened intermediate of one group of frames (module doc)
GEMM_CONV_MAX_FRAME_BYTES = 512 * 2**20  # ... of one frame, beyond which XLA's convolution is used


def conv_stride1(x: jax.Array, w: jax.Array, padding, kernels: str = "auto") -> jax.Array:
    """Stride-1 convolution with zero padding ((lo, hi),) * 3 (a static tuple). The CPU form is a
    matrix product over groups of frames (`_gemm_conv`), or, for a small convolution or one whose
    single frame's intermediate is too large, XLA's convolution with the per-tap weight gradient;
    elsewhere (`kernels`) plain XLA (autodiff)."""
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    return select(kernels, x, w, xla=lambda x, w: _conv(x, w, padding), cpu=lambda x, w: _cpu_conv_stride1(x, w, padding))


def _cpu_conv_stride1(x, w, padding):
    group = _frames_per_group(x.shape, w.shape, padding, x.dtype)
    if group == 0:
        return _conv_cpu(x, w, padding)
    if group == x.shape[0]:
        return _gemm_conv(x, w, padding)
    return _grouped_gemm_conv(x, w, padding, group)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _grouped_gemm_conv(x, w, padding, group):
    """`_gemm_conv` over groups of `group` frames (a map), when only the values are wanted.

    Under differentiation (the custom rule below) all frames go at once: the widened intermediate
    is a residual of the product then, kept for the backward pass whether grouped or not, and the
    map only added the stacking of its groups' residuals and outputs (S train step ~5% slower)."""
    xs = x.reshape((x.shape[0] // group, group) + x.shape[1:])
    y = jax.lax.map(lambda xg: _gemm_conv(xg, w, padding), xs)
    return y.reshape((x.shape[0],) + y.shape[2:])


def _grouped_gemm_conv_fwd(x, w, padding, group):
    return jax.vjp(lambda x, w: _gemm_conv(x, w, padding), x, w)  # (y, the vjp closure as residual)


def _grouped_gemm_conv_bwd(padding, group, vjp, dy):
    return vjp(dy)


_grouped_gemm_conv.defvjp(_grouped_gemm_conv_fwd, _grouped_gemm_conv_bwd)


def _frames_per_group(x_shape, w_shape, padding, dtype) -> int:
    """The largest divisor of N whose frames' widened intermediate fits GEMM_CONV_GROUP_BYTES (at
    least 1); 0 (XLA's convolution) when one frame's exceeds GEMM_CONV_MAX_FRAME_BYTES or the
    convolution has fewer than GEMM_CONV_MIN_FLOPS."""
    k, (n_in, n_out) = w_shape[:3], w_shape[3:]
    padded = [n + lo + hi for n, (lo, hi) in zip(x_shape[1:4], padding)]
    taps = int(np.prod(k))
    positions = int(np.prod([p - ka + 1 for p, ka in zip(padded, k)]))
    if 2.0 * x_shape[0] * positions * taps * n_in * n_out < GEMM_CONV_MIN_FLOPS:
        return 0
    if n_in <= n_out:  # patches: (output positions, taps * I)
        per_frame = positions * taps * n_in
    else:  # taps: (input positions, taps * O)
        per_frame = int(np.prod(padded)) * taps * n_out
    per_frame *= jnp.dtype(dtype).itemsize
    if per_frame > GEMM_CONV_MAX_FRAME_BYTES:
        return 0
    fit = max(1, GEMM_CONV_GROUP_BYTES // max(1, per_frame))
    return max(g for g in range(1, x_shape[0] + 1) if x_shape[0] % g == 0 and g <= fit)


def _gemm_conv(x: jax.Array, w: jax.Array, padding) -> jax.Array:
    """Stride-1 convolution as one matrix product (patches or taps form, see the module doc).
    x (N, n1, n2, n3, I), w (k1, k2, k3, I, O) -> (N, n_a + lo_a + hi_a - k_a + 1, O)."""
    xp = jnp.pad(x, [(0, 0)] + list(padding) + [(0, 0)])
    k, (n_in, n_out) = w.shape[:3], w.shape[3:]
    out = [n - ka + 1 for n, ka in zip(xp.shape[1:4], k)]
    taps = [(a, b, c) for a in range(k[0]) for b in range(k[1]) for c in range(k[2])]
    window = lambda a, tap: a[:, tap[0]:tap[0] + out[0], tap[1]:tap[1] + out[1], tap[2]:tap[2] + out[2]]
    if n_in <= n_out:
        patches = jnp.concatenate([window(xp, t) for t in taps], axis=-1)  # (N, *out, taps * I), tap-major
        y = jnp.dot(patches.reshape(-1, len(taps) * n_in), w.reshape(len(taps) * n_in, n_out),
                    preferred_element_type=jnp.float32)
        return y.reshape((x.shape[0],) + tuple(out) + (n_out,)).astype(x.dtype)
    w_taps = jnp.transpose(w.reshape(len(taps), n_in, n_out), (1, 0, 2)).reshape(n_in, len(taps) * n_out)
    z = jnp.dot(xp.reshape(-1, n_in), w_taps, preferred_element_type=jnp.float32)
    z = z.reshape(xp.shape[:4] + (len(taps), n_out))
    return _sum_shifted_taps(z, tuple(k)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sum_shifted_taps(z: jax.Array, k: tuple[int, int, int]) -> jax.Array:
    """The taps form's sum: z (N, n1, n2, n3, taps, O), tap i = (a, b, c) of the k1 x k2 x k3 kernel
    (row-major) -> y (N, n1 - k1 + 1, n2 - k2 + 1, n3 - k3 + 1, O), y[p] = sum_i z[p + tap_i, i].

    Its gradient, written out: tap i's slice of dz is dy shifted to that tap's offset (a zero-padded
    copy), all taps stacked in one pass. Differentiated automatically, it was a sum of taps-many
    padded arrays that XLA:CPU fused into one kernel evaluating every pad per element: the small
    configuration's decoder took 98 ms there per train step."""
    out = [n - ka + 1 for n, ka in zip(z.shape[1:4], k)]
    y = 0
    for i, (a, b, c) in enumerate(np.ndindex(*k)):
        y = y + z[:, a:a + out[0], b:b + out[1], c:c + out[2], i, :]
    return y


def _sum_shifted_taps_fwd(z, k):
    return _sum_shifted_taps(z, k), z.shape[1:4]


def _sum_shifted_taps_bwd(k, n, dy):
    out = dy.shape[1:4]
    shifted = [jnp.pad(dy, [(0, 0)] + [(t, na - oa - t) for t, na, oa in zip(tap, n, out)] + [(0, 0)])
               for tap in np.ndindex(*k)]
    return (jnp.stack(shifted, axis=-2),)


_sum_shifted_taps.defvjp(_sum_shifted_taps_fwd, _sum_shifted_taps_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_cpu(x, w, padding):
    return _conv(x, w, padding)


def _conv_fwd(x, w, padding):
    return _conv(x, w, padding), (x, w)


def _conv_bwd(padding, residuals, dy):
    x, w = residuals
    _, x_vjp = jax.vjp(lambda x: _conv(x, w, padding), x)
    (dx,) = x_vjp(dy)
    # dW[a, b, c] = sum over batch and output positions of x_padded[window shifted by (a, b, c)]^T dy:
    # one (I, P) x (P, O) product per tap, mapped over the taps (one compiled product).
    xp = jnp.pad(x, [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)])
    k, out = w.shape[:3], dy.shape[1:4]
    taps = np.stack(np.meshgrid(*[np.arange(n) for n in k], indexing="ij"), -1).reshape(-1, 3).astype(np.int32)
    dy2 = dy.reshape(-1, dy.shape[-1])

    def tap(t):
        window = jax.lax.dynamic_slice(xp, (0, t[0], t[1], t[2], 0), (xp.shape[0],) + out + (xp.shape[-1],))
        return jnp.einsum("pi,po->io", window.reshape(-1, xp.shape[-1]), dy2,
                          preferred_element_type=jnp.float32).astype(w.dtype)

    dw = jax.lax.map(tap, jnp.asarray(taps)).reshape(w.shape)
    return dx, dw


_conv_cpu.defvjp(_conv_fwd, _conv_bwd)


def fold_singleton_axes(w: jax.Array, in_shape: Sequence[int], reduce) -> jax.Array:
    """Collapses kernel axes (first three of (kH, kW, kD, I, O)) whose input axis has size 1, with
    `reduce` (jnp.sum in the encoder, jnp.mean in the decoder), so 2-D data runs through the 3-D
    weights exactly as the original's adaptive kernels do."""
    axes = tuple(a for a in range(3) if in_shape[a] == 1)
    return reduce(w, axis=axes, keepdims=True) if axes else w


def transposed_geometry(spatial: Sequence[int], w: jax.Array, strides: Sequence[int], periodic: Sequence[bool]):
    """For `conv_transpose3d` of an input with spatial shape `spatial`: the kernel averaged over
    singleton axes, the effective strides (1 on singleton axes) and the circular padding in tokens per
    axis (p = (k - s) // s on periodic, non-singleton axes, else 0)."""
    w = fold_singleton_axes(w, spatial, jnp.mean)
    s_eff, pads = [], []
    for a, n in enumerate(spatial):
        s = 1 if n == 1 else strides[a]
        s_eff.append(s)
        pads.append((w.shape[a] - s) // s if (periodic[a] and n > 1) else 0)
    return w, s_eff, pads


def conv_transpose3d(x: jax.Array, w: jax.Array, strides: Sequence[int], periodic: Sequence[bool], dtype,
                     kernels: str = "auto") -> jax.Array:
    """PyTorch ConvTranspose3d (no padding) on channels-last data, with the original's periodic
    wrap: on a periodic, non-singleton axis the input is padded circularly by p = (k - s) // s
    tokens and p * s samples are cropped from each side of the output.

    The original crops k - s instead of p * s, which is the same whenever s divides k - s and
    loses 4 samples for kernel 8 / stride 6 (384 -> 380). walrus_jax uses p * s (the fix; docs/original.md).

    x (N, n1, n2, n3, I), w (k1, k2, k3, I, O) -> (N, (n - 1) * s + k per axis, O).
    Singleton axes use the kernel averaged over that axis and stride 1.
    """
    w, s_eff, pads = transposed_geometry(x.shape[1:4], w, strides, periodic)
    if any(pads):
        x = jnp.pad(x, [(0, 0)] + [(p, p) for p in pads] + [(0, 0)], mode="wrap")
    y = _transposed_conv_subpixel(x, w, s_eff, dtype, kernels)
    if any(pads):
        sl = [slice(None)] + [slice(p * s, y.shape[1 + a] - p * s) for a, (p, s) in enumerate(zip(pads, s_eff))]
        y = y[tuple(sl) + (slice(None),)]
    return y


def subpixel_kernel(w: jax.Array, strides: Sequence[int], phase_order: str = "a1,a2,a3,o"):
    """The stride-1 kernel of a transposed convolution's subpixel form (`_transposed_conv_subpixel`):
    w (k1, k2, k3, I, O) -> ((m1, m2, m3, I, s1 s2 s3 O), m), m = ceil(k / s), output channels in
    `phase_order`: "a1,a2,a3,o" (phases, then channel) or "a3,o,a1,a2" (models/full_resolution.py)."""
    k = w.shape[:3]
    m = [-(-ka // sa) for ka, sa in zip(k, strides)]
    n_in, n_out = w.shape[3], w.shape[4]
    w = jnp.pad(w, [(0, ma * sa - ka) for ma, sa, ka in zip(m, strides, k)] + [(0, 0), (0, 0)])
    s1, s2, s3 = strides
    w = w.reshape(m[0], s1, m[1], s2, m[2], s3, n_in, n_out)
    w = jnp.flip(w, axis=(0, 2, 4))  # tap q of the conv reads x[l - (m - 1 - q)]
    order = {"a1,a2,a3,o": (1, 3, 5, 7), "a3,o,a1,a2": (5, 7, 1, 3)}[phase_order]
    w = jnp.transpose(w, (0, 2, 4, 6) + order).reshape(m[0], m[1], m[2], n_in, s1 * s2 * s3 * n_out)
    return w, m


def _transposed_conv_subpixel(x: jax.Array, w: jax.Array, strides: Sequence[int], dtype, kernels: str) -> jax.Array:
    """Transposed convolution (no padding) as one stride-1 convolution followed by depth-to-space.

    With m = ceil(k / s), output sample l * s + p receives sum_q x[l - q] * w[q * s + p]: for each
    phase p this is a plain convolution with an m-tap kernel. Stacking the s phases of every axis as
    output channels gives one dense convolution; XLA's CPU path for a stride-dilated input
    (`lhs_dilation`) is a slow generic loop, ~100x slower on the decoder's second convolution.
    x (N, n1, n2, n3, I), w (k1, k2, k3, I, O) -> (N, (n_a - 1) * s_a + k_a, O).
    """
    k, n_out = w.shape[:3], w.shape[4]
    s1, s2, s3 = strides
    w, m = subpixel_kernel(w, strides)
    y = conv_stride1(x.astype(dtype), w.astype(dtype), tuple((ma - 1, ma - 1) for ma in m), kernels)
    N, L1, L2, L3 = y.shape[:4]
    y = y.reshape(N, L1, L2, L3, s1, s2, s3, n_out)
    y = jnp.transpose(y, (0, 1, 4, 2, 5, 3, 6, 7)).reshape(N, L1 * s1, L2 * s2, L3 * s3, n_out)
    n = x.shape[1:4]
    return y[:, :(n[0] - 1) * s1 + k[0], :(n[1] - 1) * s2 + k[1], :(n[2] - 1) * s3 + k[2]]

