"""The converted-release format: one self-describing directory, written atomically, read back as
host arrays. This module only writes and reads the format; `walrus_jax.checkpoints.load.load_model`
(also `walrus_jax.load_pretrained`) turns a directory into a model.

Layout of a converted directory (written by `tools.convert_torch_ckpt` or `save_pretrained`):

    DIR/
      params/base/                  Orbax checkpoint (StandardCheckpointHandler): every parameter
                                    outside the scanned blocks (encoders, decoders, encoder_dummy, ape),
                                    nested like nnx.to_pure_dict(nnx.state(model))
      params/layer_000/ ...         one Orbax checkpoint per block: that block's slice of every stacked
                                    processor.blocks variable (the layer axis removed). Written one at
                                    a time so that converting the 5 GB release never holds more than
                                    one block; `read_arrays` stacks them back along the layer axis.
      config.json                   ModelConfig.to_dict()
      vocabulary.json               {"field_index_map": {name: row} | null, "source": "..."}
      walrus_jax_pretrained.json    completion marker, written last: format, version, every array's
                                    path / shape / dtype, provenance

Everything is written into a hidden temporary directory beside DIR that is renamed to DIR only
after the marker is written, so an interrupted conversion never leaves a DIR that `read_marker`
accepts (a leftover `.DIR.partial-*` folder has no marker, or is never looked at).

    save_pretrained(model, DIR)                                   # a Walrus -> DIR
    write_pretrained(DIR, groups, cfg, vocabulary=..., ...)       # streamed groups -> DIR (the converter)
    read_arrays(DIR, cfg)                                         # {"a/b/c": host array}, cast to cfg's dtypes
    read_params(DIR)                                              # (config, nnx.Param host arrays, vocabulary)
    model_config(DIR), model_vocabulary(DIR)                      # ModelConfig, FieldVocabulary or None
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import nnx

from walrus_jax.checkpoints import params as parameters
from walrus_jax.errors import DataError
from walrus_jax.models.config import ModelConfig
from walrus_jax.models.init import host_buffer

FORMAT = "walrus_jax.pretrained"
VERSION = 1
MARKER = "walrus_jax_pretrained.json"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocabulary.json"
PARAMS_DIR = "params"
PARTIAL_TAG = ".partial-"
DTYPES = ("float32", "bfloat16")


class PretrainedFormatError(DataError):
    """A directory that is not a complete converted checkpoint (missing, incomplete, foreign, corrupt)."""


# ------------------------------------------------------------------------------ vocabulary
def _vocabulary_type():
    from walrus_jax.data.fields import FieldVocabulary

    class PretrainedVocabulary(FieldVocabulary):
        """The checkpoint's field vocabulary. Hashable, because it rides on the model as a static
        attribute (nnx keeps non-Variable attributes in the graph definition)."""

        def __hash__(self):
            return hash(tuple(sorted(self._map.items())))

    return PretrainedVocabulary


def make_vocabulary(mapping: Mapping[str, int] | None):
    """A hashable FieldVocabulary from a {name: row} map (None -> None)."""
    if mapping is None:
        return None
    return _vocabulary_type()(mapping)


def check_vocabulary(mapping: Mapping[str, int] | None, n_states: int, where: str) -> list[str]:
    """Problems (empty if none) of a {name: row} vocabulary against a model with n_states rows."""
    if mapping is None:
        return []
    problems = []
    if not isinstance(mapping, Mapping):
        return [f"{where}: field vocabulary must be a mapping name -> row, got {type(mapping).__name__}"]
    bad = {k: v for k, v in mapping.items() if not isinstance(v, (int, np.integer)) or isinstance(v, bool)}
    if bad:
        problems.append(f"{where}: field vocabulary rows must be integers, got {dict(list(bad.items())[:5])}")
        return problems
    over = {k: int(v) for k, v in mapping.items() if not 0 <= int(v) < n_states}
    if over:
        problems.append(f"{where}: field vocabulary has {len(mapping)} entries but rows {sorted(over.items(), key=lambda kv: kv[1])[:5]} "
                        f"are outside [0, n_states={n_states}) of the checkpoint (wrong n_states: the "
                        "vocabulary and the checkpoint's encoder/decoder rows do not belong together)")
    seen: dict[int, str] = {}
    for k, v in mapping.items():
        if int(v) in seen:
            problems.append(f"{where}: field vocabulary names {seen[int(v)]!r} and {k!r} share row {int(v)}")
        seen[int(v)] = k
    return problems


# ------------------------------------------------------------------------------ writing
def _fsync_write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def partial_dir_for(directory: str) -> str:
    """A fresh hidden temporary directory name beside `directory` (same filesystem: rename is atomic)."""
    parent, name = os.path.split(os.path.abspath(directory))
    return os.path.join(parent, f".{name}{PARTIAL_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def check_output_dir(directory: str, overwrite: bool) -> None:
    """Fails early (before any work) when `directory` exists and overwrite is off, or is a file.
    overwrite replaces only an earlier converted checkpoint (it holds the completion marker) or an
    empty directory: anything else may be the user's own files and is refused."""
    directory = os.path.abspath(directory)
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"output path {directory} exists and is not a directory; refusing to replace it")
    if os.path.lexists(directory) and not overwrite:
        raise FileExistsError(f"output directory {directory} already exists; pass --overwrite (overwrite=True) "
                              "to replace it")
    if os.path.isdir(directory) and os.listdir(directory) and not os.path.isfile(os.path.join(directory, MARKER)):
        listing = sorted(os.listdir(directory))
        raise FileExistsError(f"output directory {directory} holds {listing[:5]}{' ...' if len(listing) > 5 else ''} "
                              f"and is not an earlier converted checkpoint (no {MARKER}); --overwrite replaces only "
                              "those or an empty directory. Choose another output directory")
    parent = os.path.dirname(directory)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise NotADirectoryError(f"cannot write {directory}: {parent} is a file")


def write_pretrained(directory: str, groups: Iterable[tuple[str, Mapping]], cfg: ModelConfig, *,
                     vocabulary: Mapping[str, int] | None, vocabulary_source: str,
                     info: Mapping[str, Any] | None = None, overwrite: bool = False,
                     log: Callable[[str], None] | None = None) -> str:
    """Writes a converted-checkpoint directory atomically (module docstring) and returns its path.

    groups: (name, nested dict of arrays) for every group of `walrus_jax.checkpoints.convert.group_shapes(cfg)`
      ("base", then "layer_000", ...), consumed one at a time: each is written as its own Orbax
      checkpoint under params/<name> before the next is produced, so a converter streaming from a
      checkpoint file never holds more than one group (Orbax keeps a transient copy of everything
      handed to one save call; one call for the whole 5 GB model would double the peak memory).
    vocabulary: {field name: row} or None (recorded as none, `vocabulary_source` saying why).
    info: extra provenance stored in the marker (source file, sizes, timings).
    A failure at any point removes the temporary directory and leaves `directory` untouched.
    """
    import orbax.checkpoint as ocp

    from walrus_jax.checkpoints import convert as conv

    log = log or (lambda s: None)
    directory = os.path.abspath(directory)
    check_output_dir(directory, overwrite)
    problems = check_vocabulary(vocabulary, cfg.n_states, "vocabulary")
    if problems:
        raise ValueError("; ".join(problems))
    expected = conv.expected_shapes(cfg)
    want = conv.group_shapes(cfg, expected)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    tmp = partial_dir_for(directory)
    os.makedirs(os.path.join(tmp, PARAMS_DIR))
    try:
        t0 = time.time()
        ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        arrays: dict[str, dict] = {}
        written = []
        for name, tree in groups:
            flat = parameters.flatten(tree, sep=None)
            if name not in want or name in written:
                raise ValueError(f"write_pretrained: unexpected parameter group {name!r}")
            got = {p: tuple(np.shape(v)) for p, v in flat.items()}
            if got != want[name]:
                diff = sorted(set(got.items()) ^ set(want[name].items()))[:6]
                raise ValueError(f"write_pretrained: group {name!r} does not match the model config: {diff}")
            ckptr.save(os.path.join(tmp, PARAMS_DIR, name), args=ocp.args.StandardSave(dict(tree)))
            written.append(name)
            for p, v in flat.items():
                full = p if name == conv.BASE_GROUP else conv.BLOCKS + p
                arrays["/".join(full)] = {"shape": list(expected[full]), "dtype": str(np.dtype(v.dtype))}
            del tree, flat
        missing = [g for g in want if g not in written]
        if missing:
            raise ValueError(f"write_pretrained: parameter groups {missing} were not written")
        log(f"wrote {len(written)} Orbax parameter groups in {time.time() - t0:.1f} s")
        _fsync_write(os.path.join(tmp, CONFIG_FILE), json.dumps(cfg.to_dict(), indent=2) + "\n")
        _fsync_write(os.path.join(tmp, VOCAB_FILE), json.dumps(
            {"field_index_map": None if vocabulary is None else {str(k): int(v) for k, v in vocabulary.items()},
             "source": vocabulary_source}, indent=2) + "\n")
        marker = {
            "format": FORMAT, "version": VERSION, "complete": True,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "groups": written,
            "n_arrays": len(arrays),
            "n_elements": int(sum(int(np.prod(a["shape"])) for a in arrays.values())),
            "arrays": dict(sorted(arrays.items())),
            "info": dict(info or {}),
        }
        # The marker is the last file: its presence means everything above is on disk.
        _fsync_write(os.path.join(tmp, MARKER), json.dumps(marker, indent=1) + "\n")
        if os.path.lexists(directory):  # overwrite=True (checked above): swap, then delete the old one
            old = partial_dir_for(directory) + ".old"
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_pretrained(model, directory: str, *, vocabulary=None, overwrite: bool = False,
                    info: Mapping[str, Any] | None = None) -> str:
    """Writes `model` (a walrus_jax.Walrus) as a converted-checkpoint directory that
    `walrus_jax.checkpoints.load.load_model` reads. vocabulary: FieldVocabulary / {name: row} / None (default: the
    model's `vocab` attribute if it has one)."""
    if vocabulary is None:
        vocabulary = getattr(model, "vocab", None)
    if vocabulary is not None and hasattr(vocabulary, "to_dict"):
        vocabulary = vocabulary.to_dict()
    from walrus_jax.checkpoints import convert as conv

    params = parameters.host_params(model)
    return write_pretrained(directory, conv.split_groups(params, model.cfg), model.cfg, vocabulary=vocabulary,
                            vocabulary_source="save_pretrained" if vocabulary is not None else "none",
                            info={"written_by": "walrus_jax.pretrained.save_pretrained", **dict(info or {})},
                            overwrite=overwrite)


# ------------------------------------------------------------------------------ reading
def read_marker(directory: str) -> dict:
    """The completion marker of a converted directory; PretrainedFormatError naming what is wrong."""
    directory = os.path.abspath(str(directory))
    if not os.path.exists(directory):
        raise FileNotFoundError(f"pretrained checkpoint directory {directory} does not exist (convert the released "
                                "walrus.pt with `python -m tools.convert_torch_ckpt --checkpoint walrus.pt --config "
                                "extended_config.yaml --output DIR`)")
    if not os.path.isdir(directory):
        raise PretrainedFormatError(f"{directory} is a file, not a converted checkpoint directory (a torch .pt file "
                                    "must be converted first with `python -m tools.convert_torch_ckpt`)")
    marker = os.path.join(directory, MARKER)
    if not os.path.isfile(marker):
        name = os.path.basename(directory)
        if PARTIAL_TAG in name:
            why = "it is the temporary directory of an interrupted conversion; run the converter again"
        elif os.path.isdir(os.path.join(directory, "checkpoints")):
            why = "it looks like a walrus_jax training workdir; use config.init_from or walrus_jax.checkpoints.load"
        elif not os.listdir(directory):
            why = "it is empty"
        else:
            listing = sorted(os.listdir(directory))
            why = f"it holds {listing[:8]}{' ...' if len(listing) > 8 else ''}, not a converter output"
        raise PretrainedFormatError(f"{directory} is not a complete walrus_jax converted checkpoint: the completion "
                                    f"marker {MARKER} is missing ({why})")
    try:
        with open(marker) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PretrainedFormatError(f"{marker}: unreadable completion marker ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("complete") is not True:
        raise PretrainedFormatError(f"{marker}: not a walrus_jax converted-checkpoint marker (format "
                                    f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    if int(meta.get("version", -1)) > VERSION:
        raise PretrainedFormatError(f"{marker}: format version {meta.get('version')} is newer than this walrus_jax "
                                    f"reads ({VERSION}); upgrade walrus_jax")
    for name in (CONFIG_FILE, VOCAB_FILE, PARAMS_DIR):
        if not os.path.exists(os.path.join(directory, name)):
            raise PretrainedFormatError(f"{directory}: incomplete converted checkpoint, {name} is missing")
    return meta


def model_config(directory: str) -> ModelConfig:
    """The ModelConfig stored in a converted directory."""
    read_marker(directory)
    path = os.path.join(os.path.abspath(directory), CONFIG_FILE)
    try:
        with open(path) as f:
            return ModelConfig.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
        raise PretrainedFormatError(f"{path}: cannot read the model config ({e})") from e


def model_vocabulary(directory: str):
    """The field vocabulary (a FieldVocabulary: name -> encoder/decoder row) stored with a converted
    checkpoint, or None when the source config had no `data.field_index_map_override`."""
    read_marker(directory)
    path = os.path.join(os.path.abspath(directory), VOCAB_FILE)
    try:
        with open(path) as f:
            mapping = json.load(f).get("field_index_map")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise PretrainedFormatError(f"{path}: cannot read the field vocabulary ({e})") from e
    return make_vocabulary(mapping)


def _restore_host(directory: str, cfg: ModelConfig, meta: Mapping, dtypes: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    """{'a/b/c': host array (stacked blocks re-assembled)} cast to `dtypes`, read group by group."""
    import orbax.checkpoint as ocp

    from walrus_jax.checkpoints import convert as conv

    groups = conv.group_shapes(cfg)
    if list(meta.get("groups", [])) != list(groups):
        raise PretrainedFormatError(f"{directory}: the marker lists parameter groups {meta.get('groups')}, the model "
                                    f"config expects {list(groups)}")
    ckptr = ocp.PyTreeCheckpointer()
    out: dict[str, np.ndarray] = {}
    for g, shapes in groups.items():
        full = {p: (p if g == conv.BASE_GROUP else conv.BLOCKS + p) for p in shapes}
        args = parameters.unflatten({p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtypes["/".join(full[p])])
                           for p in shapes}, sep=None)
        path = os.path.join(directory, PARAMS_DIR, g)
        try:
            tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
        except Exception as e:  # noqa: BLE001 - any Orbax failure here means missing or damaged files
            raise PretrainedFormatError(f"{path}: the Orbax parameter checkpoint cannot be read "
                                        f"({type(e).__name__}: {str(e)[:400]}); the directory is damaged, "
                                        "convert again") from e
        for p, v in parameters.flatten(tree, sep=None).items():
            name = "/".join(full[p])
            if tuple(v.shape) != tuple(shapes.get(p, ())):
                raise PretrainedFormatError(f"{path}: array {'/'.join(p)} has shape {v.shape}, expected {shapes.get(p)}")
            if g == conv.BASE_GROUP:
                out[name] = v
            else:
                i = int(g.split("_")[1])
                if name not in out:
                    # 64-byte aligned: on CPU the device array then uses this memory instead of a
                    # copy (a stacked weight of the released model is up to 2.2 GB)
                    out[name] = host_buffer((cfg.n_blocks,) + tuple(v.shape), dtypes[name])
                out[name][i] = v
    return out


def _check_stored(directory: str, meta: Mapping, state) -> None:
    """PretrainedFormatError listing every difference between the marker's arrays and the model's variables."""
    flat = {parameters.SEP.join(path): var for path, var in parameters.variables(state).items()}
    stored = meta.get("arrays", {})
    problems = []
    for name in sorted(set(flat) - set(stored)):
        problems.append(f"model variable {name} {tuple(flat[name].get_value().shape)} is not in the checkpoint")
    for name in sorted(set(stored) - set(flat)):
        problems.append(f"checkpoint array {name} {tuple(stored[name]['shape'])} has no model variable")
    for name in sorted(set(stored) & set(flat)):
        want = tuple(flat[name].get_value().shape)
        if tuple(stored[name]["shape"]) != want:
            problems.append(f"{name}: checkpoint shape {tuple(stored[name]['shape'])}, model expects {want}")
    if problems:
        raise PretrainedFormatError(f"{directory}: the stored parameters do not fit the model described by its "
                                    f"{CONFIG_FILE} ({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems))


def read_arrays(directory: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """{'a/b/c': host array} of every stored variable of a converted directory, read group by group
    (stacked blocks re-assembled along the layer axis) and cast while read to the dtype `cfg` gives
    each variable. cfg: the stored config, or one that changes no parameter shape (dtypes, remat).
    PretrainedFormatError when the stored arrays do not fit `cfg`."""
    directory = os.path.abspath(str(directory))
    meta = read_marker(directory)
    state = nnx.state(parameters.abstract_model(cfg))
    _check_stored(directory, meta, state)
    dtypes = {parameters.SEP.join(path): np.dtype(var.get_value().dtype)
              for path, var in parameters.variables(state).items()}
    return _restore_host(directory, cfg, meta, dtypes)


def read_params(directory: str) -> tuple[ModelConfig, dict, Any]:
    """(model config, parameters (nnx.Param variables) as a nested dict of host numpy arrays in their
    stored dtypes, vocabulary or None) of a converted directory, without building a model."""
    directory = os.path.abspath(str(directory))
    cfg = model_config(directory)
    host = read_arrays(directory, cfg)
    kinds = {parameters.SEP.join(path): var
             for path, var in parameters.variables(parameters.abstract_model(cfg)).items()}
    # nnx.Param only, as a training checkpoint holds them: fixed buffers come from the model config
    params = {name: v for name, v in host.items() if isinstance(kinds[name], nnx.Param)}
    return cfg, parameters.unflatten(params), model_vocabulary(directory)
