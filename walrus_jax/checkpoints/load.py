"""Weights from either kind of checkpoint: a walrus_jax training workdir or a converted release.

    weights = read_weights(path)        # Weights(cfg, params, vocab, source), params on the host
    model, vocab, source = load_model(path, dtype="float32")

`path` is either
  * a training workdir (or its `checkpoints/` folder): the newest readable checkpoint's parameters,
    model config and field vocabulary (`walrus_jax.checkpoints.train_state`); or
  * a converted release (`tools.convert_torch_ckpt` / `save_pretrained` output,
    `walrus_jax.checkpoints.pretrained`).
Fine-tuning (`config.init_from`), the eval job and the rollout job all read their weights here.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from walrus_jax.checkpoints import params as parameters
from walrus_jax.errors import DataError, PathError
from walrus_jax.models.config import ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Weights:
    cfg: ModelConfig
    params: dict  # nested dict of numpy arrays
    vocab: Any  # FieldVocabulary
    source: str


def checkpoint_dir(path: str) -> str | None:
    """The Orbax checkpoint folder inside a training workdir, or None if `path` is not one."""
    for cand in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(cand) and any(d.isdigit() and os.path.isdir(os.path.join(cand, d, "state"))
                                       for d in os.listdir(cand)):
            return cand
    return None


def check_path(path: str, what: str = "config init_from") -> None:
    """Fails early (before any compute) when `path` points at nothing usable; errors name it as
    `what`={path} (the setting the user gave it in)."""
    if not os.path.exists(path):
        raise PathError(f"{what}={path!r} does not exist (expected a walrus_jax workdir or a "
                        "converted checkpoint directory from tools.convert_torch_ckpt)")
    if checkpoint_dir(path) is not None:
        return
    if os.path.isfile(os.path.join(path, "adapters.json")):  # walrus_jax/checkpoints/adapters.py
        raise PathError(f"{what}={path!r} is an adapter delta (adapters.json), not a whole model: pass it as "
                        "adapters= together with the base checkpoint it was trained on (configs/rollout.py "
                        "`adapters`, load_pretrained(base, adapters=...)), or merge it with tools.merge_adapters")
    if not os.path.isdir(path) or not os.listdir(path):
        raise PathError(f"{what}={path!r} is not a walrus_jax workdir (no checkpoints/<step>/state) "
                        "and not a converted checkpoint directory")


def read_weights(path: str, what: str = "config init_from") -> Weights:
    """Parameters, architecture and vocabulary of the checkpoint at `path` (module docstring);
    errors name it as `what`={path}."""
    from walrus_jax.data import FieldVocabulary

    check_path(path, what)
    ck = checkpoint_dir(path)
    if ck is not None:
        from walrus_jax.checkpoints.train_state import read_params

        step, params, meta = read_params(ck, what=f"{what}={path!r}")
        vocab = FieldVocabulary.from_dict(meta["vocab"]) if meta.get("vocab") else FieldVocabulary.released()
        return Weights(ModelConfig.from_dict(meta["model_config"]), params, vocab, f"{ck}/{step}")
    from walrus_jax.checkpoints import pretrained

    cfg, params, vocab = pretrained.read_params(path)
    if vocab is None:
        vocab = FieldVocabulary.released()
    elif not isinstance(vocab, FieldVocabulary):
        vocab = FieldVocabulary.from_dict(vocab)
    return Weights(cfg, params, vocab, path)


def load_model(path: str, dtype: str = "float32", what: str = "checkpoint"):
    """(model, vocabulary, source) from a converted release or a training workdir, in `dtype`;
    errors name it as `what`={path}."""
    w = read_weights(path, what)
    cfg = w.cfg.replace(dtype=dtype, param_dtype=dtype)
    if len(w.vocab) > cfg.n_states:
        raise DataError(f"checkpoint {path}: its field vocabulary has {len(w.vocab)} names but the model "
                        f"embeds only n_states={cfg.n_states}")
    return parameters.model_from_params(cfg, w.params, w.source), w.vocab, w.source
