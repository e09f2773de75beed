"""PyTorch state_dict -> walrus_jax parameters, through one declarative table.

Every PyTorch key of the original model maps to exactly one (NNX path, slot, layout transform):
the 40 blocks of the original are stacked along a leading layer axis, per-axis learnable RoPE
frequencies along a second axis. `assemble_params` consumes (key, array) pairs one at a time into
preallocated arrays, so a converter can stream a checkpoint with peak memory ~ one copy of the
output. All problems (missing keys, unexpected keys, shape mismatches) are reported together.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping

import numpy as np

from walrus_jax import host_memory
from walrus_jax.checkpoints import params as parameters
from walrus_jax.errors import DataError
from walrus_jax.models.config import ModelConfig
from walrus_jax.models.init import host_buffer, to_device


# ---------------------------------------------------------------------------- layout transforms
def _identity(a):
    return a


def _linear(a):  # torch Linear (out, in) -> (in, out)
    return a.T


def _conv1x1(a):  # torch Conv3d 1x1x1 (out, in, 1, 1, 1) -> (in, out)
    return a.reshape(a.shape[:2]).T


def _conv(a):  # torch Conv3d (out, in, kH, kW, kD) -> (kH, kW, kD, in, out)
    return a.transpose(2, 3, 4, 1, 0)


def _conv_transpose(a):  # torch ConvTranspose3d (in, out, kH, kW, kD) -> (kH, kW, kD, in, out)
    return a.transpose(2, 3, 4, 0, 1)


def _ape(a):  # (1, 1, hid, h, w, d) -> (h, w, d, hid)
    return a[0, 0].transpose(1, 2, 3, 0)


def _scalar1(a):  # encoder_dummy: () or (1,) -> (1,)
    return a.reshape(1)


# Inverse transforms (walrus_jax -> torch), used to export and by tests.
INVERSE = {
    _identity: _identity,
    _linear: lambda a: a.T,
    _conv1x1: lambda a: a.T[:, :, None, None, None],
    _conv: lambda a: a.transpose(4, 3, 0, 1, 2),
    _conv_transpose: lambda a: a.transpose(3, 4, 0, 1, 2),
    _ape: lambda a: a.transpose(3, 0, 1, 2)[None, None],
    _scalar1: _identity,
}

# (torch suffix inside blocks.N., path inside processor.blocks, transform)
BLOCK_TABLE = [
    ("time_mixing.norm1.weight", ("time", "norm", "scale"), _identity),
    ("time_mixing.input_head.weight", ("time", "qkv", "kernel"), _conv1x1),
    ("time_mixing.input_head.bias", ("time", "qkv", "bias"), _identity),
    ("time_mixing.qnorm.weight", ("time", "q_norm", "scale"), _identity),
    ("time_mixing.qnorm.bias", ("time", "q_norm", "bias"), _identity),
    ("time_mixing.knorm.weight", ("time", "k_norm", "scale"), _identity),
    ("time_mixing.knorm.bias", ("time", "k_norm", "bias"), _identity),
    ("time_mixing.rel_pos_bias.relative_attention_bias.weight", ("time", "rel_bias"), _identity),
    ("time_mixing.output_head.weight", ("time", "out", "kernel"), _conv1x1),
    ("time_mixing.output_head.bias", ("time", "out", "bias"), _identity),
    ("space_mixing.norm1.weight", ("space", "norm", "scale"), _identity),
    ("space_mixing.fused_ff_qkv.weight", ("space", "fused", "kernel"), _linear),
    ("space_mixing.fused_ff_qkv.bias", ("space", "fused", "bias"), _identity),
    ("space_mixing.ff_out.weight", ("space", "ff_out", "kernel"), _linear),
    ("space_mixing.ff_out.bias", ("space", "ff_out", "bias"), _identity),
    ("space_mixing.attn_out.weight", ("space", "attn_out", "kernel"), _linear),
    ("space_mixing.q_norm.weight", ("space", "q_norm", "scale"), _identity),
    ("space_mixing.q_norm.bias", ("space", "q_norm", "bias"), _identity),
    ("space_mixing.k_norm.weight", ("space", "k_norm", "scale"), _identity),
    ("space_mixing.k_norm.bias", ("space", "k_norm", "bias"), _identity),
]
# (torch key with {d}, path with {d}, transform) for every d in include_d
DIM_TABLE = [
    ("embed.{d}.proj1.weight", ("embed", "d{d}", "proj1"), _conv),
    ("embed.{d}.norm1.weight", ("embed", "d{d}", "norm1", "scale"), _identity),
    ("embed.{d}.proj2.weight", ("embed", "d{d}", "proj2"), _conv),
    ("embed.{d}.norm2.weight", ("embed", "d{d}", "norm2", "scale"), _identity),
    ("debed.{d}.proj1.weight", ("debed", "d{d}", "proj1"), _conv_transpose),
    ("debed.{d}.norm1.weight", ("debed", "d{d}", "norm1", "scale"), _identity),
    ("debed.{d}.proj2.weight", ("debed", "d{d}", "proj2"), _conv_transpose),
    ("debed.{d}.proj2.bias", ("debed", "d{d}", "proj2_bias"), _identity),
]
ROPE_KEY = "space_mixing.rotary_emb.freqs"
BLOCKS = ("processor", "blocks")


@dataclasses.dataclass(frozen=True)
class Target:
    path: tuple[str, ...]  # NNX state path
    index: tuple[int, ...]  # slot inside the stacked array (layer[, axis]); () for unstacked
    transform: Callable[[np.ndarray], np.ndarray]


def mapping(cfg: ModelConfig) -> dict[str, Target]:
    """Every torch key of a model with this config -> where it goes."""
    table: dict[str, Target] = {"encoder_dummy": Target(("encoder_dummy",), (), _scalar1)}
    for d in cfg.include_d:
        for key, path, fn in DIM_TABLE:
            table[key.format(d=d)] = Target(tuple(p.format(d=d) for p in path), (), fn)
    for i in range(cfg.n_blocks):
        for suffix, path, fn in BLOCK_TABLE:
            table[f"blocks.{i}.{suffix}"] = Target(BLOCKS + path, (i,), fn)
        rope_path = BLOCKS + ("space", "rope_freqs")
        if cfg.learned_rope == "per_axis":
            for a in range(3):
                table[f"blocks.{i}.{ROPE_KEY}.{a}"] = Target(rope_path, (i, a), _identity)
        else:
            table[f"blocks.{i}.{ROPE_KEY}"] = Target(rope_path, (i,), _identity)
    if cfg.ape_grid is not None:
        table["ape"] = Target(("ape",), (), _ape)
    return table


def infer_config(shapes: Mapping[str, tuple[int, ...]], base: ModelConfig) -> ModelConfig:
    """Fills in what the checkpoint's keys and shapes decide: n_states (vocabulary size), n_blocks,
    the fine-tuning variants (learnable RoPE frequencies shared or per axis, absolute position
    embedding and its token grid). Everything else comes from `base` (the YAML)."""
    over = {}
    for d in base.include_d:
        k = f"embed.{d}.proj1.weight"
        if k in shapes:
            over["n_states"] = int(shapes[k][1])
            break
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if layers:
        over["n_blocks"] = max(layers) + 1
    if any(k.endswith(ROPE_KEY + ".0") for k in shapes):
        over["learned_rope"] = "per_axis"
    elif base.learned_rope == "per_axis":
        over["learned_rope"] = "none"
    if "ape" in shapes:
        s = shapes["ape"]
        if len(s) != 6:
            raise ValueError(f"checkpoint key 'ape' has shape {s}, expected (1, 1, hidden, h, w, d)")
        over["ape_grid"] = tuple(int(v) for v in s[3:])
    else:
        over["ape_grid"] = None
    return base.replace(**over)


def expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """NNX path -> shape of every variable, from the abstract model (nothing is allocated)."""
    return {path: tuple(v.get_value().shape) for path, v in parameters.variables(parameters.abstract_model(cfg)).items()}


def expected_dtypes(cfg: ModelConfig) -> dict[tuple[str, ...], np.dtype]:
    """NNX path -> storage dtype of every variable of Walrus(cfg) (the fixed RoPE buffer stays float32
    whatever param_dtype is), from the abstract model."""
    return {path: np.dtype(v.get_value().dtype) for path, v in parameters.variables(parameters.abstract_model(cfg)).items()}


def _shape_after(transform, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of transform(array of `shape`) without allocating it (a zero-stride view)."""
    dummy = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=tuple(shape), strides=(0,) * len(shape))
    return tuple(transform(dummy).shape)


def _match(table: Mapping[str, Target], full_shapes, key: str, shape) -> tuple[Target | None, str | None]:
    """-> (target, None) when `key` maps onto the model with the right shape, else (None, problem)."""
    target = table.get(key)
    if target is None:
        return None, f"unexpected key '{key}' (shape {tuple(shape)})"
    if target.path not in full_shapes:
        return None, f"key '{key}' maps to {'.'.join(target.path)}, which this model config lacks"
    want = tuple(full_shapes[target.path][len(target.index):])
    try:
        got = _shape_after(target.transform, tuple(shape))
    except (ValueError, IndexError, TypeError):
        got = None
    if got != want:
        return None, (f"key '{key}' has shape {tuple(shape)}, expected "
                      f"{_shape_after(INVERSE[target.transform], want)} for the model config")
    return target, None


def _missing_problems(table: Mapping[str, Target], seen) -> list[str]:
    missing = sorted(set(table) - set(seen))
    if not missing:
        return []
    return [f"{len(missing)} missing key(s): " + ", ".join(f"'{k}'" for k in missing[:20])
            + (" ..." if len(missing) > 20 else "")]


def check_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, *,
                 expected: Mapping[tuple[str, ...], tuple[int, ...]] | None = None) -> list[str]:
    """Every problem `assemble_params` would report, from the keys and shapes alone (no tensor data
    is read): unexpected keys, missing keys, shape mismatches. Empty list: the state_dict fits."""
    table = mapping(cfg)
    full_shapes = expected_shapes(cfg) if expected is None else expected
    problems = [p for key, shape in shapes.items() if (p := _match(table, full_shapes, key, shape)[1])]
    return problems + _missing_problems(table, shapes)


class ConversionError(DataError):
    """All problems found while mapping a state_dict, reported together."""


def assemble_params(items: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig, *, dtype=np.float32,
                    source: str = "state_dict", on_tensor: Callable[[str], None] | None = None,
                    dtypes: Mapping[tuple[str, ...], object] | None = None,
                    shapes: Mapping[tuple[str, ...], tuple[int, ...]] | None = None) -> dict:
    """Consumes (torch key, array) pairs (one at a time, so the caller can stream them) and returns a
    nested dict {path...: np.ndarray} matching `nnx.state(Walrus(cfg))`.

    dtypes: optional per-path storage dtype (e.g. `expected_dtypes(cfg)`), overriding `dtype`.
    shapes: optional precomputed `expected_shapes(cfg)` (saves building the abstract model twice).
    Raises ConversionError listing every unexpected key, missing key and shape mismatch.
    """
    table = mapping(cfg)
    shapes = expected_shapes(cfg) if shapes is None else shapes
    out: dict[tuple[str, ...], np.ndarray] = {}
    used, problems = set(), []
    for key, tensor in items:
        target, problem = _match(table, shapes, key, np.shape(tensor))
        if problem:
            problems.append(problem)
            continue
        full = shapes[target.path]
        if target.path not in out:
            out[target.path] = np.zeros(full, dtype if dtypes is None else dtypes.get(target.path, dtype))
        # numpy casts on assignment: no extra full-size temporary
        out[target.path][target.index] = target.transform(np.asarray(tensor))
        used.add(key)
        if on_tensor is not None:
            on_tensor(key)
    missing = _missing_problems(table, used)
    problems += missing
    not_covered = sorted(".".join(p) for p in shapes if p not in out and not missing)
    if not_covered:
        problems.append("model variables with no checkpoint key: " + ", ".join(not_covered))
    if problems:
        raise ConversionError(f"{source}: cannot map onto the walrus_jax model "
                              f"({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems))
    return parameters.unflatten(out, sep=None)


def load_state_dict(model, state_dict: Mapping[str, np.ndarray], *, source: str = "state_dict") -> None:
    """Writes a PyTorch-named state_dict (numpy arrays) into `model` in place (strict).

    Every key and shape is checked before anything is written: on ConversionError the model is
    unchanged. Then one variable at a time is assembled on the host and replaces the model's
    array, so the extra memory is one variable, not a second copy of the model (the old array is
    freed as soon as it is replaced), and freed host memory is handed back to the OS at the end."""
    flat = parameters.variables(model)
    shapes = {path: tuple(var.get_value().shape) for path, var in flat.items()}
    table = mapping(model.cfg)
    problems = check_shapes({k: np.shape(v) for k, v in state_dict.items()}, model.cfg, expected=shapes)
    targets = {t.path for t in table.values()}
    problems += [f"model variable {'.'.join(p)} has no checkpoint key" for p in sorted(set(shapes) - targets)]
    if problems:
        raise ConversionError(f"{source}: cannot map onto the walrus_jax model "
                              f"({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems))
    keys_of: dict[tuple[str, ...], list[str]] = {}
    for key, t in table.items():
        keys_of.setdefault(t.path, []).append(key)
    for path, var in flat.items():
        value = host_buffer(shapes[path])  # every element is written: the keys cover each variable
        for key in keys_of[path]:
            t = table[key]
            value[t.index] = t.transform(np.asarray(state_dict[key]))
        var.set_value(to_device(value, var.get_value().dtype))
        del value
    # the per-variable host arrays freed above sit in glibc's heap holes (~1-2x the model's size)
    host_memory.release_free_memory()


def to_state_dict(model) -> dict[str, np.ndarray]:
    """The inverse mapping: walrus_jax model -> PyTorch-named float32 state_dict."""
    flat = {path: np.asarray(v[...], np.float32) for path, v in parameters.variables(model).items()}
    return {key: INVERSE[t.transform](flat[t.path][t.index]) for key, t in mapping(model.cfg).items()}


# ---------------------------------------------------------------------------- streaming by group
BASE_GROUP = "base"


def layer_group(i: int) -> str:
    return f"layer_{i:03d}"


def is_stacked(path: tuple[str, ...]) -> bool:
    """True for variables of the scanned blocks (leading layer axis)."""
    return tuple(path[:len(BLOCKS)]) == BLOCKS


def group_shapes(cfg: ModelConfig, shapes: Mapping[tuple[str, ...], tuple[int, ...]] | None = None
                 ) -> dict[str, dict[tuple[str, ...], tuple[int, ...]]]:
    """The parameters split into groups that are written one at a time: BASE_GROUP (every variable
    outside the scanned blocks, full paths) and one group per block (`layer_group(i)`: the block's
    slice of every stacked variable, paths relative to processor.blocks, shapes without the layer axis)."""
    shapes = expected_shapes(cfg) if shapes is None else shapes
    out: dict[str, dict] = {BASE_GROUP: {}}
    for i in range(cfg.n_blocks):
        out[layer_group(i)] = {}
    for path, shape in shapes.items():
        if is_stacked(path):
            for i in range(cfg.n_blocks):
                out[layer_group(i)][path[len(BLOCKS):]] = tuple(shape[1:])
        else:
            out[BASE_GROUP][path] = tuple(shape)
    return out


def assemble_groups(get: Callable[[str], np.ndarray], cfg: ModelConfig, *, dtypes=None, shapes=None,
                    release: Callable[[str], None] | None = None,
                    on_tensor: Callable[[str], None] | None = None) -> Iterable[tuple[str, dict]]:
    """Streams a state_dict group by group: yields (group name, nested dict of numpy arrays) for
    BASE_GROUP and then every block (see `group_shapes`), reading each torch key with `get(key)`
    exactly once and calling `release(key)` when its data has been copied. Peak memory: one group.

    The keys must already have passed `check_shapes` (this raises ConversionError on any
    mismatch, but only the group being built is checked then)."""
    table = mapping(cfg)
    shapes = expected_shapes(cfg) if shapes is None else shapes
    dtypes = {} if dtypes is None else dtypes
    by_group: dict[str, list[str]] = {}
    for key, t in table.items():
        g = layer_group(t.index[0]) if is_stacked(t.path) else BASE_GROUP
        by_group.setdefault(g, []).append(key)
    order = [BASE_GROUP] + [layer_group(i) for i in range(cfg.n_blocks)]
    for g in order:
        flat: dict[tuple[str, ...], np.ndarray] = {}
        for key in by_group.get(g, []):
            t = table[key]
            stacked = is_stacked(t.path)
            path = t.path[len(BLOCKS):] if stacked else t.path
            slot = t.index[1:] if stacked else t.index
            full = tuple(shapes[t.path][1:] if stacked else shapes[t.path])
            value = t.transform(np.asarray(get(key)))
            want = full[len(slot):]
            if tuple(value.shape) != want:
                raise ConversionError(f"key '{key}': shape {value.shape} after layout transform, expected {want}")
            if path not in flat:
                flat[path] = np.zeros(full, dtypes.get(t.path, np.float32))
            flat[path][slot] = value
            if release is not None:
                release(key)
            if on_tensor is not None:
                on_tensor(key)
        yield g, parameters.unflatten(flat, sep=None)


def split_groups(params: Mapping, cfg: ModelConfig) -> Iterable[tuple[str, dict]]:
    """A full nested parameter dict (stacked blocks) -> the groups of `group_shapes` (numpy views)."""
    flat = parameters.flatten(params, sep=None)
    yield BASE_GROUP, parameters.unflatten({p: v for p, v in flat.items() if not is_stacked(p)}, sep=None)
    for i in range(cfg.n_blocks):
        yield layer_group(i), parameters.unflatten({p[len(BLOCKS):]: v[i] for p, v in flat.items() if is_stacked(p)}, sep=None)


def model_from_state_dict(cfg: ModelConfig, state_dict: Mapping[str, np.ndarray], source: str = "state_dict"):
    """A Walrus model from a PyTorch-named state_dict (numpy arrays), without the random init."""
    return parameters.model_from_params(cfg, assemble_params(state_dict.items(), cfg, source=source), source)
