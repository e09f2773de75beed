"""The one way from a path to a model: `load_model`, above the three on-disk formats.

    model = load_model(path)                                  # as stored (dtype), one device
    model = load_model(path, dtype="bfloat16", remat="full")  # bf16 parameters and compute; overrides
    model = load_model(path, mesh=mesh)                       # each device gets only its shards
    model = load_model(base, adapters=delta_or_workdir)       # a LoRA fine-tuned model
    model.vocab, model.source                                 # field vocabulary (or None), provenance
    weights = read_weights(path)                              # Weights(cfg, params, vocab, source) on the host

`path` is either
  * a training workdir (or its `checkpoints/` folder): its newest readable checkpoint
    (`walrus_jax.checkpoints.train_state`, parameters, model config and field vocabulary); or
  * a converted release (`tools.convert_torch_ckpt` / `save_pretrained` output,
    `walrus_jax.checkpoints.pretrained`);
and `adapters` an adapter delta or a LoRA fine-tuning workdir (`walrus_jax.checkpoints.adapters`).
Those format modules only read and write their files; which format a path holds, and how its
arrays become a placed model, is decided here only. The public `walrus_jax.load_pretrained` and
`walrus_jax.from_pretrained`, the rollout and eval jobs and the adapter merge tool call
`load_model`; fine-tuning (`config.init_from`) reads host parameters with `read_weights`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Sequence

import jax
from flax import nnx

from walrus_jax import host_memory, sharding
from walrus_jax.checkpoints import adapters as delta_format
from walrus_jax.checkpoints import params as parameters
from walrus_jax.checkpoints import pretrained as release
from walrus_jax.checkpoints import train_state
from walrus_jax.checkpoints.train_state import checkpoint_dir
from walrus_jax.errors import DataError, PathError
from walrus_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["Weights", "check_path", "checkpoint_dir", "field_vocabulary", "load_model", "load_pretrained",
           "read_weights"]

DTYPES = release.DTYPES
# ModelConfig fields that change parameter shapes: they come from the checkpoint, never from overrides.
SHAPE_FIELDS = frozenset({"hidden_dim", "intermediate_dim", "n_blocks", "num_heads", "n_states", "include_d",
                          "kernel_sizes", "learned_rope", "ape_grid", "rel_pos_buckets"})


@dataclasses.dataclass
class Weights:
    cfg: ModelConfig
    params: dict  # nested dict of numpy arrays
    vocab: Any  # FieldVocabulary
    source: str


# ------------------------------------------------------------------------------ which format
def check_path(path: str, what: str = "config init_from") -> None:
    """Fails early (before any compute) when `path` points at nothing usable; errors name it as
    `what`={path} (the setting the user gave it in)."""
    if not os.path.exists(path):
        raise PathError(f"{what}={path!r} does not exist (expected a walrus_jax workdir or a "
                        "converted checkpoint directory from tools.convert_torch_ckpt)")
    if checkpoint_dir(path) is not None:
        return
    if os.path.isfile(os.path.join(path, delta_format.DELTA_FILE)):
        raise PathError(f"{what}={path!r} is an adapter delta ({delta_format.DELTA_FILE}), not a whole model: pass "
                        "it as adapters= together with the base checkpoint it was trained on (configs/rollout.py "
                        "`adapters`, load_pretrained(base, adapters=...)), or merge it with tools.merge_adapters")
    if not os.path.isdir(path) or not os.listdir(path):
        raise PathError(f"{what}={path!r} is not a walrus_jax workdir (no checkpoints/<step>/state) "
                        "and not a converted checkpoint directory")


def read_weights(path: str, what: str = "config init_from") -> Weights:
    """Parameters (nnx.Param, host numpy arrays in their stored dtypes), architecture and vocabulary
    (the released one when the checkpoint stores none) of the checkpoint at `path`; errors name it
    as `what`={path}."""
    from walrus_jax.data import FieldVocabulary

    check_path(path, what)
    ck = checkpoint_dir(path)
    if ck is not None:
        step, params, meta = train_state.read_params(ck, what=f"{what}={path!r}")
        vocab = FieldVocabulary.from_dict(meta["vocab"]) if meta.get("vocab") else FieldVocabulary.released()
        return Weights(ModelConfig.from_dict(meta["model_config"]), params, vocab, f"{ck}/{step}")
    cfg, params, vocab = release.read_params(path)
    if vocab is None:
        vocab = FieldVocabulary.released()
    elif not isinstance(vocab, FieldVocabulary):
        vocab = FieldVocabulary.from_dict(vocab)
    return Weights(cfg, params, vocab, path)


# ------------------------------------------------------------------------------ the model
def load_model(path: str, *, adapters: str | None = None, dtype: str | None = None,
               mesh: jax.sharding.Mesh | None = None,
               rules: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
               what: str | None = None, **overrides):
    """A walrus_jax.Walrus with the parameters stored at `path` (module docstring).

    dtype: None (as stored: the checkpoint's param_dtype / dtype), "float32" or "bfloat16" (both the
      storage and the compute dtype; the fixed RoPE frequency buffer stays float32 as the model
      creates it).
    mesh: place every array directly with its NamedSharding over this mesh (a converted release is
      read one array at a time: no full host copy per device). Shardings come from the weights'
      logical axis names through `walrus_jax.sharding.rules_dict(rules, mesh)` (DEFAULT_RULES:
      'embed' over 'fsdp', everything else replicated; `rules` {logical name: mesh axis or None}
      or pairs on top). None: everything on the default device.
    adapters: a LoRA fine-tuning workdir or an exported adapter delta made for this checkpoint: the
      fine-tuned model (adapters, new fields); a delta made for another base is refused.
    what: the setting `path` came from (e.g. "config.checkpoint"): given, `path` is checked first
      and errors name it as what={path}; None (the Python API): the format reader's own errors.
    overrides: further ModelConfig fields that do not change parameter shapes (remat, scan_layers,
      drop_path, input_field_drop, jitter_patches).
    The model's `vocab` is its field vocabulary (hashable; None when a release stores none) and its
    `source` the checkpoint it came from ("<ckpt dir>/<step>", the directory, "+ adapters ...").
    """
    if dtype is not None and str(dtype) not in DTYPES:
        raise ValueError(f"load_model: dtype={dtype!r}; expected None or one of {DTYPES}")
    bad = sorted(set(overrides) & SHAPE_FIELDS)
    if bad:
        raise ValueError(f"load_model: {bad} change parameter shapes and come from the checkpoint ({path}); they "
                         "cannot be overridden")
    if rules is not None and mesh is None:
        raise ValueError("load_model: rules= needs mesh=")
    if what is not None:
        check_path(str(path), what)
    if adapters is not None:
        return _with_adapters(str(path), str(adapters), dtype, mesh, rules, what, overrides)
    if checkpoint_dir(str(path)) is not None:
        w = read_weights(str(path), what or "checkpoint")
        model = _build(_config(w.cfg, dtype, overrides), w.params, mesh, rules, w.source)
        return _described(model, w.vocab.to_dict(), w.source)
    return _load_release(os.path.abspath(str(path)), dtype, mesh, rules, overrides)


def load_pretrained(directory: str, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                    rules: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None, adapters: str | None = None,
                    **overrides):
    """`walrus_jax.load_pretrained`: `load_model` under its public name (same arguments, same model)."""
    return load_model(directory, adapters=adapters, dtype=dtype, mesh=mesh, rules=rules, **overrides)


def field_vocabulary(model):
    """The model's field vocabulary, the released one when its checkpoint stores none.
    DataError when it names more fields than the model embeds (n_states)."""
    from walrus_jax.data import FieldVocabulary

    vocab = model.vocab if getattr(model, "vocab", None) is not None else FieldVocabulary.released()
    if len(vocab) > model.cfg.n_states:
        raise DataError(f"checkpoint {getattr(model, 'source', '?')}: its field vocabulary has {len(vocab)} names but "
                        f"the model embeds only n_states={model.cfg.n_states}")
    return vocab


def _config(cfg: ModelConfig, dtype: str | None, overrides: Mapping) -> ModelConfig:
    if dtype is not None:
        cfg = cfg.replace(param_dtype=str(dtype), dtype=str(dtype))
    return cfg.replace(**overrides) if overrides else cfg


def _described(model, vocab: Mapping | None, source: str):
    """The model with its `vocab` (hashable: a static attribute of the model) and `source`."""
    model.vocab = release.make_vocabulary(vocab)
    model.source = source
    return model


def _shardings(cfg: ModelConfig, mesh, rules) -> dict | None:
    """{"a/b/c": NamedSharding} of every variable of Walrus(cfg) over `mesh` (None without one)."""
    if mesh is None:
        return None
    state = nnx.state(parameters.abstract_model(cfg))
    if rules is None and "fsdp" not in mesh.axis_names:
        names = {n for _, var in nnx.to_flat_state(state) for n in (sharding.logical_names(var) or ()) if n is not None}
        raise ValueError(f"load_model: the mesh has axes {mesh.axis_names} and no 'fsdp' axis; pass "
                         f"rules={{logical axis name: mesh axis or None}} (names: {sorted(names)})")
    specs = sharding.param_specs(state, sharding.rules_dict(rules or (), mesh, where="rules"), mesh)
    return parameters.flatten(sharding.named(mesh, specs))


def _build(cfg: ModelConfig, params: Mapping, mesh, rules, source: str):
    """A model from host parameters: cast to cfg's dtypes, placed over `mesh` if given."""
    where = _shardings(cfg, mesh, rules)
    return parameters.model_from_params(cfg, params, source, None if where is None else parameters.unflatten(where))


def _with_adapters(path: str, adapters: str, dtype, mesh, rules, what, overrides):
    """The base at `path` with the adapters of `adapters` applied (walrus_jax.checkpoints.adapters)."""
    delta = delta_format.read_delta(adapters)
    base = read_weights(path, what or "base checkpoint")
    delta_format.check_base(delta, delta_format.fingerprint(base.params), path)
    model = _build(_config(delta.cfg, dtype, overrides), delta_format.apply_delta(base.params, delta), mesh, rules,
                   f"{path} + adapters {delta.source}")
    return _described(model, delta.vocab or None, f"{path} + adapters {adapters}")


def _load_release(directory: str, dtype, mesh, rules, overrides):
    """A converted release, each array read in its target dtype and placed as soon as it is read."""
    cfg = _config(release.model_config(directory), dtype, overrides)
    vocab = release.model_vocabulary(directory)
    host = release.read_arrays(directory, cfg)
    where = _shardings(cfg, mesh, rules)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = {}
    for name in list(host):
        # One array at a time: each device receives only its shard, and the host copy is dropped as
        # soon as the transfer is done (device_put copies asynchronously and keeps the host buffer
        # alive until then; without the wait the whole model would briefly exist twice).
        placed[name] = jax.device_put(host.pop(name), one if where is None else where[name])
        placed[name].block_until_ready()
    model = parameters.model_from_params(cfg, parameters.unflatten(placed), directory)
    # Orbax's per-group reads leave their freed buffers in glibc's arenas: at the released size
    # ~340 MiB that nobody uses would stay resident beside the weights.
    host_memory.release_free_memory()
    return _described(model, None if vocab is None else vocab.to_dict(), directory)
