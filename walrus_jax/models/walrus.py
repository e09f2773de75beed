"""Walrus: encoder -> scanned processor -> decoder (docs/original.md), in the Well's channels-last layout."""
from __future__ import annotations

import functools

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from walrus_jax.models import initializers, patching
from walrus_jax.models.activation_sharding import batch_sharded
from walrus_jax.models.config import PERIODIC, ModelConfig
from walrus_jax.models.decoder import Decoder
from walrus_jax.models.encoder import SpaceBagEncoder
from walrus_jax.models.init import init_values
from walrus_jax.models.jitter import Jitter
from walrus_jax.models.layers import param
from walrus_jax.models.processor import Processor


def resize_last_axis(x: jax.Array, n_out: int, axis: int) -> jax.Array:
    """Linear resize along one axis as torch's trilinear interpolate with align_corners=False (half-pixel
    centres, source index clamped at 0, no antialiasing). Used for post_neutron_star_merger 66 <-> 64."""
    n_in = x.shape[axis]
    # torch: a float32 scale, src = scale * (dst + 0.5) - 0.5 rounded once (fused multiply-add), >= 0.
    scale = np.float64(np.float32(n_in / n_out))
    src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0.astype(np.float32)).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = n_out
    a = jnp.take(x, jnp.asarray(i0), axis=axis)
    b = jnp.take(x, jnp.asarray(i1), axis=axis)
    f = jnp.asarray(frac).reshape(shape).astype(x.dtype)
    return a * (1 - f) + b * f


def _build_parts(cfg: ModelConfig, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    encoder_dummy = param(initializers.ONES, (1,), (None,), dtype=pdt)
    embed = nnx.Dict({f"d{d}": SpaceBagEncoder(cfg, rngs=rngs) for d in cfg.include_d})
    processor = Processor(cfg, rngs=rngs)
    debed = nnx.Dict({f"d{d}": Decoder(cfg, rngs=rngs) for d in cfg.include_d})
    ape = None
    if cfg.ape_grid is not None:
        ape = param(initializers.normal(0.02), tuple(cfg.ape_grid) + (cfg.hidden_dim,),
                    ("tok_h", "tok_w", "tok_d", "embed"), dtype=pdt, rngs=rngs)
    return nnx.Dict(encoder_dummy=encoder_dummy, embed=embed, processor=processor, debed=debed, ape=ape)


class Walrus(nnx.Module):
    """The Walrus space-time transformer.

    Call: `model(x, field_indices, bcs, jitter=None, *, train=False, key=None)`
      x             float (B, T, *spatial, C), spatial = (H, W) or (H, W, D): variable fields, then
                    constant fields (repeated over T).
      field_indices int (C,): vocabulary row of each channel. May be traced.
      bcs           int (n_spatial_dims, 2): [low, high] per axis, WALL=0, OPEN=1, PERIODIC=2. Static
                    (it decides padding shapes); a (B, n_dims, 2) array whose rows agree is accepted.
      jitter        None: no random shifts (learned padding and flags still applied); or a `Jitter`.
      train/key     drop path and input-field dropout (training only; needs a key).
    Returns float32 (B, T_out, *spatial, C) normalized deltas; T_out = T when causal_in_time, else 1.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # Declared abstractly, then filled by one compiled program (see models/init.py).
        abstract = nnx.eval_shape(lambda: _build_parts(cfg, nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        flat = list(nnx.to_flat_state(state))
        values = init_values(flat, rngs.params())
        for (_, var), value in zip(flat, values):
            var.set_value(value)
        parts = nnx.merge(graphdef, state)
        self.encoder_dummy, self.embed = parts["encoder_dummy"], parts["embed"]
        self.processor, self.debed, self.ape = parts["processor"], parts["debed"], parts["ape"]

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, x, field_indices, bcs, jitter):
        cfg = self.cfg
        if x.ndim not in (4, 5, 6):
            raise ValueError(f"x must be (B, T, *spatial, C) with 1 to 3 spatial axes, got shape {x.shape}")
        n_dims = x.ndim - 3
        bcs_t = patching.normalize_bcs(bcs, n_dims)
        fi_shape = np.shape(field_indices)
        if fi_shape != (x.shape[-1],):
            raise ValueError(f"field_indices has shape {fi_shape} but x has {x.shape[-1]} channels "
                             f"(last axis of x {x.shape}); expected ({x.shape[-1]},)")
        if not isinstance(field_indices, jax.core.Tracer):
            fi = np.asarray(field_indices)
            bad = fi[(fi < 0) | (fi >= cfg.n_states)]
            if bad.size:
                raise ValueError(f"field_indices {fi.tolist()} contain {bad.tolist()}, outside the model's "
                                 f"vocabulary [0, {cfg.n_states}) (n_states={cfg.n_states})")
        if jitter is not None:  # one unbatched draw (a batched pipeline's Jitter has a leading batch axis)
            chex.assert_shape(jitter.patch_shift, (3,), custom_message="jitter.patch_shift must be (3,)")
            chex.assert_shape(jitter.token_shift, (cfg.n_blocks, 3),
                              custom_message=f"jitter.token_shift must be (n_blocks={cfg.n_blocks}, 3)")
        return bcs_t

    # ------------------------------------------------------------------ forward
    def __call__(self, x: jax.Array, field_indices, bcs, jitter: Jitter | None = None, *, train: bool = False,
                 key: jax.Array | None = None, resize_66_to_64: bool | None = None, return_intermediates: bool = False,
                 last_frame_only: bool = False):
        """See the class docstring. `last_frame_only` decodes only the last frame (T_out = 1): the
        decoder treats every frame on its own, so this is y[:, -1:] of the full call, without the
        decoder's work on the other T - 1 frames (an autoregressive rollout uses only the last one).
        `resize_66_to_64` reproduces the original's special case for the post_neutron_star_merger
        dataset (its last axis is resized 66 -> 64 before the model and back after); None: as the
        checkpoint says (`cfg.resize_66_to_64`, for inputs whose last axis is 66). `return_intermediates` also returns a dict of activations (encoder input, tokens after
        the encoder, after block 0 when not scanned, before the decoder)."""
        cfg = self.cfg
        bcs_t = self._check_inputs(x, field_indices, bcs, jitter)
        if train and key is None and (cfg.drop_path > 0 or cfg.input_field_drop > 0):
            raise ValueError("train=True needs a PRNG `key` (drop path / input-field dropout)")
        if not train:
            key = None
        n_dims = x.ndim - 3
        B, T, C = x.shape[0], x.shape[1], x.shape[-1]
        out_spatial = x.shape[2:-1]
        x = x.reshape((B, T) + out_spatial + (1,) * (3 - n_dims) + (C,)).astype(jnp.float32)
        if resize_66_to_64 is None:
            resize_66_to_64 = cfg.resize_66_to_64 and x.shape[4] == 66
        if resize_66_to_64:
            if x.shape[4] != 66:
                raise ValueError(f"resize_66_to_64 needs a last spatial axis of 66, got {out_spatial}")
            x = resize_last_axis(x, 64, axis=4)
        spatial3 = x.shape[2:5]
        bcs3 = patching.pad_bcs3(bcs_t)
        strides = patching.choose_strides(spatial3)
        dim_key = sum(1 for n in spatial3 if n > 1)
        if dim_key not in cfg.include_d:
            raise ValueError(f"input with spatial shape {tuple(out_spatial)} has {dim_key} non-singleton axes, "
                             f"but the model only has encoders for include_d={cfg.include_d}")
        plans = patching.plan_axes(spatial3, bcs3, cfg.kernel_sizes, jitter=jitter is not None)
        inter: dict[str, Any] = {}

        if key is not None:
            key, k_drop, k_proc = jax.random.split(key, 3)
        else:
            k_drop = k_proc = None
        if k_drop is not None and cfg.input_field_drop > 0:
            # Dropout3d(p = input_field_drop / C): whole channels of each (batch, time) element.
            p = cfg.input_field_drop / C
            keep = jax.random.bernoulli(k_drop, 1.0 - p, (B, T, 1, 1, 1, C))
            x = jnp.where(keep, x / (1.0 - p), 0.0)
        scale = self.encoder_dummy[...].astype(jnp.float32)[0]

        patch_shift = None if jitter is None else jnp.asarray(jitter.patch_shift, jnp.int32)
        # On a mesh, frames stay split by sample through the encoder and decoder (activation_sharding).
        x = batch_sharded(x.reshape((B * T,) + spatial3 + (C,)))
        if return_intermediates:
            inter["encoder_input"] = patching.pad_and_flag(x * scale, plans, bcs3, patch_shift)
        tokens = batch_sharded(self.embed[f"d{dim_key}"](x, field_indices, scale, plans, bcs3, patch_shift, strides))
        tokens = tokens.reshape((B, T) + tokens.shape[1:])
        inter["after_encoder"] = tokens
        if self.ape is not None:
            if tokens.shape[2:5] != tuple(cfg.ape_grid):
                raise ValueError(f"the absolute position embedding was trained for a token grid {cfg.ape_grid}, "
                                 f"but this input gives {tokens.shape[2:5]} (spatial {tuple(out_spatial)})")
            tokens = tokens + self.ape[...].astype(tokens.dtype)
        token_shift = None if jitter is None else jnp.asarray(jitter.token_shift, jnp.int32)
        if token_shift is not None and token_shift.shape != (cfg.n_blocks, 3):
            raise ValueError(f"jitter.token_shift has shape {token_shift.shape}, expected ({cfg.n_blocks}, 3)")
        # Only the last frame is decoded (a rollout's step, or a non-causal model's single
        # prediction): the processor's last block computes just that frame.
        last_only = last_frame_only or not cfg.causal_in_time
        tokens = self.processor(tokens, token_shift, k_proc, last_frame_only=last_only)
        inter["before_decoder"] = tokens
        T_out = tokens.shape[1]
        periodic = [lo == PERIODIC for lo, _ in bcs3]
        y = self.debed[f"d{dim_key}"](batch_sharded(tokens.reshape((B * T_out,) + tokens.shape[2:])), field_indices,
                                      strides, periodic, plans, patch_shift)
        y = batch_sharded(y).astype(jnp.float32)
        y = y.reshape((B, T_out) + spatial3 + (C,))
        if resize_66_to_64:
            y = resize_last_axis(y, 66, axis=4)
        y = y.reshape((B, T_out) + tuple(out_spatial) + (C,))
        return (y, inter) if return_intermediates else y


def with_kernels(model: Walrus, kernels: str) -> Walrus:
    """`model` with its weights (shared, not copied) computing through `kernels` (a
    `ModelConfig.kernels` choice: "auto", "xla", "cpu", "tpu", "gpu"; models/kernels.py), e.g. the
    portable path for loaded weights: `wj.with_kernels(wj.load_pretrained(d), "xla")`."""
    return with_settings(model, kernels=kernels)


@functools.lru_cache(maxsize=16)
def _graphdef(cfg: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: Walrus(cfg, rngs=nnx.Rngs(0))))[0]


def with_settings(model: Walrus, **changes) -> Walrus:
    """`model` with its weights (shared, not copied) under a config that differs in settings that
    do not change the weights' shapes (kernels, remat, dtype of the computation, scan_layers)."""
    cfg = model.cfg.replace(**changes)
    if cfg == model.cfg:
        return model
    _, state = nnx.split(model)
    out = nnx.merge(_graphdef(cfg), state)
    for name in ("vocab",):  # what load_pretrained attaches beside the weights
        if hasattr(model, name):
            setattr(out, name, getattr(model, name))
    return out
