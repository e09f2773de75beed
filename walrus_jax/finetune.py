"""Fine-tuning from a pretrained checkpoint (`config.init_from`), as the original's fine-tuning does.

`init_from` is either
  * a walrus_jax training workdir (or its `checkpoints/` folder): the newest restorable
    checkpoint's parameters, model config and field vocabulary are used; or
  * a converted release (`tools.convert_torch_ckpt` output), read with
    `walrus_jax.load_pretrained(path)`.

What changes on top of the base model (the original's choices unless said otherwise):
  * New field names in the fine-tuning data extend the vocabulary (`FieldVocabulary.extend`): the
    enlarged encoder input and decoder output keep the fresh model's initialization for the new
    rows (`finetune.new_field_init='fresh'`; 'mean' of the base rows or 'zeros' are walrus_jax
    options), and every copied encoder input column (the boundary-flag columns included) is
    multiplied by √(n_old / n_new): the encoder scales its input by √((n_states − 3) / C), so the
    copied columns keep computing what they did before the vocabulary grew.
  * Learnable RoPE frequencies (`finetune.learned_rope`: 'per_axis' as released, or 'shared'),
    starting from the base model's fixed frequencies, and an absolute position embedding
    (`finetune.ape` with `model.ape_grid`) starting at 5e-3 · N(0, 1).
  * Frozen parts (`finetune.freeze`: parameter-path prefixes such as 'embed' or
    'processor/blocks/time'; a walrus_jax addition): never updated, no optimizer moments.
The architecture comes from the checkpoint; `config.model` contributes only what fine-tuning may
change (dropout rates, remat, dtype, the RoPE / APE options).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from walrus_jax.errors import ConfigError, DataError, PathError
from walrus_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

FLAG_ROWS = 3  # vocabulary rows 0-2 are the boundary flags (closed, open, bias)
APE_INIT_STD = 5e-3  # the original starts a new absolute position embedding at 5e-3 · N(0, 1)
# Options that config.model may set on top of the checkpoint's architecture.
TUNABLE = ("drop_path", "input_field_drop", "remat", "dtype", "param_dtype", "jitter_patches", "scan_layers")


def _checkpoint_dir(path: str) -> str | None:
    """The Orbax checkpoint folder inside a training workdir, or None if `path` is not one."""
    for cand in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(cand) and any(d.isdigit() and os.path.isdir(os.path.join(cand, d, "state"))
                                       for d in os.listdir(cand)):
            return cand
    return None


def check_init_from(path: str) -> None:
    """Fails early (before any compute) when `init_from` points at nothing usable."""
    if not os.path.exists(path):
        raise PathError(f"config init_from={path!r} does not exist (expected a walrus_jax workdir or a "
                                "converted checkpoint directory from tools.convert_torch_ckpt)")
    if _checkpoint_dir(path) is not None:
        return
    if not os.path.isdir(path) or not os.listdir(path):
        raise PathError(f"config init_from={path!r} is not a walrus_jax workdir (no checkpoints/<step>/state) "
                                "and not a converted checkpoint directory")


@dataclasses.dataclass
class Base:
    cfg: ModelConfig
    params: dict  # pure dict of numpy arrays
    vocab: Any  # FieldVocabulary
    source: str


def load_base(path: str) -> Base:
    """Parameters, architecture and vocabulary of the checkpoint at `path` (module docstring)."""
    from walrus_jax.data import FieldVocabulary

    check_init_from(path)
    ck = _checkpoint_dir(path)
    if ck is not None:
        import orbax.checkpoint as ocp

        from walrus_jax.checkpointing import Checkpointer

        mgr = Checkpointer(ck, keep=1_000_000, async_save=False)
        errors = []
        for step in reversed(mgr.steps()):
            try:
                meta = mgr.read_meta(step)
                sdir = os.path.join(ck, str(step), "state")
                c = ocp.PyTreeCheckpointer()
                md = c.metadata(sdir)
                tree = getattr(getattr(md, "item_metadata", md), "tree", getattr(md, "item_metadata", md))
                ra = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
                state = c.restore(sdir, args=ocp.args.PyTreeRestore(restore_args=ra))
            except Exception as e:  # noqa: BLE001 - corrupt: previous checkpoint
                log.warning("init_from %s/%d unreadable (%s); trying the previous one", ck, step, e)
                errors.append(step)
                continue
            vocab = FieldVocabulary.from_dict(meta["vocab"]) if meta.get("vocab") else FieldVocabulary.released()
            return Base(ModelConfig.from_dict(meta["model_config"]), state["params"], vocab, f"{ck}/{step}")
        raise DataError(f"config init_from={path!r}: no readable checkpoint (tried steps {errors})")
    import walrus_jax

    if not hasattr(walrus_jax, "load_pretrained"):
        raise RuntimeError(f"config init_from={path!r} is not a walrus_jax workdir and walrus_jax.load_pretrained "
                           "(converted releases) is not available in this installation")
    from flax import nnx

    loaded = walrus_jax.load_pretrained(path)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    vocab = getattr(loaded, "vocab", None) or getattr(model, "vocab", None)
    if vocab is None:
        vocab = FieldVocabulary.released()
    elif not isinstance(vocab, FieldVocabulary):
        vocab = FieldVocabulary.from_dict(vocab)
    return Base(model.cfg, params, vocab, path)


def _flat(tree) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Plan:
    """Everything train.py needs to fine-tune instead of training from scratch."""

    def __init__(self, config, base: Base):
        self.config = config
        self.base = base
        ft = config.finetune
        m = config.model
        over = {k: getattr(m, k) for k in TUNABLE if k in m}
        over["learned_rope"] = ft.learned_rope
        if ft.ape:
            if m.ape_grid is None:
                raise ConfigError("config finetune.ape=True needs config model.ape_grid = (h, w, d), the token grid "
                                 "of the fine-tuning data")
            over["ape_grid"] = tuple(int(v) for v in m.ape_grid)
        else:
            over["ape_grid"] = None
        lo = config.get("lora")
        if lo is not None and lo.rank > 0:  # adapter fine-tuning (walrus_jax/adapters.py)
            over.update(lora_rank=int(lo.rank), lora_alpha=float(lo.alpha), lora_dropout=float(lo.dropout),
                        lora_targets=tuple(lo.targets))
        try:
            self.model_cfg = base.cfg.replace(**over)
        except ValueError as e:
            raise ConfigError(f"config lora / model: {e}") from None
        self.vocab = base.vocab

    def finalize_config(self, n_states_data: int) -> ModelConfig:
        n = max(self.base.cfg.n_states, int(n_states_data))
        if n > self.base.cfg.n_states:
            log.warning("fine-tuning data adds %d field(s) to the vocabulary: n_states %d -> %d",
                        n - self.base.cfg.n_states, self.base.cfg.n_states, n)
        self.model_cfg = self.model_cfg.replace(n_states=n)
        return self.model_cfg

    @property
    def adapters(self) -> bool:
        return self.model_cfg.lora_rank > 0

    def checkpoint_meta(self) -> dict:
        """What the training checkpoints record about the base (adapter runs: its fingerprint, so a
        delta exported from the workdir can refuse another base)."""
        if not self.adapters:
            return {}
        from walrus_jax import adapters

        return {adapters.META_KEY: {"fingerprint": adapters.fingerprint(self.base.params),
                                    "n_states": int(self.base.cfg.n_states), "source": self.base.source}}

    def write_delta(self, directory: str, params, vocab, meta: dict, write: bool = True) -> str | None:
        """Adapter runs: the trained variables as an adapter delta in `directory` (walrus_jax/adapters.py);
        `meta` is checkpoint_meta()'s output. Every process calls it (the trained arrays are gathered
        from their shards); only `write` ones write. None for full fine-tuning."""
        if not self.adapters:
            return None
        from walrus_jax import adapters

        info = meta[adapters.META_KEY]
        flat = _flat(params)
        trained = {k: flat[k] for k in adapters.trained_parts(self.model_cfg, info["n_states"], flat)}
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            trained = multihost_utils.process_allgather(trained, tiled=True)
        if not write:
            return None
        delta = adapters.delta_from_params(adapters._nest(jax.tree.map(np.asarray, trained)), self.model_cfg,
                                           info["n_states"], vocab, info["fingerprint"], source=directory)
        return adapters.write_delta(directory, delta)

    def trainable_mask(self, params_abstract) -> Any:
        if self.adapters:
            from walrus_jax import adapters

            if self.config.finetune.freeze:
                raise ConfigError("config finetune.freeze and lora.rank > 0 exclude each other: with adapters "
                                  "everything but the adapters and new vocabulary rows is frozen already")
            return adapters.trainable_mask(params_abstract, self.model_cfg, self.base.cfg.n_states)
        prefixes = [p.strip("/") for p in self.config.finetune.freeze]
        flat = _flat(params_abstract)
        for p in prefixes:
            if not any(k == p or k.startswith(p + "/") for k in flat):
                raise ConfigError(f"config finetune.freeze entry {p!r} matches no parameter (top-level names: "
                               f"{sorted({k.split('/')[0] for k in flat})})")
        if not prefixes:
            return None
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(_match("/".join(str(getattr(k, "key", k)) for k in path), p) for p in prefixes),
            params_abstract)

    def initial_params(self, parts, fresh: dict, seed: int = 0) -> dict:
        """Base parameters mapped onto the fine-tuning model (whose random init is `fresh`),
        placed with the model's shardings (module docstring)."""
        base = _flat(self.base.params)
        n_old = self.base.cfg.n_states
        how = self.config.finetune.new_field_init
        if how not in ("fresh", "mean", "zeros"):
            raise ConfigError(f"config finetune.new_field_init={how!r}; expected 'fresh', 'mean' or 'zeros'")
        rng = np.random.default_rng(seed)

        def one(path, new):
            key = "/".join(str(getattr(k, "key", k)) for k in path)
            if key not in base:
                if key == "ape" or key.endswith("/ape"):
                    return (APE_INIT_STD * rng.standard_normal(new.shape)).astype(new.dtype)
                return np.asarray(new)  # e.g. learnable RoPE: the fresh model starts from the fixed frequencies
            old = np.asarray(base[key])
            if old.shape == tuple(new.shape):
                return old.astype(new.dtype)
            diff = [a for a, (o, n) in enumerate(zip(old.shape, new.shape)) if o != n]
            if old.ndim != new.ndim or len(diff) != 1 or old.shape[diff[0]] != n_old:
                raise ConfigError(f"init_from {self.base.source}: parameter {key} has shape {old.shape}, the "
                                  f"fine-tuning model expects {tuple(new.shape)}; only the vocabulary axis may grow")
            ax = diff[0]
            n_new = new.shape[ax]
            if how == "fresh":
                add = np.take(np.asarray(new), np.arange(n_old, n_new), axis=ax)
            elif how == "mean" and n_old > FLAG_ROWS:
                rows = np.take(old, np.arange(FLAG_ROWS, n_old), axis=ax).mean(axis=ax, keepdims=True)
                add = np.repeat(rows, n_new - n_old, axis=ax)
            else:
                add = np.zeros(old.shape[:ax] + (n_new - n_old,) + old.shape[ax + 1:], old.dtype)
            if key.startswith("embed/"):
                old = old * np.sqrt(n_old / n_new)
            return np.concatenate([old, add.astype(old.dtype)], axis=ax).astype(new.dtype)

        host = jax.tree_util.tree_map_with_path(one, fresh)
        return jax.device_put(host, parts.param_shardings)


def _match(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + "/")


def prepare(config) -> Plan:
    """Loads `config.init_from` and returns the fine-tuning plan (errors before any training)."""
    return Plan(config, load_base(config.init_from))
