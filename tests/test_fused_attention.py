"""The fused C++ attention kernel (walrus_jax/cpu_kernels) equals the plain softmax attention, values
and gradients, on shapes that exercise its padding (L, head_dim not multiples of 16), its split of
few pairs over threads, leading axes, and the model path that selects it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from walrus_jax.cpu_kernels import attention as fused
from walrus_jax.cpu_kernels import build
from walrus_jax.models import attention as model_attention


def materialised_attention(q, k, v):
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits, axis=-1), v)


def test_kernel_builds_here():
    # CI machines have a C++ compiler: the kernel must build there, not fall back silently.
    assert build.enabled() and fused.available()


@pytest.mark.parametrize("shape", [
    (2, 37, 3, 20),       # L and head_dim both padded
    (1, 96, 1, 8),        # one pair: cut into pieces of query rows over the threads
    (3, 2, 50, 2, 8),     # two leading axes
    (1, 130, 2, 88),      # head_dim over 64: two column panels (64 + 32)
    (2, 64, 4, 48),       # the small configuration's head_dim
])
def test_fused_attention_equals_materialised(shape):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (3.0 * jax.random.normal(kk, shape) for kk in keys[:3])  # large logits: max-subtraction matters
    g = jax.random.normal(keys[3], shape)
    got = jax.jit(fused.fused_attention)(q, k, v)
    want = materialised_attention(q, k, v)
    assert got.shape == shape and got.dtype == jnp.float32
    assert rel_err(got, want) <= 1e-5

    def grads(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * g), argnums=(0, 1, 2)))(q, k, v)

    for name, a, b in zip("qkv", grads(fused.fused_attention), grads(materialised_attention)):
        assert rel_err(a, b) <= 1e-5, name


def test_fused_attention_under_vmap():
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(kk, (3, 2, 24, 2, 16)) for kk in keys)
    got = jax.vmap(fused.fused_attention)(q, k, v)
    assert rel_err(got, materialised_attention(q, k, v)) <= 1e-5


def test_model_attention_uses_the_kernel_for_float32_only():
    q = jnp.ones((1, 16, 2, 8), jnp.float32)
    cpu_form = lambda q, k, v: model_attention.space_attention_core(q, k, v, "cpu")
    text = str(jax.make_jaxpr(cpu_form)(q, q, q))
    assert "WjAttentionForward" in text
    # other dtypes take XLA's blocked path
    text16 = str(jax.make_jaxpr(cpu_form)(*(q.astype(jnp.bfloat16),) * 3))
    assert "WjAttentionForward" not in text16


def test_disabled_kernel_falls_back(monkeypatch):
    monkeypatch.setenv("WALRUS_JAX_CPU_KERNELS", "0")
    build.load.cache_clear()
    try:
        assert not fused.available()
        q = jnp.ones((1, 16, 2, 8), jnp.float32)
        # a new function object: make_jaxpr caches traces per function
        jaxpr = jax.make_jaxpr(lambda q, k, v: model_attention.space_attention_core(q, k, v, "cpu"))(q, q, q)
        assert "WjAttentionForward" not in str(jaxpr)
    finally:
        monkeypatch.delenv("WALRUS_JAX_CPU_KERNELS")
        build.load.cache_clear()


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("WALRUS_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    build.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert not build.load("attention", ("WjAttentionForward",))
    finally:
        build.load.cache_clear()
