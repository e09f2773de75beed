"""Low-rank adapters (LoRA) on the projections of the processor blocks.

An adapted projection computes

    y = x W (+ b) + dropout(x) A B · alpha / rank        A (in, rank), B (rank, out)

with B zero-initialised, so a freshly adapted model computes exactly the base model, and A drawn
like the other kernels (truncated normal, std 1/√in; models/initializers.py). A and B are `nnx.LoRAParam`s (a kind of
`nnx.Param`): they train and checkpoint like every other parameter, and `nnx.LoRAParam` filters pick
them out. They are created inside the block constructor, which the processor runs under `nnx.vmap`,
so they are stacked with a leading layers axis like the block weights and scanned with them; their
logical axis names are the adapted kernel's ("embed", "qkv", ...) around a replicated "lora_rank".

`ModelConfig.lora_targets` names the adapted projections ("time.qkv", "time.out", "space.fused",
"space.attn_out", "space.ff_out"); `lora_rank` 0 means no adapters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from walrus_jax.models import initializers
from walrus_jax.models.config import ModelConfig
from walrus_jax.models.layers import param, precision

RANK_AXIS = "lora_rank"


class Adapter(nnx.Module):
    """The low-rank branch x -> dropout(x) A B · alpha / rank of one projection."""

    def __init__(self, n_in: int, n_out: int, axes: tuple[str, str], *, rank: int, alpha: float, dropout: float,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.a = param(initializers.fan_in(-2), (n_in, rank), (axes[0], RANK_AXIS), dtype=param_dtype, rngs=rngs,
                       kind=nnx.LoRAParam)
        self.b = param(initializers.ZEROS, (rank, n_out), (RANK_AXIS, axes[1]), dtype=param_dtype, kind=nnx.LoRAParam)
        self.scale = float(alpha) / float(rank)
        self.dropout = float(dropout)
        self.dtype = dtype

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """x (..., n_in) -> (..., n_out); key: dropout randomness (None: no dropout, as in eval)."""
        if key is not None and self.dropout > 0.0:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / np.float32(1.0 - self.dropout).astype(x.dtype), jnp.zeros_like(x))
        lead = x.shape[:-1]
        h = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), self.a[...].astype(self.dtype),
                    precision=precision(self.dtype))
        y = jnp.dot(h, self.b[...].astype(self.dtype), precision=precision(self.dtype)) * np.asarray(self.scale, self.dtype)
        return y.reshape(lead + (y.shape[-1],))


def attach(block, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
    """Gives the projections of `block` named by cfg.lora_targets an `Adapter` (no-op at rank 0).
    Called inside the block constructor's nnx.vmap, so the adapters stack with the layers."""
    if cfg.lora_rank <= 0:
        return
    for target in cfg.lora_targets:
        part, name = target.split(".")
        dense = getattr(getattr(block, part), name)
        n_in, n_out = dense.kernel.shape
        adapter = Adapter(n_in, n_out, tuple(dense.kernel.get_metadata()["out_sharding"]), rank=cfg.lora_rank,
                          alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, dtype=jnp.dtype(cfg.dtype),
                          param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        dense.lora = nnx.data(adapter)  # the attribute starts as a static None


def branch_keys(key: jax.Array | None, n: int) -> list:
    """n independent dropout keys for the adapters of one attention module, drawn from its drop-path
    key without consuming it (None stays None: eval)."""
    if key is None:
        return [None] * n
    return [jax.random.fold_in(key, 0x10A + i) for i in range(n)]


def is_adapter_path(path: str) -> bool:
    """True for the parameter path ("processor/blocks/time/qkv/lora/a") of an adapter matrix."""
    return "/lora/" in f"/{path}/"


def merged_kernel(kernel, a, b, scale: float):
    """kernel + A B · scale for stacked (L, in, out), (L, in, r), (L, r, out) or unstacked arrays,
    computed in float64 on the host and returned in the kernel's dtype."""
    k = np.asarray(kernel)
    delta = np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64)) * float(scale)
    return (k.astype(np.float64) + delta).astype(k.dtype)
