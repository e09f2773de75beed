"""Random initialization of a whole Walrus, with one small compiled program.

Modules declare their variables (shapes, dtypes, logical axes and how each is initialized: an
`Init` in the "init" metadata, models/initializers.py) and are built abstractly with
`nnx.eval_shape`; the values come from `init_values`, which reads each variable's `Init`. Random
weights are drawn chunk by chunk by ONE compiled function (`_draw`: a fixed-size block of truncated
normals from a folded-in key) and assembled on the host, one variable at a time:

- drawing per weight with `jax.random` inlines one threefry hash per weight shape and costs ~1 s of
  XLA compilation each on CPU (a tiny model took 45 s to construct); the chunk function compiles
  once per process for each of a few chunk sizes;
- drawing all weights as one stream inside one program kept the generator's full-size uint32
  intermediates alive together: 4x the parameters' size of XLA temporaries (2.5 GB for the 163M
  parameter medium configuration, 3.4 GB peak RSS just to build it). Chunk by chunk, the peak is
  the parameters plus one chunk.

Scheme (declared in the modules, see models/initializers.py): kernels (Dense, conv and transposed
conv) ~ truncated normal with std 1/sqrt(fan_in) (fan_in = input features x kernel taps), the T5 bias
table and the absolute position embedding ~ 0.02 x truncated normal; low-rank adapters A like a
kernel and B = 0; norm scales and encoder_dummy 1, biases 0, RoPE frequencies the lucidrains "pixel"
values. Variable i's values are chunk j = 0, 1, ... of fold_in(fold_in(key, i), j), times its std.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from walrus_jax.models import initializers
from walrus_jax.models.initializers import TRUNC_STD

_CHUNK_SIZES = (1 << 18,)  # values per draw (1 MiB of float32): one compiled generator, small host chunks


def _chunk_size(n: int) -> int:
    return next((s for s in _CHUNK_SIZES if s >= n), _CHUNK_SIZES[-1])


def _chunk(key, var, chunk, size: int) -> jax.Array:
    """float32 (size,) unit-variance truncated normals: chunk `chunk` of variable number `var`.
    With jax's default (partitionable) threefry a draw's values do not depend on its size beyond
    its length, so the traced path may use larger chunks than the eager one."""
    k = jax.random.fold_in(jax.random.fold_in(key, var), chunk)
    return jax.random.truncated_normal(k, -2.0, 2.0, (size,), jnp.float32) / TRUNC_STD


@functools.cache
def _draw(size: int):
    return jax.jit(functools.partial(_chunk, size=size))


def host_buffer(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialised numpy array whose data is 64-byte aligned: `to_device` of it is zero-copy on
    the CPU backend (jax aliases aligned host memory; numpy's own 16-byte alignment forces a copy)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def to_device(value: np.ndarray, dtype) -> jax.Array:
    """A host float32 array as a device array of `dtype`: the same memory on CPU when no cast is
    needed (value must not be written afterwards), else a cast copy."""
    if np.dtype(dtype) == value.dtype:
        return jax.device_put(value)
    return jnp.asarray(value, dtype=dtype)


def _host_random(key: jax.Array, index: int, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    """One variable: its chunks copied into one host buffer, scaled, then put on the device."""
    n = int(np.prod(shape))
    size = _chunk_size(n)
    value = host_buffer(shape)
    flat = value.reshape(-1)
    for j, start in enumerate(range(0, n, size)):
        stop = min(start + size, n)
        flat[start:stop] = np.asarray(_draw(size)(key, index, j))[:stop - start]
    flat *= np.float32(std)
    return to_device(value, dtype)


def _traced_random(key: jax.Array, randoms: list) -> dict:
    """Inside a trace (jit with out_shardings on accelerators, eval_shape): the same values, from
    one `lax.map` over every (variable, chunk) pair of each chunk size (one generator per size).
    randoms: [(index, shape, std, dtype)] -> {index: array}."""
    groups: dict[int, list] = {}
    for item in randoms:
        groups.setdefault(_chunk_size(int(np.prod(item[1]))), []).append(item)
    out = {}
    for size, items in groups.items():
        pairs = [(i, j) for i, shape, _, _ in items for j in range(-(-int(np.prod(shape)) // size))]
        ids = jnp.asarray(np.array(pairs, np.int32))
        rows = jax.lax.map(lambda p: _chunk(key, p[0], p[1], size), ids)  # (n_pairs, size)
        row = 0
        for i, shape, std, dtype in items:
            n = int(np.prod(shape))
            k = -(-n // size)
            out[i] = (rows[row:row + k].reshape(-1)[:n].reshape(shape) * np.float32(std)).astype(dtype)
            row += k
    return out


def init_values(flat_abstract: list, key: jax.Array) -> list:
    """flat_abstract: [(path, abstract Variable)] -> list of arrays, same order, each drawn as its
    variable's `Init` (metadata "init") says. Variable i's random values are chunks 0, 1, ... of
    fold_in(fold_in(key, i), chunk), times the std. Raises KeyError naming a variable without an Init."""
    specs = []
    for i, (path, var) in enumerate(flat_abstract):
        shape, dtype = tuple(var.get_value().shape), jnp.dtype(var.get_value().dtype)
        try:
            spec = initializers.of(var)
        except KeyError as e:
            raise KeyError(f"{'/'.join(str(p) for p in path)}: {e.args[0]}") from None
        specs.append((i, shape, dtype, spec))
    randoms = [(i, shape, spec.scale(shape), dtype) for i, shape, dtype, spec in specs if spec.random]
    if isinstance(key, jax.core.Tracer):
        drawn = _traced_random(key, randoms)
    else:
        drawn = {i: _host_random(key, i, shape, std, dtype) for i, shape, std, dtype in randoms}
    return [drawn[i] if spec.random else jnp.asarray(spec.constant(shape), dtype=dtype)
            for i, shape, dtype, spec in specs]
