"""Time attention and space attention: the two halves of every block (docs/original.md).

Tokens are channels-last, (B, T, h, w, d, hidden). Both modules return x + drop_path(branch)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from walrus_jax.cpu_kernels import attention as fused_attention
from walrus_jax.cpu_kernels import frame_attention as cpu_frame_attention
from walrus_jax.cpu_kernels import qkv_norm_rope
from walrus_jax.models import initializers, lora, positional
from walrus_jax.models.activation_sharding import per_batch_shard
from walrus_jax.models.blocked_attention import blocked_attention
from walrus_jax.models.config import ModelConfig
from walrus_jax.models.flash_attention import flash_attention
from walrus_jax.models.kernels import select
from walrus_jax.models.layers import Dense, HeadLayerNorm, RMSGroupNorm, drop_path, param, precision

SPATIAL = (2, 3, 4)  # token axes (h, w, d) of a (B, T, h, w, d, C) tensor


def materialised_attention(q, k, v, bias=None, is_causal=False):
    """Softmax attention on (N, L, heads, hd) tensors, the portable form: two einsums around a float32
    softmax over the materialised (L x L) logits per head. bias (heads, Lq, Lk) or (1, heads, Lq, Lk)."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32,
                        precision=precision(q.dtype)) * np.float32(scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        L = q.shape[1]
        logits = jnp.where(jnp.asarray(np.tril(np.ones((L, L), bool))), logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("nhqk,nkhd->nqhd", p, v, precision=precision(v.dtype))


def _cudnn_or_materialised(q, k, v, bias=None, is_causal=False):
    """CUDA: cuDNN's fused flash attention for bf16/fp16 (float32 is not among its types)."""
    if q.dtype in (jnp.bfloat16, jnp.float16):
        return jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype),
                                            is_causal=is_causal, implementation="cudnn")
    return materialised_attention(q, k, v, bias, is_causal)


def _cpu_space_attention(q, k, v):
    """CPU: the fused C++ kernel (float32, `cpu_kernels.attention`), else XLA block by block
    (`blocked_attention`): the materialised L x L softmax is memory-bound there."""
    if fused_attention.supports(q, k, v) and fused_attention.available():
        return fused_attention.fused_attention(q, k, v)
    return blocked_attention(q, k, v)


def _gpu_space_attention(q, k, v):
    """CUDA: cuDNN for bf16/fp16; float32 block by block, so the L x L logits never fill memory."""
    if q.dtype in (jnp.bfloat16, jnp.float16):
        return _cudnn_or_materialised(q, k, v)
    return blocked_attention(q, k, v)


def space_attention_core(q: jax.Array, k: jax.Array, v: jax.Array, kernels: str = "auto") -> jax.Array:
    """Non-causal, unbiased softmax attention over a frame's tokens, q, k, v (N, L, heads, hd) -> same;
    logits and softmax in float32. The form follows `kernels` (`models/kernels.py`): the C++ kernel
    on CPU, Pallas flash attention on TPU, cuDNN (bf16) on CUDA, else the materialised einsums."""
    tpu = functools.partial(per_batch_shard, flash_attention)  # a Pallas call runs per device's frames
    return select(kernels, q, k, v, xla=materialised_attention, cpu=_cpu_space_attention, tpu=tpu,
                  gpu=_gpu_space_attention)


def _materialised_time(q, k, v, bias, causal):
    return materialised_attention(q, k, v, bias[None], causal)


def _cudnn_time(q, k, v, bias, causal):
    return _cudnn_or_materialised(q, k, v, bias[None], causal)


class TimeAttention(nnx.Module):
    """AxialTimeAttention: per token, attention over the T frames with a T5 relative bias."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        hid, nh = cfg.hidden_dim, cfg.num_heads
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.norm = RMSGroupNorm(hid, param_dtype=pdt, rngs=rngs)
        # qkv channels are head-major with q|k|v interleaved inside each head:
        # head j's channels [3 hd j, 3 hd j + hd) are q, the next hd k, the next hd v.
        self.qkv = Dense(hid, 3 * hid, ("embed", "qkv"), dtype=dt, param_dtype=pdt, rngs=rngs)
        self.q_norm = HeadLayerNorm(cfg.head_dim, param_dtype=pdt, rngs=rngs)
        self.k_norm = HeadLayerNorm(cfg.head_dim, param_dtype=pdt, rngs=rngs)
        # The T5 relative-position bias table, ~ 0.02 x truncated normal.
        self.rel_bias = param(initializers.normal(0.02), (cfg.rel_pos_buckets, nh), ("buckets", "heads"),
                              dtype=pdt, rngs=rngs)
        self.out = Dense(hid, hid, ("attn", "embed"), dtype=dt, param_dtype=pdt, rngs=rngs)

    def __call__(self, x: jax.Array, rate=0.0, key: jax.Array | None = None, last_frame_only: bool = False) -> jax.Array:
        """x (B, T, h, w, d, hid) -> same, or with last_frame_only (B, 1, h, w, d, hid): the last
        frame's output alone (its query attends to every frame; the causal mask's last row is all
        ones), the same numbers as the full call's [:, -1:]."""
        cfg = self.cfg
        B, T, h, w, d, hid = x.shape
        nh, hd, L = cfg.num_heads, cfg.head_dim, h * w * d
        Tq = 1 if last_frame_only else T
        causal = cfg.causal_in_time and not last_frame_only
        bias = positional.time_bias(self.rel_bias[...], T, cfg.causal_in_time, cfg.rel_pos_buckets,
                                    cfg.rel_pos_max_distance)[:, T - Tq:]  # (heads, Tq, T)
        xn = self.norm(x, SPATIAL)
        k_qkv, k_out = lora.branch_keys(key, 2)

        def token_major(xn):
            # The CPU form. Token-major: one transpose of the normalised input and one of the output,
            # then every token's T x T attention is a contiguous block (see frame_attention).
            xt = jnp.transpose(xn.reshape(B, T, L, hid), (0, 2, 1, 3))  # (B, L, T, hid)
            qkv = self.qkv(xt, k_qkv).reshape(B * L, T, nh, 3, hd)
            fused = _fused_qkv_norm(qkv, self.q_norm, self.k_norm, None, heads_major=True)
            if fused is not None:  # one C++ pass (cpu_kernels.qkv_norm_rope); last_frame_only: every q normalised, one kept
                q, k, v = fused
                q = q[:, T - Tq:]
            else:
                # split, not indexing: its gradient is one concatenation, where three indexings' is
                # a sum of three padded arrays that XLA:CPU fuses into one slow kernel.
                q, k, v = (a[..., 0, :] for a in jnp.split(qkv, 3, axis=-2))
                q, k = self.q_norm(q[:, T - Tq:]), self.k_norm(k)
            o = self.out(frame_attention(q, k, v, bias, causal).reshape(B, L, Tq, hid), k_out)
            return jnp.transpose(o, (0, 2, 1, 3)).reshape((B, Tq) + x.shape[2:])

        def frames_batched(xn):
            # The portable form: per token, attention over frames as a batch of (Tq x T) problems:
            # einsums (cuDNN on CUDA in bf16); on TPU elementwise products and sums (`frame_attention`'s
            # XLA form), since T ~ 6 fills a sliver of a 128 x 128 matrix unit and XLA's TPU compiler
            # turns so many tiny batched products into slowly compiled convolutions.
            qkv = self.qkv(xn, k_qkv).reshape(B, T, h, w, d, nh, 3, hd)
            qkv = jnp.transpose(qkv, (6, 0, 2, 3, 4, 1, 5, 7)).reshape(3, B * L, T, nh, hd)
            q, k, v = self.q_norm(qkv[0][:, T - Tq:]), self.k_norm(qkv[1]), qkv[2]
            o = select(cfg.kernels, q, k, v, bias, xla=functools.partial(_materialised_time, causal=causal),
                       gpu=functools.partial(_cudnn_time, causal=causal),
                       tpu=lambda q, k, v, bias: _frame_attention(q, k, v, bias, causal, False))
            return self.out(jnp.transpose(o.reshape(B, h, w, d, Tq, hid), (0, 4, 1, 2, 3, 5)), k_out)

        o = select(cfg.kernels, xn, xla=frames_batched, cpu=token_major)
        # one draw per frame, shared by the batch
        return x[:, T - Tq:] + drop_path(o.astype(x.dtype), rate, key, draw_axes=(1,), n_frames=T)


def frame_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, causal: bool) -> jax.Array:
    """Attention over a handful of frames per token, as broadcast products and sums (the CPU form of
    time attention; its XLA part, `_frame_attention`, is the TPU form). q (N, Tq, heads, head_dim),
    k, v (N, T, heads, head_dim); bias (heads, Tq, T) [query, key] -> (N, Tq, heads, head_dim); logits, softmax and the weighted sum in float32.
    causal (a lower-triangular mask) needs Tq = T.

    With T ~ 6 the two products are N * heads tiny T x T x head_dim matrix products: XLA:CPU runs
    them as batched dots behind transposes to (N, heads, T, head_dim) and back, forward and
    backward. Elementwise, every token's q, k, v block stays contiguous and fused. The backward pass
    is written out (`_frame_attention_bwd`): differentiated automatically, XLA fused it into a few
    large elementwise kernels that recompute the softmax per output element, ~16x the forward's
    time; written out it saves the probabilities (T^2 x heads floats per token, a fraction of q, k,
    v) and is ~3x the forward. In float32 the project's C++ kernel (`cpu_kernels.frame_attention`)
    does the same per token with its logits in registers, ~10x faster than either (CPU programs only:
    this function is `TimeAttention`'s CPU form)."""
    if cpu_frame_attention.supports(q, k, v, bias) and cpu_frame_attention.available():
        return cpu_frame_attention.frame_attention(q, k, v, bias, causal)
    return _frame_attention(q, k, v, bias, causal, True)


def _sum_head_dim(prod: jax.Array, halve: bool) -> jax.Array:
    """Sum over the last axis. `halve` (for XLA:CPU) adds halves elementwise first: XLA:CPU otherwise
    materialises the product for a windowed reduction over head_dim (two passes over N * T^2 * hidden
    floats). XLA:TPU fuses the product into a plain sum, where the halves' slices would make it store
    the product (N * T^2 * hidden float32s)."""
    while halve and prod.shape[-1] > 16 and prod.shape[-1] % 2 == 0:
        prod = prod[..., :prod.shape[-1] // 2] + prod[..., prod.shape[-1] // 2:]
    return jnp.sum(prod, axis=-1)


def _frame_probabilities(qf, kf, bias, causal, halve):
    """float32 softmax over keys, (N, Tq, Tk, heads)."""
    T, hd = qf.shape[1], qf.shape[-1]
    logits = _sum_head_dim(qf[:, :, None] * kf[:, None], halve) * np.float32(1.0 / np.sqrt(hd))
    logits = logits + jnp.transpose(bias.astype(jnp.float32), (1, 2, 0))[None]
    if causal:
        logits = jnp.where(np.tril(np.ones((T, T), bool))[None, :, :, None], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=2)


def _frame_attention_fwd(q, k, v, bias, causal, halve):
    qf, kf, vf = (a.astype(jnp.float32) for a in (q, k, v))
    p = _frame_probabilities(qf, kf, bias, causal, halve)
    o = jnp.sum(p[..., None] * vf[:, None], axis=2)  # (N, Tq, heads, head_dim)
    return o.astype(v.dtype), (q, k, v, bias, p, o)


def _frame_attention_bwd(causal, halve, residuals, do):
    """dv = p^T do;  dp = do v^T;  ds = p (dp - rowsum(do o));  dq = scale ds k;  dk = scale ds^T q;
    dbias = sum over tokens of ds. Masked (causal) entries have p = 0, hence ds = 0."""
    q, k, v, bias, p, o = residuals
    qf, kf, vf = (a.astype(jnp.float32) for a in (q, k, v))
    dof = do.astype(jnp.float32)
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    dv = jnp.sum(p[..., None] * dof[:, :, None], axis=1)  # (N, Tk, heads, head_dim)
    dp = _sum_head_dim(dof[:, :, None] * vf[:, None], halve)  # (N, Tq, Tk, heads)
    delta = _sum_head_dim(dof * o, halve)  # (N, Tq, heads)
    ds = p * (dp - delta[:, :, None])
    dq = jnp.sum(ds[..., None] * kf[:, None], axis=2) * scale
    dk = jnp.sum(ds[..., None] * qf[:, :, None], axis=1) * scale
    dbias = jnp.transpose(jnp.sum(ds, axis=0), (2, 0, 1))  # (heads, Tq, Tk)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias.astype(bias.dtype)


_frame_attention = jax.custom_vjp(
    lambda q, k, v, bias, causal, halve: _frame_attention_fwd(q, k, v, bias, causal, halve)[0], nondiff_argnums=(4, 5))
_frame_attention.defvjp(_frame_attention_fwd, _frame_attention_bwd)


class SpaceAttention(nnx.Module):
    """FullAttention: parallel attention + SwiGLU MLP over all tokens of a frame."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        hid = cfg.hidden_dim
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.norm = RMSGroupNorm(hid, param_dtype=pdt, rngs=rngs)
        # output features in the original's order: [ff (4 hid), q (hid), k (hid), v (hid)]
        self.fused = Dense(hid, 7 * hid, ("embed", "fused"), dtype=dt, param_dtype=pdt, rngs=rngs)
        self.ff_out = Dense(2 * hid, hid, ("mlp", "embed"), dtype=dt, param_dtype=pdt, rngs=rngs)
        self.attn_out = Dense(hid, hid, ("attn", "embed"), use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.q_norm = HeadLayerNorm(cfg.head_dim, param_dtype=pdt, rngs=rngs)
        self.k_norm = HeadLayerNorm(cfg.head_dim, param_dtype=pdt, rngs=rngs)
        # The fixed base frequencies, learnable or not; float32 whatever param_dtype (angles need it).
        rope = initializers.rope_freqs(cfg.head_dim, cfg.rope_max_freq)
        n_f = len(positional.rope_base_freqs(cfg.head_dim, cfg.rope_max_freq))
        if cfg.learned_rope == "none":
            # A buffer in the original (saved in the state_dict, never trained).
            self.rope_freqs = param(rope, (n_f,), ("rope",), kind=RopeFreqs)
        elif cfg.learned_rope == "shared":
            self.rope_freqs = param(rope, (n_f,), ("rope",))
        else:
            self.rope_freqs = param(rope, (3, n_f), ("rope_axes", "rope"))

    def __call__(self, x: jax.Array, rate=0.0, key: jax.Array | None = None, n_frames: int | None = None) -> jax.Array:
        """x (B, T, h, w, d, hid) -> same. Frames are independent here; n_frames: x holds the last
        T of that many frames (drop path draws as for all of them, see `drop_path`)."""
        cfg = self.cfg
        B, T, h, w, d, hid = x.shape
        nh, hd, L = cfg.num_heads, cfg.head_dim, h * w * d
        k_fused, k_attn, k_ff = lora.branch_keys(key, 3)
        f = self.fused(self.norm(x, SPATIAL), k_fused).reshape(B * T, L, 7 * hid)
        ff, qkv = jnp.split(f, [4 * hid], axis=-1)
        angles = positional.rope_angles(self.rope_freqs[...], (h, w, d)).reshape(L, -1)
        q, k, v = self._prepare_qkv(qkv.reshape(B * T, L, 3, nh, hd), angles)
        o = space_attention_core(q, k, v, cfg.kernels).reshape(B * T, L, hid)
        value, gate = jnp.split(ff, 2, axis=-1)  # the original's SwiGLU: first half value, second half gate
        branch = self.attn_out(o, k_attn) + self.ff_out(jax.nn.silu(gate) * value, k_ff)
        return x + drop_path(branch.reshape(x.shape).astype(x.dtype), rate, key, draw_axes=(0, 1), n_frames=n_frames)

    def _prepare_qkv(self, qkv: jax.Array, angles: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """qkv (N, L, 3, heads, head_dim) -> q, k, v (N, L, heads, head_dim): q and k LayerNormed per
        head, then rotated. CPU programs in float32 with fixed frequencies (learned_rope "none": they
        take no gradient) run one fused C++ op (`cpu_kernels.qkv_norm_rope`); otherwise XLA's operations."""
        def portable(qkv, angles):
            q, k = self.q_norm(qkv[:, :, 0]), self.k_norm(qkv[:, :, 1])
            return positional.apply_rope(q, angles), positional.apply_rope(k, angles), qkv[:, :, 2]

        def fused(qkv, angles):
            out = _fused_qkv_norm(qkv, self.q_norm, self.k_norm, jax.lax.stop_gradient(angles), heads_major=False)
            return portable(qkv, angles) if out is None else out

        if self.cfg.learned_rope != "none":
            return portable(qkv, angles)
        return select(self.cfg.kernels, qkv, angles, xla=portable, cpu=fused)


def _fused_qkv_norm(qkv, q_norm: HeadLayerNorm, k_norm: HeadLayerNorm, angles, heads_major: bool):
    """`cpu_kernels.qkv_norm_rope` on qkv with the two HeadLayerNorms' weights, rotated by angles
    (L, n_rot) or not at all (None); None when the kernel does not apply (dtype, shape, no build)."""
    scale = jnp.stack([q_norm.scale[...], k_norm.scale[...]])
    bias = jnp.stack([q_norm.bias[...], k_norm.bias[...]])
    if not (qkv_norm_rope.supports(qkv, scale, bias, heads_major) and qkv_norm_rope.available()):
        return None
    L, hd = qkv.shape[-4], qkv.shape[-1]
    if angles is None:
        cos, sin = jnp.ones((L, hd), jnp.float32), jnp.zeros((L, hd), jnp.float32)
    else:
        cos, sin = positional.rope_tables(angles, hd)
    return qkv_norm_rope.qkv_norm_rope(qkv, scale, bias, cos, sin, heads_major)


class RopeFreqs(nnx.Variable):
    """The fixed RoPE frequency buffer: stored with the weights, never trained."""
