"""Adapter fine-tuning around a frozen base checkpoint: what trains, delta checkpoints, merging.

With `lora.rank > 0` (configs/finetune.py:lora) the model gets low-rank adapters on the block
projections (models/lora.py) and only these train, plus what fine-tuning adds on top of the base:

  * adapter matrices A, B                         (whole arrays)
  * new vocabulary rows of the encoder / decoder  (only the rows >= the base's n_states; the base
                                                   rows stay frozen, the copied encoder columns
                                                   scaled by √(n_old / n_new) as fine-tuning does)
  * learnable RoPE frequencies / absolute position embedding, when enabled (whole arrays)

Every other parameter is the base's, unchanged. A *delta* is exactly those trained values (43 MB in
float32 for the 1.3B model at rank 16 on time.qkv + space.fused, 0.8% of the base), the fine-tuned model config, its field vocabulary and the base
checkpoint's fingerprint (`fingerprint`: sizes and a SHA-256 of every base parameter), in a folder:

    adapters.json   {"format": "walrus_jax.adapters", "version", "model_config", "base_n_states",
                     "vocab", "base": fingerprint, "arrays": {path: {"kind": "full" | "rows",
                     "axis", "shape", "dtype"}}, "digest": {"settings", "arrays"}}
    adapters.npz    one array per path ("rows": the new rows along `axis` only)

The delta checks itself: `digest.settings` is a SHA-256 of everything in adapters.json that changes
the computation (the model config with lora rank, alpha and targets, the vocabulary, the base's
fingerprint, the array listing), `digest.arrays` one of the arrays' paths, dtypes, shapes and bytes.
An edited, truncated or mixed-up delta is refused with one line naming the file (deltas of version
1, written before digests, are read with a warning).

`walrus_jax.checkpoints.load.load_model(base, adapters=DIR)` (also `walrus_jax.load_pretrained`)
rebuilds the fine-tuned model from a base and a delta or a LoRA fine-tuning workdir with
`read_delta`, `check_base` and `apply_delta` here, and refuses a delta made for another base.
`merged_params` folds the adapters into the kernels (W + A B · alpha / rank);
`python -m tools.merge_adapters` writes the result as a converted checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Mapping

import logging
import zipfile

import jax
import numpy as np
from flax import nnx

from walrus_jax.checkpoints import params as parameters
from walrus_jax.errors import ConfigError, DataError, PathError
from walrus_jax.models.config import ModelConfig
from walrus_jax.models.lora import is_adapter_path, merged_kernel

FORMAT = "walrus_jax.adapters"
VERSION = 2  # 2: adapters.json holds the digests (module docstring)
DELTA_FILE = "adapters.json"
ARRAYS_FILE = "adapters.npz"
META_KEY = "lora_base"  # training checkpoints' meta entry: {"fingerprint", "n_states"} of the base
SETTINGS_KEYS = ("model_config", "base_n_states", "vocab", "base", "arrays")  # what digest.settings covers

log = logging.getLogger(__name__)


def _param_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """{"a/b/c": ShapeDtypeStruct} of the parameters (nnx.Param, adapters included) of Walrus(cfg)."""
    state = nnx.state(parameters.abstract_model(cfg), nnx.Param)
    return {parameters.SEP.join(p): v.get_value() for p, v in parameters.variables(state).items()}


# ------------------------------------------------------------------------------ fingerprint
def fingerprint(params: Mapping) -> dict:
    """{"n_arrays", "n_elements", "sha256"} of a nested dict of arrays: the hash covers every
    array's path, dtype, shape and bytes, so any change of the base weights changes it."""
    h = hashlib.sha256()
    n = 0
    flat = parameters.flatten(params)
    for path in sorted(flat):
        a = np.ascontiguousarray(np.asarray(flat[path]))
        h.update(f"{path}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
        n += a.size
    return {"n_arrays": len(flat), "n_elements": int(n), "sha256": h.hexdigest()}


# ------------------------------------------------------------------------------ what trains
@functools.lru_cache(maxsize=8)
def vocab_axes(cfg: ModelConfig) -> dict[str, int]:
    """{parameter path: axis} of the parameters with one row per vocabulary entry (encoder input,
    decoder output), found by comparing the shapes of cfg and cfg with one more field."""
    a, b = _param_shapes(cfg), _param_shapes(cfg.replace(n_states=cfg.n_states + 1))
    out = {}
    for k, s in a.items():
        diff = [i for i, (x, y) in enumerate(zip(s.shape, b[k].shape)) if x != y]
        if diff:
            out[k] = diff[0]
    return out


def trained_parts(cfg: ModelConfig, n_base_states: int, paths) -> dict[str, Any]:
    """{path: True | ("rows", axis)} for the parameters that adapter fine-tuning trains (module
    docstring); the other paths freeze."""
    axes = vocab_axes(cfg.replace(lora_rank=0))
    out: dict[str, Any] = {}
    for p in paths:
        leaf = p.rsplit("/", 1)[-1]
        if is_adapter_path(p) or (leaf == "rope_freqs" and cfg.learned_rope != "none") or \
                (leaf == "ape" and cfg.ape_grid is not None):
            out[p] = True
        elif p in axes and cfg.n_states > n_base_states:
            out[p] = ("rows", axes[p])
    return out


def trainable_mask(params_abstract: Mapping, cfg: ModelConfig, n_base_states: int) -> dict:
    """The optimizer's trainable mask (walrus_jax.training.optim) for adapter fine-tuning: True for whole
    trained arrays, a bool array (True on the new rows, broadcastable) for the vocabulary rows,
    False elsewhere. Same nesting as params_abstract."""
    flat = parameters.flatten(params_abstract)
    parts = trained_parts(cfg, n_base_states, flat)
    out = {}
    for p, v in flat.items():
        what = parts.get(p, False)
        if isinstance(what, tuple):
            axis = what[1]
            shape = [1] * len(v.shape)
            shape[axis] = v.shape[axis]
            m = np.zeros(shape, bool)
            np.moveaxis(m, axis, 0)[n_base_states:] = True
            out[p] = m
        else:
            out[p] = what
    return parameters.unflatten(out)


def count_trainable(params_abstract: Mapping, mask) -> tuple[int, int]:
    """(trainable entries, all entries) of params under a trainable mask (None: all train)."""
    flat = parameters.flatten(params_abstract)
    total = sum(int(np.prod(v.shape)) for v in flat.values())
    if mask is None:
        return total, total
    m = parameters.flatten(mask)
    n = 0
    for p, v in flat.items():
        on = np.asarray(m[p])
        n += int(np.prod(v.shape)) if on.ndim == 0 and on else int(np.sum(np.broadcast_to(on, v.shape)))
    return n, total


# ------------------------------------------------------------------------------ deltas
@dataclasses.dataclass
class Delta:
    cfg: ModelConfig  # the fine-tuned model (adapters included)
    base_n_states: int
    vocab: dict  # {field name: row} of the fine-tuned model
    base: dict  # fingerprint of the base parameters
    arrays: dict  # {path: array}: whole arrays, or the new rows for ("rows", axis) parts
    source: str


def delta_from_params(params: Mapping, cfg: ModelConfig, base_n_states: int, vocab, base_fp: Mapping,
                      source: str = "params") -> Delta:
    """The trained part of a fine-tuned model's parameters (nested dict of arrays)."""
    flat = parameters.flatten(params)
    arrays = {}
    for p, what in trained_parts(cfg, base_n_states, flat).items():
        a = np.asarray(flat[p])
        arrays[p] = a if what is True else np.take(a, np.arange(base_n_states, a.shape[what[1]]), axis=what[1])
    vocab = vocab.to_dict() if hasattr(vocab, "to_dict") else dict(vocab or {})
    return Delta(cfg, int(base_n_states), vocab, dict(base_fp), arrays, source)


def settings_digest(meta: Mapping) -> str:
    """SHA-256 of the computation-relevant entries of adapters.json (SETTINGS_KEYS), canonical JSON."""
    text = json.dumps({k: meta.get(k) for k in SETTINGS_KEYS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def arrays_digest(arrays: Mapping[str, Any]) -> str:
    """SHA-256 of a flat {path: array} (paths, dtypes, shapes, bytes)."""
    return fingerprint(parameters.unflatten({p: np.asarray(a) for p, a in arrays.items()}))["sha256"]


def write_delta(directory: str, delta: Delta) -> str:
    """Writes `delta` as DIRECTORY/adapters.json + adapters.npz (module docstring); returns the path."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    parts = trained_parts(delta.cfg, delta.base_n_states, delta.arrays)
    listing = {p: {"kind": "full" if what is True else "rows", "axis": None if what is True else int(what[1]),
                   "shape": list(np.shape(delta.arrays[p])), "dtype": str(np.asarray(delta.arrays[p]).dtype)}
               for p, what in sorted(parts.items())}
    tmp = os.path.join(directory, ARRAYS_FILE + ".tmp.npz")
    np.savez(tmp, **{p.replace("/", "|"): np.asarray(a) for p, a in delta.arrays.items()})
    os.replace(tmp, os.path.join(directory, ARRAYS_FILE))
    meta = {"format": FORMAT, "version": VERSION, "model_config": delta.cfg.to_dict(),
            "base_n_states": delta.base_n_states, "vocab": delta.vocab, "base": delta.base, "arrays": listing,
            "source": delta.source}
    # Digested as it reads back (tuples become lists in JSON).
    meta["digest"] = {"settings": settings_digest(json.loads(json.dumps(meta))), "arrays": arrays_digest(delta.arrays)}
    with open(os.path.join(directory, DELTA_FILE + ".tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(directory, DELTA_FILE + ".tmp"), os.path.join(directory, DELTA_FILE))
    return directory


def read_delta(path: str) -> Delta:
    """The delta in `path`: an exported delta folder (adapters.json) or a LoRA fine-tuning workdir
    (its newest checkpoint). Errors name the path."""
    path = os.path.abspath(str(path))
    if not os.path.exists(path):
        raise PathError(f"adapters={path!r} does not exist (expected a LoRA fine-tuning workdir or an exported "
                        f"adapter delta with {DELTA_FILE})")
    if os.path.isfile(os.path.join(path, DELTA_FILE)):
        return _read_delta_folder(path)
    return _delta_from_workdir(path)


def _read_delta_folder(path: str) -> Delta:
    """An exported delta, checked against its digests (module docstring). DataError naming the file."""
    jpath, npath = os.path.join(path, DELTA_FILE), os.path.join(path, ARRAYS_FILE)
    try:
        with open(jpath) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{jpath}: not readable as JSON ({e}); the adapter delta is damaged (cut off?): export it "
                        "again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("version"), int) \
            or meta["version"] > VERSION:
        got = meta if not isinstance(meta, dict) else {k: meta.get(k) for k in ("format", "version")}
        raise DataError(f"{jpath}: not a walrus_jax adapter delta of a version this walrus_jax reads ({got})")
    if not os.path.isfile(npath):
        raise PathError(f"{npath}: missing (an adapter delta is {DELTA_FILE} and {ARRAYS_FILE} together)")
    try:
        with np.load(npath, allow_pickle=False) as z:
            arrays = {k.replace("|", "/"): np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{npath}: unreadable ({type(e).__name__}: {e}); the adapter delta is damaged (truncated?): "
                        "export it again") from None
    digest = meta.get("digest")
    if meta["version"] >= 2:
        if not isinstance(digest, dict):
            raise DataError(f"{jpath}: has no digest (version {meta['version']} deltas carry one): edited?")
        if digest.get("settings") != settings_digest(meta):
            raise DataError(f"{jpath}: its settings (model config, lora rank / alpha / targets, vocabulary, base "
                            "fingerprint or array listing) differ from those the delta was written with: the file "
                            "was edited; export the delta again")
        if digest.get("arrays") != arrays_digest(arrays):
            raise DataError(f"{npath}: its arrays differ from those the delta was written with (edited, truncated or "
                            f"from another delta than {DELTA_FILE}); export the delta again")
    else:
        log.warning("%s: a version-%s delta (written before deltas carried digests): not checked", jpath,
                    meta["version"])
    try:
        return Delta(ModelConfig.from_dict(meta["model_config"]), int(meta["base_n_states"]), meta["vocab"],
                     meta["base"], arrays, path)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{jpath}: incomplete adapter delta ({type(e).__name__}: {e})") from None


def _delta_from_workdir(path: str) -> Delta:
    """The trained part of the newest checkpoint of a LoRA fine-tuning workdir."""
    from walrus_jax.checkpoints import train_state
    from walrus_jax.data.fields import FieldVocabulary

    ck = train_state.checkpoint_dir(path)
    if ck is None:
        raise PathError(f"adapters={path!r} is neither an exported adapter delta ({DELTA_FILE} missing) nor a "
                        "fine-tuning workdir (no checkpoints/<step>/state)")
    step, params, meta = train_state.read_params(ck, what=f"adapters={path!r}")
    cfg, source = ModelConfig.from_dict(meta["model_config"]), f"{ck}/{step}"
    if META_KEY not in meta or cfg.lora_rank <= 0:
        raise DataError(f"adapters={path!r}: checkpoint {source} was not trained with adapters (lora.rank "
                        "> 0 and init_from): it holds a whole model; use it as init_from / checkpoint instead")
    vocab = FieldVocabulary.from_dict(meta["vocab"]) if meta.get("vocab") else FieldVocabulary.released()
    info = meta[META_KEY]
    return delta_from_params(params, cfg, int(info["n_states"]), vocab, info["fingerprint"], source)


def check_base(delta: Delta, base_fp: Mapping, base_source: str) -> None:
    """Refuses a delta made for another base checkpoint (one line naming both)."""
    if delta.base.get("sha256") != base_fp.get("sha256"):
        raise ConfigError(f"adapters {delta.source} were trained on another base checkpoint than {base_source} "
                          f"(base fingerprint {str(delta.base.get('sha256'))[:12]}…, "
                          f"{delta.base.get('n_elements')} values; this base {base_fp['sha256'][:12]}…, "
                          f"{base_fp['n_elements']} values)")


def apply_delta(base_params: Mapping, delta: Delta) -> dict:
    """The fine-tuned model's parameters (nested dict of numpy arrays) from the base's and a delta:
    trained arrays from the delta, new vocabulary rows appended to the base rows (encoder columns
    scaled by √(n_old / n_new) as fine-tuning does), everything else the base's."""
    base = parameters.flatten(base_params)
    want = _param_shapes(delta.cfg)
    parts = trained_parts(delta.cfg, delta.base_n_states, want)
    n_old, n_new = delta.base_n_states, delta.cfg.n_states
    out = {}
    for p, abstract in want.items():
        what = parts.get(p)
        if what is True:
            v = delta.arrays[p]
        elif p not in base:
            raise DataError(f"adapters {delta.source}: parameter {p} is neither in the delta nor in the base")
        elif what is None:
            v = np.asarray(base[p])
        else:
            old = np.asarray(base[p])
            if p.startswith("embed/"):
                old = old * np.sqrt(n_old / n_new)
            v = np.concatenate([old, delta.arrays[p].astype(old.dtype)], axis=what[1])
        if tuple(np.shape(v)) != tuple(abstract.shape):
            raise DataError(f"adapters {delta.source}: parameter {p} has shape {np.shape(v)}, the fine-tuned model "
                            f"expects {tuple(abstract.shape)}")
        out[p] = np.asarray(v).astype(abstract.dtype)
    return parameters.unflatten(out)


# ------------------------------------------------------------------------------ merging
def merged_params(params: Mapping, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """(parameters with every adapter folded into its kernel, the config without adapters):
    kernel + A B · alpha / rank (float64 on the host, cast back), the A / B entries removed."""
    flat = {k: np.asarray(v) for k, v in parameters.flatten(params).items()}
    out = {k: v for k, v in flat.items() if not is_adapter_path(k)}
    scale = cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0
    for k in flat:
        if is_adapter_path(k) and k.endswith("/lora/a"):
            dense = k[: -len("/lora/a")]
            out[dense + "/kernel"] = merged_kernel(flat[dense + "/kernel"], flat[k], flat[dense + "/lora/b"], scale)
    plain = {f: ModelConfig.__dataclass_fields__[f].default for f in ("lora_rank", "lora_alpha", "lora_dropout",
                                                                     "lora_targets")}
    return parameters.unflatten(out), cfg.replace(**plain)


def merge_model(model):
    """A Walrus without adapters computing what `model` (with adapters) computes."""
    merged, cfg = merged_params(parameters.host_params(model), model.cfg)
    out = parameters.model_from_params(cfg, merged, "merged adapters")
    out.vocab = getattr(model, "vocab", None)
    return out
