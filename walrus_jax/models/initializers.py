"""How each variable of the model is initialized: one `Init` spec, declared with the variable.

Every weight is created by `walrus_jax.models.layers.param(init, shape, axes, ...)`, which stores its
`Init` in the variable's metadata under the key `INIT_KEY` ("init"; `var.get_metadata()["init"]`).
The metadata survives `nnx.eval_shape`, `nnx.split`/`merge` and the processor's `nnx.vmap` /
`nnx.scan` stacking, so the three places that produce values all read the same spec:

- the module itself, when built eagerly (`Init.value`: jax.random, one draw per variable);
- `walrus_jax.models.init.init_values`, the chunked compiled generator behind `Walrus(cfg, rngs=...)`;
- `walrus_jax.checkpoints.params.random_params`, a numpy generator for demos and tests
  (`Init.numpy_value`, with an extra multiplier on the random stds).

The scheme: kernels ~ truncated normal with std 1/sqrt(fan_in) (`fan_in(*axes)`: the product of the
input axes, e.g. input features x kernel taps); the T5 relative-bias table and the absolute position
embedding ~ 0.02 x truncated normal (`normal(0.02)`); low-rank adapters A like a kernel, B zeros;
norm scales and encoder_dummy ones, biases zeros; RoPE frequencies their fixed values
(`rope_freqs`). "Truncated normal" is always a standard normal truncated to [-2, 2] rescaled to unit
variance, times the std.

Axes in a spec are negative (counted from the last): a stacked weight (L, in, out) built under
`nnx.vmap` gets a leading layers axis, which then never counts in its fan-in.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

INIT_KEY = "init"  # the Variable metadata key holding a variable's `Init`
TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]
KINDS = ("normal", "zeros", "ones", "rope")


@dataclasses.dataclass(frozen=True)
class Init:
    """A variable's initialization (hashable: it travels in nnx graph definitions).

    kind: "normal" (unit-variance truncated normal x std / sqrt(prod(shape[a] for a in fan_in_axes))),
      "zeros", "ones" or "rope" (the fixed RoPE base frequencies of `rope` = (head_dim, max_freq),
      broadcast over the variable's leading axes).
    """
    kind: str
    std: float = 1.0
    fan_in_axes: tuple[int, ...] = ()
    rope: tuple[int, float] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Init kind {self.kind!r} not in {KINDS}")
        if any(a >= 0 for a in self.fan_in_axes):
            raise ValueError(f"Init fan_in_axes {self.fan_in_axes} must be negative (counted from the last axis)")

    @property
    def random(self) -> bool:
        return self.kind == "normal"

    def scale(self, shape: tuple[int, ...]) -> float:
        """The std of a random variable of `shape` (stacked leading axes ignored)."""
        fan = int(np.prod([shape[a] for a in self.fan_in_axes])) if self.fan_in_axes else 1
        return self.std / math.sqrt(fan)

    def constant(self, shape: tuple[int, ...]) -> np.ndarray:
        """float32 values of a non-random variable of `shape`."""
        if self.kind == "zeros":
            return np.zeros(shape, np.float32)
        if self.kind == "ones":
            return np.ones(shape, np.float32)
        if self.kind == "rope":
            from walrus_jax.models import positional

            return np.broadcast_to(positional.rope_base_freqs(*self.rope), shape).copy()
        raise ValueError(f"Init kind {self.kind!r} is random: it has no constant value")

    def value(self, key: jax.Array | None, shape: tuple[int, ...], dtype) -> jax.Array:
        """The values of one variable drawn with jax.random from `key` (unused for constants)."""
        if not self.random:
            return jnp.asarray(self.constant(shape), dtype)
        z = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) / np.float32(TRUNC_STD)
        return (z * np.float32(self.scale(shape))).astype(dtype)

    def numpy_value(self, rng: np.random.Generator, shape: tuple[int, ...], std_factor: float = 1.0) -> np.ndarray:
        """float32 values drawn with numpy; random stds are multiplied by `std_factor`."""
        if not self.random:
            return self.constant(shape)
        return truncated_normal_np(rng, shape) * np.float32(std_factor * self.scale(shape))


def fan_in(*axes: int) -> Init:
    """Truncated normal with std 1/sqrt(product of `axes`): a kernel's input axes, e.g. fan_in(-2)
    for a Dense (in, out), fan_in(-5, -4, -3, -2) for a 3-D convolution (kH, kW, kD, in, out)."""
    return Init("normal", fan_in_axes=tuple(axes))


def normal(std: float) -> Init:
    """Truncated normal with a fixed std."""
    return Init("normal", std=float(std))


def rope_freqs(head_dim: int, max_freq: float) -> Init:
    """The fixed RoPE base frequencies (walrus_jax.models.positional.rope_base_freqs)."""
    return Init("rope", rope=(int(head_dim), float(max_freq)))


ZEROS = Init("zeros")
ONES = Init("ones")


def of(var) -> Init:
    """The `Init` of a (possibly abstract) nnx.Variable; KeyError if it was declared without one."""
    spec = var.get_metadata().get(INIT_KEY)
    if spec is None:
        raise KeyError(f"variable {type(var).__name__}{tuple(var.get_value().shape)} has no '{INIT_KEY}' metadata "
                       f"(declare it with walrus_jax.models.layers.param)")
    return spec


def truncated_normal_np(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 unit-variance standard normals truncated to [-2, 2] (redrawn until inside)."""
    z = rng.standard_normal(shape, dtype=np.float32).reshape(-1)
    bad = np.flatnonzero(np.abs(z) > 2.0)
    while bad.size:
        z[bad] = rng.standard_normal(bad.size, dtype=np.float32)
        bad = bad[np.abs(z[bad]) > 2.0]
    return (z / np.float32(TRUNC_STD)).reshape(shape)
