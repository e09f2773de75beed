"""wj.compiler_options / wj.jit: the CPU option is applied at top level, never breaks nesting."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import walrus_jax as wj
from walrus_jax import xla_options


def test_cpu_option_and_user_override(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert wj.compiler_options() == {xla_options.YNN_FUSIONS: ""}  # jax 0.10 on CPU knows the option
    xla_options.compiler_options.cache_clear()
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_options.YNN_FUSIONS}=dot")
    try:
        assert xla_options.compiler_options() == {}  # the user's own setting wins
    finally:
        xla_options.compiler_options.cache_clear()


def test_jit_top_level_and_nested():
    fn = lambda x, n: jnp.sin(x @ x.T) * n  # noqa: E731
    f = wj.jit(fn, static_argnums=(1,))
    x = 0.1 * jnp.sin(jnp.arange(128.0 * 64).reshape(128, 64))
    want = np.sin(np.asarray(x) @ np.asarray(x).T) * 3
    np.testing.assert_allclose(f(x, 3), want, rtol=1e-5, atol=1e-5)
    # The option reached XLA: the product is not a YNNPACK fusion, as it is under a plain jit.
    assert "ynn" in jax.jit(fn, static_argnums=(1,)).lower(x, 3).compile().as_text()
    assert "ynn" not in f.lower(x, 3).compile().as_text()
    # Staged inside other traces, where jax.jit(..., compiler_options=...) raises: the plain jit.
    np.testing.assert_allclose(jax.jit(lambda y: f(y, 3))(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda: f(0.1 * jnp.sin(jnp.arange(128.0 * 64).reshape(128, 64)), 3))(), want, rtol=1e-5, atol=1e-5)
    assert jax.make_jaxpr(lambda y: f(y, 3))(x) is not None
    g = jax.grad(lambda y: jnp.sum(f(y, 3)))(x)
    np.testing.assert_allclose(g, jax.grad(lambda y: jnp.sum(fn(y, 3)))(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(lambda y: f(y, 3))(x[None])[0], want, rtol=1e-5, atol=1e-5)
