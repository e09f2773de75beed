"""Small layers shared by the encoder, decoder and blocks: Dense, HeadLayerNorm, RMSGroupNorm and
drop path, with the channel add / scale whose gradients XLA:CPU runs fast."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from walrus_jax.models import initializers
from walrus_jax.models.activation_sharding import batch_sharded
from walrus_jax.models.config import LAYER_NORM_EPS, RMS_NORM_EPS
from walrus_jax.models.initializers import Init


def param(init: Init, shape: tuple[int, ...], axes: tuple[str | None, ...], *, dtype=jnp.float32,
          rngs: nnx.Rngs | None = None, kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """A weight (an `nnx.Param`, or `kind`) of `shape` declaring its initialization `init` and one
    logical axis name per dimension, both as metadata: "init" (models/initializers.py; the model's
    generators read it there) and Flax's `out_sharding` (read by `nnx.get_partition_spec` and updated
    by `nnx.vmap` / `nnx.scan`'s `transform_metadata`). Its own value is drawn from `init` with a key
    of `rngs.params()` (random inits only). eager_sharding=False: the names are mapped to mesh axes
    later, by walrus_jax.sharding's rules table, when the weights are placed, so a model builds
    without a mesh."""
    shape = tuple(int(n) for n in shape)
    if len(axes) != len(shape):
        raise ValueError(f"param of shape {shape} needs one axis name per dimension, got {axes}")
    key = rngs.params() if init.random else None
    return kind(init.value(key, shape, dtype), out_sharding=tuple(axes), eager_sharding=False,
                **{initializers.INIT_KEY: init})


def precision(dtype):
    """The matrix-product precision for a compute dtype: float32 products are computed in float32
    (TPUs and recent GPUs otherwise round float32 operands to bf16 / tf32 at default precision;
    CPUs ignore it), others at the default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _channel_sum(a: jax.Array) -> jax.Array:
    """(..., C) -> (C,): the sum over every other axis, as a vector-matrix product."""
    a2 = a.reshape(-1, a.shape[-1])
    return jnp.dot(jnp.ones((a2.shape[0],), a2.dtype), a2, preferred_element_type=jnp.float32,
                   precision=precision(a2.dtype))


@jax.custom_vjp
def add_channels(y: jax.Array, b: jax.Array) -> jax.Array:
    """y (..., C) + b (C,). Its gradient sums over the rows with a product instead of a reduction:
    inside the scanned blocks, XLA:CPU fused the reduction into the write of the layer's gradient
    slice as an unvectorised loop (~0.2 s per bias of the small configuration's backward pass)."""
    return y + b


def _add_channels_fwd(y, b):
    return y + b, jnp.zeros((0,), b.dtype)  # only b's dtype is needed


def _add_channels_bwd(res, g):
    return g, _channel_sum(g).astype(res.dtype)


add_channels.defvjp(_add_channels_fwd, _add_channels_bwd)


@jax.custom_vjp
def scale_channels(x: jax.Array, s: jax.Array) -> jax.Array:
    """x (..., C) * s (C,), with the scale's gradient as a product (see `add_channels`)."""
    return x * s


def _scale_channels_fwd(x, s):
    return x * s, (x, s)


def _scale_channels_bwd(res, g):
    x, s = res
    return (g * s).astype(x.dtype), _channel_sum(g * x).astype(s.dtype)


scale_channels.defvjp(_scale_channels_fwd, _scale_channels_bwd)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias), kernel (in, out), with logical axis names and a compute dtype.
    kernel ~ truncated normal with std 1/sqrt(in); bias 0."""

    def __init__(self, n_in: int, n_out: int, axes: tuple[str, str], *, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(initializers.fan_in(-2), (n_in, n_out), axes, dtype=param_dtype, rngs=rngs)
        self.bias = param(initializers.ZEROS, (n_out,), (axes[1],), dtype=param_dtype) if use_bias else None
        self.dtype = dtype
        self.lora = None  # a low-rank adapter (models/lora.py attach), added to the output

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """x (batch, ..., in) -> (batch, ..., out). key: the adapter's dropout randomness (None: none)."""
        # As one 2-D product: XLA:CPU runs a dot with many batch-like leading axes ~20% slower.
        # On a mesh, input and output keep their batch axis split (activation_sharding): FSDP then
        # gathers the kernel rather than the samples.
        lead = x.shape[:-1]
        x = batch_sharded(x)
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), self.kernel[...].astype(self.dtype),
                    precision=precision(self.dtype))
        y = batch_sharded(y.reshape(lead + (y.shape[-1],)))
        if self.bias is not None:
            y = add_channels(y, self.bias[...].astype(self.dtype))
        if self.lora is not None:
            y = y + self.lora(x, key)
        return y


class HeadLayerNorm(nnx.Module):
    """torch.nn.LayerNorm(head_dim) (eps 1e-5, weight and bias), statistics in float32."""

    def __init__(self, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(initializers.ONES, (dim,), ("head_dim",), dtype=param_dtype)
        self.bias = param(initializers.ZEROS, (dim,), ("head_dim",), dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)
        y = add_channels(scale_channels(y, self.scale[...].astype(jnp.float32)), self.bias[...].astype(jnp.float32))
        return y.astype(x.dtype)


class RMSGroupNorm(nnx.Module):
    """The original's RMSGroupNorm: each channel of each (time, batch) element is divided by
    its own RMS over all spatial positions (the group reshape has no effect), times a learned scale.

    eps is float32 machine epsilon (the original calls rms_norm without eps). Statistics are always
    computed in float32; the result is cast back to the input dtype.
    """

    def __init__(self, channels: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs, logical_axis: str = "embed"):
        self.scale = param(initializers.ONES, (channels,), (logical_axis,), dtype=param_dtype)

    def __call__(self, x: jax.Array, spatial_axes: tuple[int, ...]) -> jax.Array:
        """x (..., C) channels-last; `spatial_axes` are the axes reduced."""
        xf = x.astype(jnp.float32)
        ms = jnp.mean(jnp.square(xf), axis=spatial_axes, keepdims=True)
        y = scale_channels(xf * jax.lax.rsqrt(ms + RMS_NORM_EPS), self.scale[...].astype(jnp.float32))
        return y.astype(x.dtype)


def drop_path(x: jax.Array, rate, key: jax.Array | None, draw_axes: tuple[int, ...],
              n_frames: int | None = None) -> jax.Array:
    """Stochastic depth on a residual branch: each index of the axes `draw_axes` (one draw per index,
    shared along every other axis) keeps its branch with probability 1 - rate and is rescaled by
    1 / (1 - rate). `rate` may be traced (it is scanned over blocks); with key None it is the identity
    (eval). The original's time branch is (T, B, ...) with one draw per frame shared by the batch
    (draw_axes=(1,) on (B, T, ...)); its space branch draws per (sample, frame) (draw_axes=(0, 1)).

    n_frames: x holds only the last of `n_frames` frames on axis 1 (a processor's last block when only
    the last frame is needed); the draw is made for all of them and the last one's kept, so the result
    is that frame of the full computation's."""
    if key is None:
        return x
    keep = 1.0 - rate
    shape = tuple(x.shape[a] if a in draw_axes else 1 for a in range(x.ndim))
    if n_frames is not None and 1 in draw_axes:
        shape = shape[:1] + (n_frames,) + shape[2:]
    mask = jax.random.bernoulli(key, keep, shape)
    if n_frames is not None and 1 in draw_axes:
        mask = mask[:, -x.shape[1]:]
    return jnp.where(mask, x / jnp.maximum(keep, 1e-12).astype(x.dtype), jnp.zeros_like(x))
