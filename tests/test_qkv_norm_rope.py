"""The fused C++ query / key preparation (walrus_jax/cpu_kernels/qkv_norm_rope) equals the model's
XLA form (HeadLayerNorm, then apply_rope), values and gradients, in both layouts, and the model
selects it only where it applies."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from conftest import rel_err
from flax import nnx

from walrus_jax.cpu_kernels import qkv_norm_rope as op
from walrus_jax.models import attention, positional
from walrus_jax.models.config import ModelConfig


def xla_form(qkv, scale, bias, angles, heads_major):
    """q, k LayerNormed then rotated (angles (L, n_rot) or None), v as given, as the model writes it."""
    def one(x, w, b):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * w + b
        return y if angles is None else positional.apply_rope(y, angles)
    part = (lambda i: qkv[..., i, :]) if heads_major else (lambda i: qkv[..., i, :, :])
    return one(part(0), scale[0], bias[0]), one(part(1), scale[1], bias[1]), part(2)


def tables(angles, L, D):
    if angles is None:
        return jnp.ones((L, D)), jnp.zeros((L, D))
    return positional.rope_tables(angles, D)


def test_kernel_builds_here():
    assert op.available()


@pytest.mark.parametrize("shape, n_rot, heads_major", [
    ((2, 37, 3, 3, 48), 48, False),   # the small configuration's head_dim, every channel rotated
    ((1, 20, 3, 2, 88), 84, False),   # head_dim 88 (the released model's): a vector and a tail; 4 channels not rotated
    ((3, 2, 9, 3, 1, 10), 6, False),  # two leading axes, head_dim below one vector
    ((70, 1, 3, 2, 16), 16, False),   # more rows than work items (partial sums over several rows each)
    ((40, 6, 4, 3, 48), None, True),  # time attention's layout: per head q, k, v; no rotation
    ((5, 6, 2, 3, 88), None, True),
])
@pytest.mark.slow
def test_equals_xla_form(shape, n_rot, heads_major):
    keys = jax.random.split(jax.random.key(0), 5)
    L, D = shape[-4], shape[-1]
    qkv = 2.0 + 3.0 * jax.random.normal(keys[0], shape)  # an offset: the mean subtraction matters
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], (2, D))
    bias = 0.1 * jax.random.normal(keys[2], (2, D))
    angles = None if n_rot is None else 3.0 * jax.random.normal(keys[3], (L, n_rot))
    cos, sin = tables(angles, L, D)
    got = jax.jit(op.qkv_norm_rope, static_argnums=5)(qkv, scale, bias, cos, sin, heads_major)
    want = xla_form(qkv, scale, bias, angles, heads_major)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == jnp.float32
        assert rel_err(a, b) <= 1e-5
    cot = [jax.random.normal(kk, want[0].shape) for kk in jax.random.split(keys[4], 3)]

    def grads(f):
        loss = lambda x, s, b: sum(jnp.sum(o * g) for o, g in zip(f(x, s, b), cot))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(qkv, scale, bias)

    got_g = grads(lambda x, s, b: op.qkv_norm_rope(x, s, b, cos, sin, heads_major))
    want_g = grads(lambda x, s, b: xla_form(x, s, b, angles, heads_major))
    for name, a, b in zip(("qkv", "scale", "bias"), got_g, want_g):
        assert rel_err(a, b) <= 1e-5, name


def test_under_vmap():
    keys = jax.random.split(jax.random.key(1), 2)
    qkv = jax.random.normal(keys[0], (3, 2, 8, 3, 2, 16))
    scale, bias = jnp.ones((2, 16)), jnp.zeros((2, 16))
    angles = jax.random.normal(keys[1], (8, 16))
    cos, sin = positional.rope_tables(angles, 16)
    got = jax.vmap(lambda x: op.qkv_norm_rope(x, scale, bias, cos, sin))(qkv)
    for a, b in zip(got, xla_form(qkv, scale, bias, angles, False)):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("learned_rope, space_kernel", [("none", True), ("shared", False)])
def test_attention_selects_the_kernel(learned_rope, space_kernel):
    """Fixed frequencies take the kernel in space attention; learnable ones keep XLA's form (the
    kernel gives the tables no gradient). Time attention (no rotation) takes it either way."""
    cfg = ModelConfig.tiny(learned_rope=learned_rope)
    x = jax.random.normal(jax.random.key(2), (1, 3, 4, 4, 1, cfg.hidden_dim))
    space = attention.SpaceAttention(cfg, rngs=nnx.Rngs(0))
    time = attention.TimeAttention(cfg, rngs=nnx.Rngs(0))
    assert ("WjQkvNormRopeForward" in str(jax.make_jaxpr(lambda x: space(x))(x))) == space_kernel
    assert "WjQkvNormRopeForward" in str(jax.make_jaxpr(lambda x: time(x))(x))
