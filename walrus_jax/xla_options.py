"""XLA compiler options that walrus_jax passes to every `jax.jit` it creates.

On the CPU backend, XLA (jax 0.10) hands matrix products to YNNPACK fusions by default. For this
model's shapes XLA's other CPU GEMM path (Eigen) is faster: the medium configuration's forward pass
(hidden 768, 12 blocks, 128^2, T=6) takes ~11.4 s instead of ~13.9 s on a 2-core machine
(`python tools/bench/forward.py`), bf16 included; results differ by float32 rounding only. The option
is per compiled program, so it touches nothing else in the process.

    step = jax.jit(my_step, compiler_options=wj.compiler_options())   # for your own jitted code

JAX accepts compiler options only on a top-level jit: staged inside another jit, `make_jaxpr` or a
scan body it raises. walrus_jax's own jitted functions are therefore built with `jit` below, which
uses the options when called at top level and a plain `jax.jit` when staged inside something else.

A user's own `--xla_cpu_experimental_ynn_fusion_type=...` in XLA_FLAGS wins: then nothing is set. On
other backends, or a jax whose XLA does not know the option, this is an empty dict.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np

from walrus_jax import host_memory
from walrus_jax.models.kernels import compile_target, platform_of

YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"


@functools.cache
def compiler_options() -> dict[str, str]:
    """The options for `jax.jit(..., compiler_options=...)` on this backend (see the module doc)."""
    if jax.default_backend() != "cpu" or YNN_FUSIONS in os.environ.get("XLA_FLAGS", ""):
        return {}
    options = {YNN_FUSIONS: ""}
    try:  # an XLA without the option rejects it ("No such compile option")
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:
        return {}
    return options


def jit(fn, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)`, with `compiler_options()` whenever it is called (or lowered) at
    top level; inside another trace it is the plain jit. Supports calling, `.lower` and the
    attributes of the jitted function. In a CPU process, also installs `host_memory.trim_after_compile`
    (once)."""
    if jax.default_backend() == "cpu":
        host_memory.trim_after_compile()
    return _TopLevelJit(fn, jit_kwargs)


class _TopLevelJit:
    def __init__(self, fn, jit_kwargs):
        self._plain = jax.jit(fn, **jit_kwargs)
        options = compiler_options()
        self._tuned = jax.jit(fn, compiler_options=options, **jit_kwargs) if options else self._plain
        functools.update_wrapper(self, fn)

    def _pick(self, args, kwargs):
        """(the jit to use, the platform the program is compiled for; None inside another trace)."""
        if _inside_trace(args, kwargs):
            return self._plain, None
        platform = _target_platform(args, kwargs)
        return (self._tuned if platform == "cpu" else self._plain), platform

    def __call__(self, *args, **kwargs):
        fn, platform = self._pick(args, kwargs)
        with compile_target(platform):  # the model's kernels for that platform (models/kernels.py)
            return fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        fn, platform = self._pick(args, kwargs)
        with compile_target(platform):
            return fn.lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        fn, platform = self._pick(args, kwargs)
        with compile_target(platform):
            return fn.trace(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tuned, name)


def _target_platform(args, kwargs) -> str:
    """The platform the call compiles for: that of the arguments' devices (placed arrays, or abstract
    ones with a sharding: a TPU program lowered ahead of time on a CPU host), else the default
    device's, where jax puts uncommitted arguments."""
    for leaf in jax.tree.leaves((args, kwargs)):
        devices = getattr(getattr(leaf, "sharding", None), "device_set", None)
        if devices:
            return platform_of(devices)
    default = jax.config.jax_default_device
    if isinstance(default, str):
        return platform_of(jax.devices(default)[:1])
    return platform_of([default] if default is not None else jax.devices()[:1])


def _inside_trace(args, kwargs) -> bool:
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
        return True
    try:  # a trace with only constant arguments (closed-over values): jax's own test
        from jax._src import core
        return not core.trace_state_clean()
    except (ImportError, AttributeError):
        return False
