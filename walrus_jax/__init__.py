"""walrus_jax: Walrus (PolymathicAI, arXiv 2511.15684) in JAX + Flax NNX."""
from walrus_jax.models import OPEN, PERIODIC, WALL, Jitter, ModelConfig, Walrus, sample_jitter

__all__ = ["ModelConfig", "Walrus", "Jitter", "sample_jitter", "WALL", "OPEN", "PERIODIC"]
