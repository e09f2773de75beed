"""Walrus model: configuration, modules and jitter."""
from walrus_jax.models.config import OPEN, PERIODIC, WALL, ModelConfig
from walrus_jax.models.jitter import Jitter, sample_jitter
from walrus_jax.models.walrus import Walrus, with_kernels

__all__ = ["ModelConfig", "Walrus", "Jitter", "sample_jitter", "WALL", "OPEN", "PERIODIC", "with_kernels"]
