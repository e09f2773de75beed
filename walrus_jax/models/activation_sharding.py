"""Where the model's activations live on a device mesh: the batch axis split over the mesh.

The weights carry logical axis names and are sharded by `walrus_jax.sharding`'s rules (FSDP over
'fsdp', replicated over 'data'). Activations carry none, and left to itself XLA's sharding
propagation decides per product whether to gather the weights or the activations: gathering the
activations (the samples of every device) makes the per-device memory of a train step grow with the
mesh at a fixed per-device batch, the opposite of what FSDP is for. So the model pins the leading
(batch, or batch x frames) axis of its activations to the mesh's batch axes at every projection's
input and output and at every block's boundary (MaxText's logical activation rules do the same);
XLA then gathers each block's weights, one block at a time, and keeps every device's samples on it.

The mesh is the one given to `activation_mesh` while the program is traced (walrus_jax's train,
eval and rollout steps do this), or else the mesh set with `jax.set_mesh`; with neither (one device,
or a user's own jit without a mesh) the constraints are not applied and nothing changes.

    with wj.activation_mesh(mesh):
        compiled = jax.jit(step).lower(*abstract_args).compile()
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from walrus_jax.sharding import BATCH_AXES

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("walrus_jax_activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Traces inside this context pin activations' leading axis to `mesh`'s batch axes
    ('data', 'fsdp'; those the mesh has). None: no constraints."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def current_mesh():
    """The mesh activations are placed on: `activation_mesh`'s, else `jax.set_mesh`'s, else None."""
    mesh = _MESH.get()
    if mesh is not None:
        return mesh
    abstract = jax.sharding.get_abstract_mesh()
    return None if abstract is None or abstract.empty else abstract


def _batch_axes(mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def _spec(mesh, n: int) -> P | None:
    """P(batch axes) for a leading axis of n, or None when there is nothing to split or n does not divide."""
    axes = _batch_axes(mesh)
    if not axes or n % math.prod(mesh.shape[a] for a in axes):
        return None
    return P(axes)


def batch_sharded(x: jax.Array) -> jax.Array:
    """x (batch, ...) with its leading axis split over the mesh's batch axes (see the module doc)."""
    mesh = current_mesh()
    spec = None if mesh is None else _spec(mesh, x.shape[0])
    if spec is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec)


def per_batch_shard(fn: Callable, *args: jax.Array) -> jax.Array:
    """fn(*args) run on each device's share of the leading axis (a `shard_map`); args and the result
    (batch, ...). For kernels the SPMD partitioner cannot split by itself (Pallas TPU calls). Without a
    mesh (or one device), plain fn(*args); a leading axis the mesh does not divide is computed whole on
    every device."""
    mesh = current_mesh()
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return fn(*args)
    spec = _spec(mesh, args[0].shape[0]) or P()  # P(): every device computes the whole (replicated)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)
