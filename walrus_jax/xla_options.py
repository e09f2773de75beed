"""XLA compiler options that walrus_jax passes to every `jax.jit` it creates.

On the CPU backend, XLA (jax 0.10) hands matrix products to YNNPACK fusions by default. For this
model's shapes XLA's other CPU GEMM path (Eigen) is faster: the medium configuration's forward pass
(hidden 768, 12 blocks, 128^2, T=6) takes ~11.4 s instead of ~13.9 s on a 2-core machine
(`python tools/bench/forward.py`), bf16 included; results differ by float32 rounding only. The option
is per compiled program, so it touches nothing else in the process.

    step = jax.jit(my_step, compiler_options=wj.compiler_options())   # for your own jitted code

A user's own `--xla_cpu_experimental_ynn_fusion_type=...` in XLA_FLAGS wins: then nothing is set. On
other backends, or a jax whose XLA does not know the option, this is an empty dict.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np

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
