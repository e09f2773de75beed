"""walrus_jax: Walrus (PolymathicAI, arXiv 2511.15684) in JAX + Flax NNX.

    import walrus_jax as wj
    model = wj.from_pretrained("polymathic-ai/walrus")                   # hub id, hf:// URL or local dir
    model = wj.Walrus(wj.ModelConfig.walrus_1p3b(), rngs=nnx.Rngs(0))     # or random weights
    y = model(x, field_indices, bcs, jitter=None)                        # (B, T, *spatial, C)
    preds = wj.rollout(model, input_fields, field_indices=..., bcs=..., n_steps=...)
    f = wj.rollout_fn(model, field_indices=..., bcs=..., n_steps=...)   # pure: jax.grad(loss o f)
    fwd = wj.jit(f)      # jax.jit + wj.compiler_options() at top level: ~20% faster forward on CPU
    portable = wj.with_kernels(model, "xla")   # the same weights through XLA's portable operations
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The names below are imported on first use (PEP 562), so that `python -m walrus_jax.main` can
# re-execute itself (walrus_jax/huge_pages.py) before jax, flax and the model are imported, and
# so that a light submodule (walrus_jax.errors) does not pull in the whole package.
_EXPORTS = {
    "data": ("walrus_jax.data", None),
    "convert": ("walrus_jax.checkpoints.convert", None),  # wj.convert.load_state_dict / to_state_dict
    "metrics": ("walrus_jax.inference.metrics", None),
    "plotting": ("walrus_jax.inference.plotting", None),  # wj.plotting.field_panels / animate / metric_vs_step
    "load_pretrained": ("walrus_jax.checkpoints.load", "load_pretrained"),  # = load_model, the one loader
    **{name: ("walrus_jax.checkpoints.pretrained", name) for name in ("model_config", "model_vocabulary")},
    # save_pretrained takes a model (as pretrained.save_pretrained) or a training workdir (LoRA: the adapters)
    **{name: ("walrus_jax.checkpoints.hub", name)
       for name in ("from_pretrained", "list_pretrained", "save_pretrained", "push_to_hub")},
    **{name: ("walrus_jax.inference.rollouts", name) for name in ("rollout", "rollout_ensemble")},
    "rollout_fn": ("walrus_jax.inference.differentiable", "rollout_fn"),
    "export": ("walrus_jax.inference.export", "export"),
    **{name: ("walrus_jax.models", name)
       for name in ("ModelConfig", "Walrus", "Jitter", "sample_jitter", "WALL", "OPEN", "PERIODIC",
                    "with_kernels")},
    **{name: ("walrus_jax.normalization", name) for name in ("normalize_window", "normalized_delta_targets")},
    **{name: ("walrus_jax.xla_options", name) for name in ("compiler_options", "jit")},
}

__version__ = "0.1.0"
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'walrus_jax' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from walrus_jax import data
    from walrus_jax.checkpoints import convert
    from walrus_jax.checkpoints.hub import from_pretrained, list_pretrained, push_to_hub, save_pretrained
    from walrus_jax.checkpoints.load import load_pretrained
    from walrus_jax.checkpoints.pretrained import model_config, model_vocabulary
    from walrus_jax.inference import metrics, plotting
    from walrus_jax.inference.differentiable import rollout_fn
    from walrus_jax.inference.export import export
    from walrus_jax.inference.rollouts import rollout, rollout_ensemble
    from walrus_jax.models import OPEN, PERIODIC, WALL, Jitter, ModelConfig, Walrus, sample_jitter, with_kernels
    from walrus_jax.normalization import normalize_window, normalized_delta_targets
    from walrus_jax.xla_options import compiler_options, jit
