"""Fine-tuning from a pretrained checkpoint (`config.init_from`), as the original's fine-tuning does.

`init_from` is a walrus_jax training workdir or a converted release (`tools.convert_torch_ckpt`
output), read by `walrus_jax.checkpoints.load.read_weights`: its parameters, model config and
field vocabulary are the base.

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

import logging
from typing import Any

import jax
import numpy as np

from walrus_jax.checkpoints import params as parameters
from walrus_jax.checkpoints.load import Weights, read_weights
from walrus_jax.errors import ConfigError
from walrus_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

FLAG_ROWS = 3  # vocabulary rows 0-2 are the boundary flags (closed, open, bias)
APE_INIT_STD = 5e-3  # the original starts a new absolute position embedding at 5e-3 · N(0, 1)
# Options that config.model may set on top of the checkpoint's architecture.
TUNABLE = ("drop_path", "input_field_drop", "remat", "dtype", "param_dtype", "jitter_patches", "scan_layers")


class Plan:
    """Everything training needs to fine-tune instead of training from scratch. `base`: the
    checkpoint's weights (`walrus_jax.checkpoints.load.read_weights(config.init_from)`)."""

    def __init__(self, config, base: Weights):
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
        if lo is not None and lo.rank > 0:  # adapter fine-tuning (walrus_jax/checkpoints/adapters.py)
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
        from walrus_jax.checkpoints import adapters

        return {adapters.META_KEY: {"fingerprint": adapters.fingerprint(self.base.params),
                                    "n_states": int(self.base.cfg.n_states), "source": self.base.source}}

    def write_delta(self, directory: str, params, vocab, meta: dict, write: bool = True) -> str | None:
        """Adapter runs: the trained variables as an adapter delta in `directory` (walrus_jax/checkpoints/adapters.py);
        `meta` is checkpoint_meta()'s output. Every process calls it (the trained arrays are gathered
        from their shards); only `write` ones write. None for full fine-tuning."""
        if not self.adapters:
            return None
        from walrus_jax.checkpoints import adapters

        info = meta[adapters.META_KEY]
        flat = parameters.flatten(params)
        trained = {k: flat[k] for k in adapters.trained_parts(self.model_cfg, info["n_states"], flat)}
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            trained = multihost_utils.process_allgather(trained, tiled=True)
        if not write:
            return None
        delta = adapters.delta_from_params(parameters.unflatten(jax.tree.map(np.asarray, trained)), self.model_cfg,
                                           info["n_states"], vocab, info["fingerprint"], source=directory)
        return adapters.write_delta(directory, delta)

    def trainable_mask(self, params_abstract) -> Any:
        if self.adapters:
            from walrus_jax.checkpoints import adapters

            if self.config.finetune.freeze:
                raise ConfigError("config finetune.freeze and lora.rank > 0 exclude each other: with adapters "
                                  "everything but the adapters and new vocabulary rows is frozen already")
            return adapters.trainable_mask(params_abstract, self.model_cfg, self.base.cfg.n_states)
        prefixes = [p.strip("/") for p in self.config.finetune.freeze]
        flat = parameters.flatten(params_abstract)
        for p in prefixes:
            if not any(k == p or k.startswith(p + "/") for k in flat):
                raise ConfigError(f"config finetune.freeze entry {p!r} matches no parameter (top-level names: "
                               f"{sorted({k.split('/')[0] for k in flat})})")
        if not prefixes:
            return None
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(_match(parameters.path_name(path), p) for p in prefixes),
            params_abstract)

    def initial_params(self, parts, fresh: dict, seed: int = 0) -> dict:
        """Base parameters mapped onto the fine-tuning model (whose random init is `fresh`),
        placed with the model's shardings (module docstring)."""
        base = parameters.flatten(self.base.params)
        n_old = self.base.cfg.n_states
        how = self.config.finetune.new_field_init
        if how not in ("fresh", "mean", "zeros"):
            raise ConfigError(f"config finetune.new_field_init={how!r}; expected 'fresh', 'mean' or 'zeros'")
        rng = np.random.default_rng(seed)

        def one(path, new):
            key = parameters.path_name(path)
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
    return Plan(config, read_weights(config.init_from))
