"""HSDP mesh, logical-axis rules and global-batch assembly.

Mesh axes ('data', 'fsdp'): `fsdp` spans the devices of one group (a host / node), `data` spans
groups. Parameters and optimizer state are sharded over `fsdp` and replicated over `data` (an
all-gather inside a host per use, a gradient all-reduce across hosts per step); the batch is sharded
over both. Every weight carries one logical axis name per dimension as Flax's `out_sharding`
metadata (walrus_jax.models.layers.param; the stacked blocks' leading axis is named "layers" by
nnx.vmap). `DEFAULT_RULES` below maps logical names to mesh axes; a config's `sharding.rules` lists
only the names it maps differently.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from walrus_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# Logical axis names of walrus_jax.models' weights -> mesh axis (None: replicated). Parameters are
# sharded over 'fsdp' along their hidden (embed) dimension only; `spec_for` uses a mesh axis at most
# once per weight and only where it divides the dimension.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (("embed", "fsdp"),) + tuple((name, None) for name in (
    "layers",  # the stacked blocks' leading axis
    "qkv", "fused", "attn", "mlp",  # attention / MLP projection outputs and inputs
    "heads", "head_dim", "buckets",  # per-head norms and the relative-position bias table
    "inter", "vocab", "kh", "kw", "kd",  # encoder / decoder convolutions
    "rope", "rope_axes", "tok_h", "tok_w", "tok_d",  # RoPE frequencies, absolute position grid
    "lora_rank",  # low-rank adapters' inner axis
))


# ------------------------------------------------------------------------------------ mesh
def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int]:
    """(data, fsdp) from `config.mesh`; -1 on one axis means "all remaining devices".

    Raises a clear error when the product does not equal the number of devices.
    """
    data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)
    if data == -1 and fsdp == -1:
        raise ConfigError("mesh.data and mesh.fsdp cannot both be -1")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if known <= 0 or n_devices % known:
            raise ConfigError(f"mesh: {'mesh.fsdp' if data == -1 else 'mesh.data'}={known} does not divide the "
                             f"{n_devices} available devices")
        data, fsdp = (n_devices // known, known) if data == -1 else (known, n_devices // known)
    if data <= 0 or fsdp <= 0 or data * fsdp != n_devices:
        raise ConfigError(f"mesh: mesh.data × mesh.fsdp = {data} × {fsdp} = {data * fsdp} does not match the "
                         f"{n_devices} available devices (jax.device_count()); set them so that the product "
                         f"is {n_devices}, or use -1 on one axis")
    return data, fsdp


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh. fsdp groups are contiguous in process order, so on a multi-host
    system one fsdp group sits on one host (fast intra-host links) when fsdp = local devices."""
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(mesh_cfg, len(devices))
    # Sort by (process, id) so that a group of `fsdp` consecutive devices shares a process.
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), MESH_AXES)


# ------------------------------------------------------------------------------ rules
def rules_dict(rules: Iterable[Sequence[Any]] | Mapping[str, Any] = (), mesh: Mesh | None = None,
               where: str = "sharding.rules") -> dict[str, Any]:
    """`DEFAULT_RULES` with the overrides `rules` applied, validated; the one place rules are merged.

    rules: [(logical name, mesh axis or None), ...] or {logical name: mesh axis or None}.
    mesh None: a training config's `sharding.rules` for the HSDP mesh: axes `MESH_AXES`, parameters
      never over 'data'. mesh given: rules for placing weights on that mesh (walrus_jax.checkpoints.load):
      any of its axis names. Errors name the rule as `where`[i].
    """
    out = dict(DEFAULT_RULES)
    pairs = rules.items() if isinstance(rules, Mapping) else rules
    axes = MESH_AXES if mesh is None else tuple(mesh.axis_names)
    for i, rule in enumerate(pairs):
        if len(rule) != 2:
            raise ConfigError(f"{where}[{i}] = {rule!r}: expected a (logical_name, mesh_axis) pair")
        name, axis = rule
        if name not in out:
            raise ConfigError(f"{where}[{i}]: {name!r} is not a logical axis name of the model "
                              f"(known: {sorted(out)})")
        if mesh is None and axis is not None and axis not in MESH_AXES:
            raise ConfigError(f"{where}[{i}]: mesh axis {axis!r} for {name!r} is not one of {MESH_AXES} or None")
        if mesh is not None and any(a is not None and a not in axes
                                    for a in (axis if isinstance(axis, (tuple, list)) else (axis,))):
            raise ConfigError(f"{where}: rule {name!r} -> {axis!r} names a mesh axis the mesh lacks "
                              f"(mesh axes: {axes})")
        if axis == "data" and mesh is None:
            raise ConfigError(f"{where}[{i}]: parameters are replicated over 'data' (HSDP); map {name!r} "
                             "to 'fsdp' or None")
        out[str(name)] = axis
    return out


def logical_names(variable) -> tuple | None:
    """The logical axis names of an NNX Variable (its `out_sharding` metadata), or None."""
    names = variable.get_metadata().get("out_sharding") if hasattr(variable, "get_metadata") else None
    return None if names is None else tuple(names)


def spec_for(names: Sequence[str | None] | None, shape: Sequence[int], rules: Mapping[str, Any],
             mesh: Mesh, path: str = "") -> P:
    """PartitionSpec for one weight: each logical name mapped through `rules`.

    A mesh axis is used at most once per weight (the first dimension that asks for it wins) and
    only where it divides the dimension; otherwise that dimension is replicated. Unknown logical
    names are an error (a typo in the rules table or the model should not silently replicate).
    """
    if names is None:
        return P()
    if len(names) != len(shape):
        raise ConfigError(f"weight {path}: {len(names)} logical axis names {tuple(names)} for shape {tuple(shape)}")
    used, out = set(), []
    for n, size in zip(names, shape):
        if n is None:
            out.append(None)
            continue
        if n not in rules:
            raise ConfigError(f"weight {path}: logical axis name {n!r} has no entry in the sharding rules "
                           f"(known: {sorted(rules)})")
        axis = rules[n]
        if axis is None or axis in used or size % mesh.shape[axis]:
            out.append(None)
        else:
            used.add(axis)
            out.append(axis)
    return P(*out)


def param_specs(model_state, rules: Mapping[str, Any], mesh: Mesh):
    """Pure-dict tree of PartitionSpecs for an nnx.State of Variables (as from nnx.split)."""
    from flax import nnx

    def one(path, var):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        shape = value.shape if hasattr(value, "shape") else np.shape(value)
        return spec_for(logical_names(var), shape, rules, mesh, "/".join(map(str, path)))

    specs = jax.tree_util.tree_map_with_path(
        lambda p, v: one([getattr(k, "key", getattr(k, "name", k)) for k in p], v), model_state,
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def named(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis sharded over both mesh axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


# -------------------------------------------------------------------------- global batch
def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray], batch_keys: Iterable[str]) -> dict[str, jax.Array]:
    """Assembles per-process batches into global arrays sharded over ('data', 'fsdp').

    local: this process's slice of the global batch, arrays (B_local, ...) for `batch_keys`;
    other entries (shared by the batch: field indices, masks) must be identical on every
    process and are replicated. Works unchanged with one process.
    """
    out = {}
    keys = set(batch_keys)
    for k, v in local.items():
        if k in keys:
            arr = np.asarray(v)
            out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, arr.ndim), arr)
        else:
            arr = np.asarray(v)
            out[k] = jax.make_array_from_process_local_data(replicated(mesh), arr, arr.shape)
    return out


def n_devices(mesh: Mesh) -> int:
    return math.prod(mesh.shape.values())


def _dict_suffix(path) -> tuple:
    """The trailing run of dict keys of a key path (a parameter's path inside an optimizer state)."""
    out = []
    for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        out.append(k.key)
    return tuple(reversed(out))


def like_params(tree, params, param_shardings, mesh: Mesh):
    """Shardings for a tree that embeds params-shaped subtrees (an optimizer state: moments,
    accumulated gradients): a leaf whose trailing dict-key path and shape match a parameter (e.g.
    the moments `mu`/<parameter path>) gets that parameter's sharding; everything else (counters,
    per-parameter step counts and flags, scalars) is replicated."""
    p_flat = jax.tree_util.tree_flatten_with_path(params)[0]
    s_flat = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    by_path = {tuple(k.key for k in path): (tuple(np.shape(v) if not hasattr(v, "shape") else v.shape), s)
               for (path, v), s in zip(p_flat, s_flat)}
    rep = replicated(mesh)

    def pick(path, leaf):
        keys = _dict_suffix(path)
        for i in range(len(keys)):  # the longest trailing key path that names a parameter
            hit = by_path.get(keys[i:])
            if hit is not None:
                return hit[1] if tuple(getattr(leaf, "shape", ())) == hit[0] else rep
        return rep

    return jax.tree_util.tree_map_with_path(pick, tree)
