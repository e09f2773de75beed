"""The fused C++ query / key preparation (walrus_jax/cpu_kernels/qk_norm_rope) equals the model's XLA
form (HeadLayerNorm, then apply_rope), values and gradients, and the model selects it only where it
applies."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx

from walrus_jax.cpu_kernels import qk_norm_rope as op
from walrus_jax.models import attention, positional
from walrus_jax.models.config import ModelConfig


def xla_form(qk, scale, bias, angles):
    """(HeadLayerNorm then apply_rope) of q = qk[:, :, 0] and k = qk[:, :, 1], as the model writes it."""
    def one(x, w, b):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return positional.apply_rope((x - mean) * jax.lax.rsqrt(var + 1e-5) * w + b, angles)
    return one(qk[..., 0, :, :], scale[0], bias[0]), one(qk[..., 1, :, :], scale[1], bias[1])


def test_kernel_builds_here():
    assert op.available()


@pytest.mark.parametrize("shape, n_rot", [
    ((2, 37, 2, 3, 48), 48),   # the small configuration's head_dim, every channel rotated
    ((1, 20, 2, 2, 88), 84),   # head_dim 88 (the released model's): a vector and a tail; 4 channels not rotated
    ((3, 2, 9, 2, 1, 10), 6),  # two leading axes, head_dim below one vector
    ((70, 1, 2, 2, 16), 16),   # more rows than work items (partial sums over several rows each)
])
def test_equals_xla_form(shape, n_rot):
    keys = jax.random.split(jax.random.key(0), 5)
    L, D = shape[-4], shape[-1]
    qk = 2.0 + 3.0 * jax.random.normal(keys[0], shape)  # an offset: the mean subtraction matters
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], (2, D))
    bias = 0.1 * jax.random.normal(keys[2], (2, D))
    angles = 3.0 * jax.random.normal(keys[3], (L, n_rot))
    cos, sin = positional.rope_tables(angles, D)
    got = jax.jit(op.qk_norm_rope)(qk, scale, bias, cos, sin)
    want = xla_form(qk, scale, bias, angles)
    for a, b in zip(got, want):
        assert a.shape == b.shape == shape[:-3] + shape[-2:]
        assert rel_err(a, b) <= 1e-5
    gq, gk = (jax.random.normal(kk, want[0].shape) for kk in jax.random.split(keys[4]))

    def grads(f):
        loss = lambda qk, s, b: sum(jnp.sum(o * g) for o, g in zip(f(qk, s, b), (gq, gk)))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(qk, scale, bias)

    got_g = grads(lambda qk, s, b: op.qk_norm_rope(qk, s, b, cos, sin))
    want_g = grads(lambda qk, s, b: xla_form(qk, s, b, angles))
    for name, a, b in zip(("qk", "scale", "bias"), got_g, want_g):
        assert rel_err(a, b) <= 1e-5, name


def test_under_vmap():
    keys = jax.random.split(jax.random.key(1), 2)
    qk = jax.random.normal(keys[0], (3, 2, 8, 2, 2, 16))
    scale, bias = jnp.ones((2, 16)), jnp.zeros((2, 16))
    angles = jax.random.normal(keys[1], (8, 16))
    cos, sin = positional.rope_tables(angles, 16)
    got = jax.vmap(lambda x: op.qk_norm_rope(x, scale, bias, cos, sin))(qk)
    for a, b in zip(got, xla_form(qk, scale, bias, angles)):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("learned_rope, uses_kernel", [("none", True), ("shared", False)])
def test_space_attention_selects_the_kernel(learned_rope, uses_kernel):
    """Fixed frequencies take the kernel; learnable ones keep XLA's form (the kernel gives the
    tables no gradient). Both give the same numbers."""
    cfg = ModelConfig.tiny(learned_rope=learned_rope)
    layer = attention.SpaceAttention(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, 2, 4, 4, 1, cfg.hidden_dim))
    text = str(jax.make_jaxpr(lambda x: layer(x))(x))
    assert ("WjQkNormRopeForward" in text) == uses_kernel
