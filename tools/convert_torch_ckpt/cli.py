"""Released PyTorch Walrus checkpoint (+ extended_config.yaml) -> walrus_jax converted directory.

    python -m tools.convert_torch_ckpt --checkpoint walrus.pt --config extended_config.yaml --output DIR \
        [--dtype float32|bfloat16] [--overwrite] [--allow-nonfinite] [--verbose]

Input formats: the released `torch.save({"app": {"model": state_dict}})`, a bare state_dict (also
`{"model": state_dict}` / `{"state_dict": ...}`), or a `.safetensors` file. `.pt` files are read with
`torch.load(weights_only=True, mmap=True)`: a pickle that carries code or classes is refused, and
tensors stay on disk until they are used. The architecture comes from the YAML's `model` section
(`ModelConfig.from_torch_config`); what the checkpoint decides (vocabulary size n_states, learnable
RoPE frequencies shared / per axis, absolute position embedding) is inferred from its keys and
shapes, and checked against the YAML's `finetuning_mods`; the 66 <-> 64 resize of the original's
post_neutron_star_merger data is switched on (ModelConfig.resize_66_to_64) when that dataset is among
the YAML's training datasets (data.module_parameters.well_dataset_info). Every key must map through
`walrus_jax.checkpoints.convert.mapping` with the expected shape: all problems are checked from the
shapes alone, before any tensor data is read, and reported together.
Tensors are then streamed group by group (everything outside the blocks, then one block at a time)
into Orbax checkpoints, and the memory-mapped pages of each consumed tensor are released, so peak
memory is a small fraction of the checkpoint size (one block plus the encoders/decoders).
The output (`walrus_jax.checkpoints.pretrained`) is written into a temporary directory beside DIR and renamed
when complete; DIR is never half-written. Read it with `walrus_jax.load_pretrained(DIR)`.
A tensor holding NaN or Inf is refused (naming it) unless --allow-nonfinite. --overwrite replaces
only an earlier converter output (it holds the completion marker) or an empty directory, and never
a directory holding the checkpoint or the YAML. Every mistake ends in one `error: ...` line and exit
status 2 (--verbose or WALRUS_JAX_VERBOSE=1 adds the traceback).
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import re
import resource
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from walrus_jax.checkpoints import convert as conv
from walrus_jax.checkpoints import pretrained
from walrus_jax.errors import run_command, verbose_requested
from walrus_jax.models.config import ModelConfig

STATE_DICT_PATHS = (("app", "model"), ("model",), ("state_dict",))


class CheckpointReadError(conv.ConversionError):
    """The checkpoint file cannot be read safely (truncated, not a checkpoint, carries code)."""


# ---------------------------------------------------------------------------- reading checkpoints
def _page_release(tensor) -> None:
    """Drops the resident pages of a consumed memory-mapped tensor (MADV_DONTNEED). torch maps the
    file MAP_PRIVATE and never writes it, so a page touched again would simply be re-read from the
    file: this only lowers the resident set, it cannot change data."""
    try:
        storage = tensor.untyped_storage()
        start, nbytes = storage.data_ptr(), storage.nbytes()
    except Exception:  # noqa: BLE001 - best effort, never fatal
        return
    page = mmap.PAGESIZE
    lo = (start + page - 1) // page * page
    hi = (start + nbytes) // page * page
    if hi > lo and _LIBC is not None:
        _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # 4 = MADV_DONTNEED


try:
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if _LIBC is not None:
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):
    _LIBC = None


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: widen exactly
        return t.to(torch.float32).numpy()
    return t.numpy()


class Checkpoint:
    """A state_dict whose tensors are read lazily. `shapes` / `dtypes` are available without reading
    tensor data; `items()` yields (key, numpy array) one at a time."""

    def __init__(self, path: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
                 get: Callable[[str], Any], release: Callable[[Any], None], fmt: str, notes: list[str]):
        self.path, self.shapes, self.dtypes, self.format, self.notes = path, shapes, dtypes, fmt, notes
        self._get, self._release = get, release

    def get_numpy(self, key: str) -> np.ndarray:
        """The tensor `key` as a numpy array (a view of the memory map where possible)."""
        t = self._get(key)
        return t if isinstance(t, np.ndarray) else _torch_to_numpy(t)

    def release(self, key: str) -> None:
        """Called once `key` has been copied: drops its resident memory-mapped pages."""
        self._release(self._get(key))

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self.shapes:
            yield key, self.get_numpy(key)
            self.release(key)


def _explain_torch_error(path: str, e: BaseException) -> CheckpointReadError:
    msg = str(e)
    if "Weights only load failed" in msg or "WeightsUnpickler" in msg:
        m = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", msg) or re.search(r"(Unsupported operand \d+)", msg) \
            or re.search(r"WeightsUnpickler error: ([^\n]+)", msg)
        what = f" (it references {m.group(1)})" if m else ""
        return CheckpointReadError(
            f"{path}: refused: this pickle is not a plain checkpoint of tensors{what}. Only state_dicts made of "
            "tensors, dicts, lists and numbers are read (torch.load weights_only=True), because loading a pickle "
            "that carries classes or code could run arbitrary code. Re-save it as a state_dict of tensors, e.g. "
            "torch.save({'app': {'model': model.state_dict()}}, path), from a trusted environment.")
    if "central directory" in msg or "PytorchStreamReader" in msg or isinstance(e, EOFError):
        size = os.path.getsize(path)
        first = (msg.splitlines() or [type(e).__name__])[0][:200]
        return CheckpointReadError(
            f"{path}: cannot read the PyTorch checkpoint: the file ({size:,} bytes) is truncated or corrupted "
            f"({first}). The released walrus.pt is 5,145,064,530 bytes; download or copy it again.")
    return CheckpointReadError(f"{path}: cannot read the PyTorch checkpoint ({type(e).__name__}: {msg[:300]})")


def _find_state_dict(obj: Any, path: str) -> tuple[Mapping, str]:
    import torch

    if isinstance(obj, Mapping):
        for keys in STATE_DICT_PATHS:
            node, ok = obj, True
            for k in keys:
                if isinstance(node, Mapping) and k in node:
                    node = node[k]
                else:
                    ok = False
                    break
            if ok and isinstance(node, Mapping) and node and all(isinstance(v, torch.Tensor) for v in node.values()):
                return node, "".join(f"[{k!r}]" for k in keys)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, "(bare state_dict)"
        if obj and any(isinstance(v, torch.Tensor) for v in obj.values()):
            bad = [f"'{k}' ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            raise CheckpointReadError(f"{path}: the state_dict has non-tensor entries: {', '.join(bad[:10])}")
        desc = f"a dict with top-level keys {sorted(map(str, obj))[:10]}"
    else:
        desc = f"a {type(obj).__name__}"
    raise CheckpointReadError(f"{path}: no state_dict found: the file holds {desc}; expected "
                              "{'app': {'model': state_dict}} (the released format), {'model': state_dict} or a "
                              "bare {name: tensor} state_dict")


def _open_torch(path: str, log: Callable[[str], None]) -> Checkpoint:
    import torch

    notes = []
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        mapped = True
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise _explain_torch_error(path, e) from e
        # A legacy (non-zip) torch.save file: it cannot be memory-mapped, it is read whole.
        notes.append("legacy (non-zip) torch format: read without mmap, peak memory ~2x the file")
        log(f"note: {path} is in the legacy torch format; it cannot be memory-mapped and is read whole")
        try:
            with warnings.catch_warnings():
                # torch warns about pickle protocols it does not expect; the load either succeeds
                # with plain data or is refused below, so the warning adds nothing.
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e2:  # noqa: BLE001
            raise _explain_torch_error(path, e2) from e2
        mapped = False
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, ...: all mean "not readable"
        raise _explain_torch_error(path, e) from e
    sd, where = _find_state_dict(obj, path)
    log(f"state_dict at {where}: {len(sd)} tensors")
    shapes = {str(k): tuple(int(d) for d in v.shape) for k, v in sd.items()}
    dtypes = {str(k): str(v.dtype).replace("torch.", "") for k, v in sd.items()}
    return Checkpoint(path, shapes, dtypes, lambda k: sd[k], _page_release if mapped else (lambda t: None),
                      "torch" + (" (mmap)" if mapped else ""), notes)


def _open_safetensors(path: str, log: Callable[[str], None]) -> Checkpoint:
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise CheckpointReadError(f"{path}: reading .safetensors needs the `safetensors` package "
                                  "(pip install safetensors)") from e
    try:
        import torch  # noqa: F401  - the "pt" framework also reads bfloat16
        framework = "pt"
    except ImportError:
        framework = "np"
    try:
        f = safe_open(path, framework=framework)
        keys = list(f.keys())
        shapes = {k: tuple(int(d) for d in f.get_slice(k).get_shape()) for k in keys}
        dtypes = {k: str(f.get_slice(k).get_dtype()).lower() for k in keys}
    except Exception as e:  # noqa: BLE001 - SafetensorError: header too large / invalid / truncated
        raise CheckpointReadError(f"{path}: cannot read the safetensors file ({type(e).__name__}: {e}); it is "
                                  "truncated or not a safetensors file") from e
    log(f"safetensors: {len(keys)} tensors")
    return Checkpoint(path, shapes, dtypes, f.get_tensor, lambda t: None, "safetensors", [])


def open_checkpoint(path: str, log: Callable[[str], None] = lambda s: None) -> Checkpoint:
    """Opens a .pt / .pth / .safetensors checkpoint lazily (see Checkpoint)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist" if not os.path.exists(path)
                                else f"checkpoint path {path} is not a file")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise CheckpointReadError(f"{path}: the file is empty (0 bytes); expected a PyTorch checkpoint "
                                  "(the released walrus.pt is 5,145,064,530 bytes) or a .safetensors file")
    if path.endswith(".safetensors") or (len(head) > 9 and head[8:9] == b"{" and not head.startswith(b"PK")):
        return _open_safetensors(path, log)
    return _open_torch(path, log)


# ---------------------------------------------------------------------------- reading the YAML
def read_config(path: str) -> tuple[dict, dict | None, str]:
    """(model section, vocabulary {name: row} or None, a sentence saying where the vocabulary came from)."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except UnicodeDecodeError as e:
        raise conv.ConversionError(f"{path}: not a YAML text file (byte {e.start} is not UTF-8 text); expected "
                                   "the released extended_config.yaml") from e
    except yaml.YAMLError as e:
        raise conv.ConversionError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(doc, Mapping) or not isinstance(doc.get("model"), Mapping):
        top = sorted(doc) if isinstance(doc, Mapping) else type(doc).__name__
        raise conv.ConversionError(f"{path}: no `model` section (top level: {top}); expected the released "
                                   "extended_config.yaml")
    data = doc.get("data")
    vocab = data.get("field_index_map_override") if isinstance(data, Mapping) else None
    if vocab is None:
        return dict(doc["model"]), None, f"none: {os.path.basename(path)} has no data.field_index_map_override"
    if not isinstance(vocab, Mapping):
        raise conv.ConversionError(f"{path}: data.field_index_map_override must map field names to rows, got "
                                   f"{type(vocab).__name__}")
    return dict(doc["model"]), dict(vocab), f"data.field_index_map_override of {os.path.basename(path)}"


# Datasets the original resizes 66 -> 64 on the last axis before the model (and back after).
RESIZE_66_TO_64_DATASETS = ("post_neutron_star_merger",)


def read_training_setup(path: str) -> tuple[dict, list[str]]:
    """(finetuning_mods {ape_shape, learnable_rope, rope_per_axis} or {}, names of the datasets the
    checkpoint was trained on: data.module_parameters.well_dataset_info's keys) of a released YAML
    that read_config has already accepted."""
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    mods = doc.get("finetuning_mods") or {}
    data = doc.get("data") if isinstance(doc.get("data"), Mapping) else {}
    module = data.get("module_parameters") if isinstance(data.get("module_parameters"), Mapping) else {}
    info = module.get("well_dataset_info") or data.get("well_dataset_info") or {}
    return (dict(mods) if isinstance(mods, Mapping) else {}), [str(k) for k in (info if isinstance(info, Mapping) else ())]


def apply_training_setup(cfg: ModelConfig, mods: Mapping, datasets: list[str], where: str) -> tuple[ModelConfig, list[str]]:
    """The config with what the YAML's training setup decides, and the problems found comparing its
    finetuning_mods with the variants the checkpoint's keys imply. A learnable shared RoPE vector
    has the same key and shape as the fixed buffer, so only the YAML can say it is trained; the
    66 <-> 64 resize is on when the checkpoint was trained on a dataset the original resizes."""
    problems = []
    ape = mods.get("ape_shape")
    if ape is not None and (cfg.ape_grid is None or tuple(int(v) for v in ape) != tuple(cfg.ape_grid)):
        problems.append(f"{where} finetuning_mods.ape_shape={list(ape)} but the checkpoint's absolute position "
                        f"embedding is {'missing (no `ape` key)' if cfg.ape_grid is None else list(cfg.ape_grid)}: the "
                        "checkpoint was saved before the fine-tuning expansion (checkpoint."
                        "load_chkpt_after_finetuning_expansion) or belongs to another config")
    if mods.get("rope_per_axis") and cfg.learned_rope != "per_axis":
        problems.append(f"{where} finetuning_mods.rope_per_axis=true but the checkpoint has no per-axis RoPE "
                        "frequencies (blocks.N.space_mixing.rotary_emb.freqs.0/1/2)")
    if mods.get("learnable_rope") and cfg.learned_rope == "none":
        cfg = cfg.replace(learned_rope="shared")
    resize = any(d in RESIZE_66_TO_64_DATASETS for d in datasets)
    return cfg.replace(resize_66_to_64=resize), problems


# ---------------------------------------------------------------------------- conversion
def build_config(model_section: Mapping, shapes: Mapping[str, tuple[int, ...]], where: str) -> tuple[ModelConfig, list[str]]:
    """ModelConfig from the YAML's model section plus what the checkpoint's shapes decide, and the
    problems found comparing the two."""
    problems = []
    guess, guess_key = None, None
    for d in (2, 3, 1):
        k = f"embed.{d}.proj1.weight"
        if len(shapes.get(k, ())) >= 2:
            guess, guess_key = int(shapes[k][1]), k  # Conv3d (out, in = vocabulary rows, kH, kW, kD)
            break
    yaml_n = model_section.get("n_states")
    base = ModelConfig.from_torch_config(model_section, n_states=max(3, guess or int(yaml_n or 3)))
    cfg = conv.infer_config(shapes, base)
    if yaml_n is not None and guess is not None and int(yaml_n) != guess:
        problems.append(f"wrong n_states: {where} model.n_states={yaml_n} but the checkpoint's "
                        f"embed.*.proj1.weight has {guess} vocabulary rows ({guess_key} shape {shapes[guess_key]})")
    if cfg.n_blocks != base.n_blocks:
        problems.append(f"{where} model.processor_blocks={base.n_blocks} but the checkpoint has blocks "
                        f"0..{cfg.n_blocks - 1} ({cfg.n_blocks} blocks)")
    return cfg, problems


def _nonfinite_check(get: Callable[[str], np.ndarray], source: str) -> Callable[[str], np.ndarray]:
    """`get` that raises ConversionError naming the first tensor holding NaN or Inf (a corrupted or
    diverged checkpoint would otherwise convert into a model that silently predicts NaN)."""

    def checked(key: str) -> np.ndarray:
        a = get(key)
        finite = np.isfinite(a)
        if not finite.all():
            n_nan = int(np.isnan(a).sum())
            n_inf = int(a.size - finite.sum()) - n_nan
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise conv.ConversionError(
                f"{source}: tensor '{key}' (shape {tuple(a.shape)}) holds {n_nan} NaN and {n_inf} Inf values "
                f"(first at index {first}); the checkpoint is corrupted or its training diverged. Pass "
                "--allow-nonfinite (allow_nonfinite=True) to convert it anyway")
        return a

    return checked


def _refuse_inputs_inside(output: str, inputs: Mapping[str, str]) -> None:
    """The output directory (replaced by --overwrite) must not hold the converter's own inputs."""
    out = os.path.realpath(output)
    for flag, path in inputs.items():
        real = os.path.realpath(path)
        if real == out or real.startswith(out.rstrip(os.sep) + os.sep):
            raise conv.ConversionError(f"--output {output} contains the input {flag} {path}; choose an output "
                                       "directory that holds neither the checkpoint nor the YAML")


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def convert(checkpoint: str, config: str, output: str, *, dtype: str = "float32", overwrite: bool = False,
            allow_nonfinite: bool = False, log: Callable[[str], None] = print) -> str:
    """The whole conversion (module docstring). Returns the output directory.
    Raises ConversionError (all mapping problems together; a NaN/Inf tensor unless allow_nonfinite),
    CheckpointReadError, FileExistsError, FileNotFoundError; never leaves a partial `output`."""
    t_start = time.time()
    if dtype not in pretrained.DTYPES:
        raise conv.ConversionError(f"--dtype {dtype!r}: expected one of {pretrained.DTYPES}")
    _refuse_inputs_inside(output, {"--checkpoint": checkpoint, "--config": config})
    pretrained.check_output_dir(output, overwrite)
    model_section, vocab, vocab_source = read_config(config)
    size = os.path.getsize(checkpoint) if os.path.isfile(checkpoint) else None
    log(f"reading {checkpoint}" + (f" ({_size(size)})" if size else ""))
    ckpt = open_checkpoint(checkpoint, log)

    try:
        cfg, problems = build_config(model_section, ckpt.shapes, os.path.basename(config))
    except (KeyError, ValueError, TypeError) as e:  # the YAML's model section or the checkpoint's shapes
        if isinstance(e, conv.ConversionError):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise conv.ConversionError(f"{checkpoint} with {config}: {msg}") from e
    cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    mods, datasets = read_training_setup(config)
    cfg, mod_problems = apply_training_setup(cfg, mods, datasets, os.path.basename(config))
    problems += mod_problems
    bad_dtype = [f"key '{k}' has dtype {d}, expected a floating-point tensor" for k, d in ckpt.dtypes.items()
                 if not re.match(r"^(float|bfloat|f\d|bf\d|half|double)", d)]
    expected = conv.expected_shapes(cfg)
    problems += bad_dtype + conv.check_shapes(ckpt.shapes, cfg, expected=expected)
    problems += pretrained.check_vocabulary(vocab, cfg.n_states, f"{os.path.basename(config)} data.field_index_map_override")
    if problems:
        raise conv.ConversionError(f"{checkpoint}: cannot convert with {config} ({len(problems)} problem(s)):\n  - "
                                   + "\n  - ".join(problems))
    log(f"config: hidden_dim={cfg.hidden_dim} n_blocks={cfg.n_blocks} heads={cfg.num_heads} n_states={cfg.n_states} "
        f"learned_rope={cfg.learned_rope} ape_grid={cfg.ape_grid} dtype={dtype}"
        + (" resize_66_to_64=True (trained on post_neutron_star_merger)" if cfg.resize_66_to_64 else ""))
    log(f"vocabulary: {len(vocab)} fields ({vocab_source})" if vocab is not None else f"vocabulary: {vocab_source}")
    log(f"checked {len(ckpt.shapes)} keys: every key maps, every shape matches")

    n_total = len(ckpt.shapes)
    bytes_total = sum(int(np.prod(s)) * 4 for s in ckpt.shapes.values())
    state = {"i": 0, "bytes": 0, "next": 0.0, "t0": time.time()}

    def on_tensor(key: str) -> None:
        state["i"] += 1
        state["bytes"] += int(np.prod(ckpt.shapes[key])) * 4
        frac = state["bytes"] / max(bytes_total, 1)
        if frac >= state["next"] or state["i"] == n_total:
            state["next"] = frac + 0.05
            log(f"  [{state['i']:4d}/{n_total}] {100 * frac:5.1f}%  {time.time() - state['t0']:6.1f} s  {key}")

    info = {
        "source_checkpoint": os.path.abspath(checkpoint), "source_bytes": size,
        "source_config": os.path.abspath(config), "vocabulary_source": vocab_source,
        "n_source_tensors": n_total, "dtype": dtype, "converter": "tools.convert_torch_ckpt",
    }
    get = ckpt.get_numpy if allow_nonfinite else _nonfinite_check(ckpt.get_numpy, checkpoint)
    groups = conv.assemble_groups(get, cfg, dtypes=conv.expected_dtypes(cfg), shapes=expected,
                                  release=ckpt.release, on_tensor=on_tensor)
    log(f"streaming {n_total} tensors into {output} (one block at a time)")
    out = pretrained.write_pretrained(output, groups, cfg, vocabulary=vocab, vocabulary_source=vocab_source,
                                      info=info, overwrite=overwrite, log=log)
    del ckpt
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_el = sum(int(np.prod(s)) for s in expected.values())
    log(f"done: {out} ({n_el:,} values, {time.time() - t_start:.1f} s, peak RSS {_size(peak)})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.convert_torch_ckpt",
                                description="Convert a released PyTorch Walrus checkpoint to a walrus_jax directory.")
    p.add_argument("--checkpoint", required=True, help="walrus.pt ({'app': {'model': state_dict}}), a bare "
                   "state_dict .pt, or .safetensors")
    p.add_argument("--config", required=True, help="extended_config.yaml (its model section and "
                   "data.field_index_map_override are read)")
    p.add_argument("--output", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="float32", choices=pretrained.DTYPES, help="storage (and compute) dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier converter output (or an empty "
                   "directory) at --output; any other existing directory is refused")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert tensors holding NaN/Inf (refused "
                   "by default)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of an error (also: env "
                   "WALRUS_JAX_VERBOSE=1)")
    args = p.parse_args(argv)

    def job():
        convert(args.checkpoint, args.config, args.output, dtype=args.dtype, overwrite=args.overwrite,
                allow_nonfinite=args.allow_nonfinite, log=lambda s: print(s, flush=True))

    return run_command(job, args.verbose or verbose_requested())
