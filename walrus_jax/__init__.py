"""walrus_jax: Walrus (PolymathicAI, arXiv 2511.15684) in JAX + Flax NNX.

    import walrus_jax as wj
    model = wj.Walrus(wj.ModelConfig.walrus_1p3b(), rngs=nnx.Rngs(0))     # or wj.load_pretrained(dir)
    y = model(x, field_indices, bcs, jitter=None)                        # (B, T, *spatial, C)
    preds = wj.rollout(model, input_fields, field_indices=..., bcs=..., n_steps=...)
    fwd = wj.jit(f)      # jax.jit + wj.compiler_options() at top level: ~20% faster forward on CPU
"""
from walrus_jax import data
from walrus_jax.checkpoints import convert  # wj.convert.load_state_dict / to_state_dict: PyTorch names <-> NNX
from walrus_jax.checkpoints.pretrained import load_pretrained, model_config, model_vocabulary, save_pretrained
from walrus_jax.inference import metrics
from walrus_jax.inference.rollouts import rollout, rollout_ensemble
from walrus_jax.models import OPEN, PERIODIC, WALL, Jitter, ModelConfig, Walrus, sample_jitter
from walrus_jax.normalization import normalize_window, normalized_delta_targets
from walrus_jax.xla_options import compiler_options, jit

__version__ = "0.1.0"
__all__ = [
    "ModelConfig", "Walrus", "Jitter", "sample_jitter", "WALL", "OPEN", "PERIODIC",
    "load_pretrained", "save_pretrained", "model_config", "model_vocabulary",
    "rollout", "rollout_ensemble", "metrics", "data", "convert", "normalize_window", "normalized_delta_targets",
    "compiler_options", "jit",
]
