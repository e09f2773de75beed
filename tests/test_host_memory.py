"""walrus_jax.host_memory: the C heap's free memory is handed back after every XLA compile."""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import pytest

import walrus_jax as wj
from walrus_jax import host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_free_memory_released_after_each_compile(monkeypatch):
    assert host_memory.trim_after_compile()  # installed by wj.jit, once per process
    x = jnp.arange(7.0)
    f = wj.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    calls = []
    monkeypatch.setattr(host_memory, "release_free_memory", lambda: calls.append(1) or True)
    f(x).block_until_ready()  # a new program: compiled on the first call
    n = len(calls)
    assert n >= 1
    f(x).block_until_ready()  # cached: no compile, no trim
    assert len(calls) == n
    jax.jit(lambda x: x * 5.0 - 2.0)(x).block_until_ready()  # any compile in the process
    assert len(calls) > n


def test_release_free_memory_is_safe_to_call():
    assert host_memory.release_free_memory() is sys.platform.startswith("linux")
