"""The original trainer's optimizer step and learning-rate schedule, as pure functions.

One optimizer *update* consumes `grad_accum` micro-batches. Per micro-batch the train step adds the
gradient of `loss / grad_accum` to an accumulator (the original backpropagates loss/k into the
same .grad buffers) and records which parameters got a gradient at all (`present`). After the last
micro-batch of the update:

  1. clip: total norm n of the accumulated gradient (all parameters); every gradient is multiplied
     by min(1, clip_norm / (n + 1e-6)) — always multiplied, as torch's `clip_grad_norm_` does;
  2. AdamW with torch semantics, per parameter that got a gradient in this update:
       step += 1                                   (a per-parameter step count, as torch keeps)
       p    *= 1 − lr·wd                           (in float32: with lr·wd < 6e-8 this factor is 1)
       m     = β1·m + (1 − β1)·g ;  v = β2·v + (1 − β2)·g²
       p    −= lr / (1 − β1^step) · m / (√v / √(1 − β2^step) + eps)
     A parameter without a gradient in the update (the 2D encoder/decoder in an update holding only
     3D data, and vice versa) is skipped entirely: no moment update, no step count, no decay.
     Frozen parameters (`trainable_mask` False) have no moments at all and never move. A mask leaf
     may also be a bool array broadcastable to its parameter (e.g. only the new vocabulary rows of
     an encoder kernel train): that parameter has moments, its gradient is zeroed outside the mask
     (so the clipping norm counts only the trained entries) and only the masked entries move.

The schedule is the original's `InverseSqrtLinearWarmupSqrtCooldown`: with L the number of completed
schedule steps (pseudo-epochs of `steps_per_epoch` updates: the lr is a staircase; or updates, with
`per_update`, where W, C and M are multiplied by steps_per_epoch), base lr b, warmup W, cooldown C,
total M, warmup factor f, offset o, exponent e:

  L ≤ W          lr = b · (f + (1 − f) · L / W)
  W < L ≤ M − C  lr = b / (1 + (L − W + o)^e − o^e)
  L > M − C      lr = (1 − √((L − (M − C) − 1) / C)) · b / (1 + (o + M − C)^e − o^e)

(the cooldown's base omits the −W of the decay, so it starts a few percent below where the decay
ended; the release's last pseudo-epoch has lr 2.81e-6). Past M the formula turns negative: the
schedule clamps at 0 and config validation refuses runs longer than the schedule.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from walrus_jax.errors import ConfigError

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)


# ------------------------------------------------------------------------------------- schedule
@dataclasses.dataclass(frozen=True)
class Schedule:
    """InverseSqrtLinearWarmupSqrtCooldown (formula: module docstring), in pseudo-epochs.

    Call with the 0-based optimizer update index (Python int or traced int array) -> lr (float32).
    """

    base_lr: float
    max_epochs: int
    warmup_epochs: int
    cooldown_epochs: int
    steps_per_epoch: int = 1
    per_update: bool = False
    warmup_factor: float = 0.1
    offset: float = 128.0
    exponent: float = 0.5

    def __post_init__(self):
        if self.max_epochs <= 0:
            raise ConfigError(f"the lr schedule needs at least one pseudo-epoch, got {self.max_epochs}")
        if self.steps_per_epoch < 1:
            raise ConfigError(f"config train.steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.warmup_epochs < 0 or self.cooldown_epochs < 0:
            raise ConfigError(f"config train.warmup_epochs={self.warmup_epochs} and train.cooldown_epochs="
                              f"{self.cooldown_epochs} must be >= 0 (or -1: 5% of the run each)")
        if self.warmup_epochs + self.cooldown_epochs > self.max_epochs:
            raise ConfigError(f"config train.warmup_epochs + train.cooldown_epochs = "
                              f"{self.warmup_epochs + self.cooldown_epochs} pseudo-epochs exceeds the run's "
                              f"{self.max_epochs} (train.steps / train.steps_per_epoch); shorten them or leave "
                              "them at -1 to follow the run length")

    def _units(self):
        k = self.steps_per_epoch if self.per_update else 1
        return self.warmup_epochs * k, self.cooldown_epochs * k, self.max_epochs * k

    def lr_at(self, level):
        """lr after `level` completed schedule steps (float64 for Python numbers, else float32)."""
        W, C, M = self._units()
        b, f, o, e = self.base_lr, self.warmup_factor, self.offset, self.exponent
        xp = np if isinstance(level, (int, float, np.integer, np.floating)) else jnp
        L = xp.asarray(level, np.float64 if xp is np else jnp.float32)
        warm = b * (f + (1.0 - f) * L / max(W, 1))
        decay = b / (1.0 + xp.power(xp.maximum(L - W + o, 0.0), e) - o ** e)
        cool_base = b / (1.0 + (o + M - C) ** e - o ** e)
        cool = (1.0 - xp.sqrt(xp.maximum(L - (M - C) - 1, 0.0) / max(C, 1))) * cool_base
        lr = xp.where(L > M - C, cool, xp.where((L <= W) & (W > 0), warm, decay))
        return xp.maximum(lr, 0.0)

    def __call__(self, update):
        level = update if self.per_update else update // self.steps_per_epoch
        return self.lr_at(level)


def steps_per_epoch(train_cfg) -> int:
    """Updates per pseudo-epoch: train.steps_per_epoch, or with -1 train.steps / train.schedule_epochs
    (rounded, at least 1), so a schedule of that many pseudo-epochs keeps its shape for any train.steps."""
    spe = int(train_cfg.steps_per_epoch)
    if spe == -1:
        n = int(train_cfg.get("schedule_epochs", 0) or 0)
        if n < 1:
            raise ConfigError(f"config train.steps_per_epoch=-1 needs train.schedule_epochs >= 1 (the pseudo-epochs "
                              f"the run is divided into), got {n}")
        return max(1, round(int(train_cfg.steps) / n))
    if spe < 1:
        raise ConfigError(f"config train.steps_per_epoch must be >= 1 (or -1: train.steps / train.schedule_epochs), "
                          f"got {spe}")
    return spe


def resolve_epochs(train_cfg) -> tuple[int, int, int]:
    """(max_epochs, warmup_epochs, cooldown_epochs) of a `train` config section.

    max_epochs = ceil(train.steps / steps_per_epoch(train)); warmup / cooldown of -1 follow the run
    length: train.warmup_fraction / train.cooldown_fraction of it (default 0.05 each, the release's
    10 of 200 pseudo-epochs), rounded.
    """
    if train_cfg.steps <= 0:
        raise ConfigError(f"config train.steps must be > 0, got {train_cfg.steps}")
    m = math.ceil(int(train_cfg.steps) / steps_per_epoch(train_cfg))
    w = round(float(train_cfg.get("warmup_fraction", 0.05)) * m) if train_cfg.warmup_epochs == -1 \
        else int(train_cfg.warmup_epochs)
    c = round(float(train_cfg.get("cooldown_fraction", 0.05)) * m) if train_cfg.cooldown_epochs == -1 \
        else int(train_cfg.cooldown_epochs)
    return m, w, c


def make_schedule(train_cfg) -> Schedule:
    """The schedule of a `train` config section."""
    m, w, c = resolve_epochs(train_cfg)
    return Schedule(base_lr=float(train_cfg.lr), max_epochs=m, warmup_epochs=w,
                    cooldown_epochs=c, steps_per_epoch=steps_per_epoch(train_cfg),
                    per_update=bool(train_cfg.lr_per_update), warmup_factor=float(train_cfg.warmup_factor),
                    offset=float(train_cfg.lr_offset), exponent=float(train_cfg.lr_exponent))


# ------------------------------------------------------------------------------------ optimizer
@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """torch.optim.AdamW settings plus clipping and accumulation (the release: module docstring)."""

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-10
    weight_decay: float = 1e-4
    clip_norm: float | None = 10.0
    grad_accum: int = 1

    def __post_init__(self):
        if self.grad_accum < 1:
            raise ConfigError(f"config train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"config train.clip_norm must be > 0 (or None to disable), got {self.clip_norm}")


def adamw_config(train_cfg) -> AdamWConfig:
    return AdamWConfig(b1=float(train_cfg.b1), b2=float(train_cfg.b2), eps=float(train_cfg.eps),
                       weight_decay=float(train_cfg.weight_decay),
                       clip_norm=None if not train_cfg.clip_norm else float(train_cfg.clip_norm),
                       grad_accum=int(train_cfg.grad_accum))


def _select(tree, mask) -> dict[tuple, Any]:
    """The leaves of the nested dict `tree` where `mask` (same structure, bools) is True, as
    {path tuple: leaf}."""
    flat = traverse_util.flatten_dict(tree)
    if mask is None:
        return flat
    keep = traverse_util.flatten_dict(mask)
    return {k: v for k, v in flat.items() if np.any(keep[k])}


def _partial(mask) -> dict[tuple, np.ndarray]:
    """{path: bool array} for the mask leaves that train only part of their parameter."""
    if mask is None:
        return {}
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(mask).items()
            if np.ndim(v) > 0 and not np.all(v)}


def _nest(flat: dict[tuple, Any]) -> dict:
    # Moments mirror the parameters' nesting, so sharding rules that match a parameter's path
    # (walrus_jax.sharding.like_params) place its moments like the parameter itself.
    return traverse_util.unflatten_dict(flat) if flat else {}


def init(params, opt: AdamWConfig, trainable_mask=None) -> dict:
    """Optimizer state for `params` (a nested dict of arrays or ShapeDtypeStructs).

    {"count": updates applied, "micro": micro-batches accumulated in the current update,
     "grad_sum": accumulated gradients (only with grad_accum > 1), "seen": bool per parameter, got a
     gradient in the current update, "adam": {"step": int32 per parameter, "mu", "nu"},
     "last": {"grad_norm", "clip_coef", "lr"} of the latest update}. Every per-parameter entry is a
    nested dict with the parameters' paths, holding the trainable parameters only.
    """
    sel = _select(params, trainable_mask)
    zeros = lambda: _nest({k: jnp.zeros(v.shape, v.dtype) for k, v in sel.items()})
    state = {
        "count": jnp.zeros((), jnp.int32),
        "micro": jnp.zeros((), jnp.int32),
        "seen": _nest({k: jnp.zeros((), jnp.bool_) for k in sel}),
        "adam": {"step": _nest({k: jnp.zeros((), jnp.int32) for k in sel}), "mu": zeros(), "nu": zeros()},
        "last": {"grad_norm": jnp.zeros((), jnp.float32), "clip_coef": jnp.ones((), jnp.float32),
                 "lr": jnp.zeros((), jnp.float32)},
    }
    if opt.grad_accum > 1:
        state["grad_sum"] = zeros()
    return state


def _bias_correction(beta: float, step):
    # 1 − β^step without the cancellation of computing β^step in float32 first.
    return -jnp.expm1(step.astype(jnp.float32) * np.float32(math.log(beta)))


def clip_coefficient(grad_norm, clip_norm: float | None):
    """min(1, clip_norm / (grad_norm + 1e-6)); 1 when clipping is off."""
    if clip_norm is None:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, jnp.float32(clip_norm) / (grad_norm + CLIP_EPS))


def step(params, grads, present, state: dict, opt: AdamWConfig, schedule: Callable, trainable_mask=None):
    """One micro-batch: accumulate `grads` (already divided by grad_accum), and on the update's last
    micro-batch clip and apply AdamW. Pure; returns (new_params, new_state).

    params, grads: pytrees of the same structure; present: same structure, Python/array bools
    (the parameter took part in this micro-batch's loss). state: from `init`.
    """
    flat = traverse_util.flatten_dict
    g = _select(grads, trainable_mask)
    part = _partial(trainable_mask)
    g = {k: jnp.where(part[k], v, jnp.zeros_like(v)) if k in part else v for k, v in g.items()}
    seen_old = flat(state["seen"])
    seen = {k: seen_old[k] | jnp.asarray(v) for k, v in _select(present, trainable_mask).items()}
    micro = state["micro"] + 1
    if opt.grad_accum > 1:
        acc = flat(state["grad_sum"])
        g = {k: acc[k] + v.astype(acc[k].dtype) for k, v in g.items()}
    p = _select(params, trainable_mask)
    a_step, a_mu, a_nu = flat(state["adam"]["step"]), flat(state["adam"]["mu"]), flat(state["adam"]["nu"])

    def apply(_):
        sq = sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in g.values()) if g else jnp.zeros(())
        norm = jnp.sqrt(sq)
        coef = clip_coefficient(norm, opt.clip_norm)
        lr = jnp.asarray(schedule(state["count"]), jnp.float32)
        new_p, steps_, mu, nu = {}, {}, {}, {}
        decay = (1.0 - lr * np.float32(opt.weight_decay)).astype(jnp.float32)
        for k in g:
            gk = g[k].astype(jnp.float32) * coef
            t = a_step[k] + 1
            m = a_mu[k] + (gk - a_mu[k]) * np.float32(1.0 - opt.b1)  # torch: lerp
            v = a_nu[k] * np.float32(opt.b2) + np.float32(1.0 - opt.b2) * gk * gk
            denom = jnp.sqrt(v) / jnp.sqrt(_bias_correction(opt.b2, t)) + np.float32(opt.eps)
            pk = p[k].astype(jnp.float32) * decay - (lr / _bias_correction(opt.b1, t)) * (m / denom)
            on = seen[k]
            new_p[k] = jnp.where(on & part[k] if k in part else on, pk, p[k]).astype(p[k].dtype)
            steps_[k] = jnp.where(on, t, a_step[k])
            mu[k] = jnp.where(on, m, a_mu[k]).astype(a_mu[k].dtype)
            nu[k] = jnp.where(on, v, a_nu[k]).astype(a_nu[k].dtype)
        new_state = {"count": state["count"] + 1, "micro": jnp.zeros((), jnp.int32),
                     "seen": _nest({k: jnp.zeros((), jnp.bool_) for k in seen}),
                     "adam": {"step": _nest(steps_), "mu": _nest(mu), "nu": _nest(nu)},
                     "last": {"grad_norm": norm, "clip_coef": coef, "lr": lr}}
        if opt.grad_accum > 1:
            new_state["grad_sum"] = jax.tree.map(jnp.zeros_like, state["grad_sum"])
        return new_p, new_state

    def hold(_):
        new_state = dict(state, micro=micro, seen=_nest(seen))
        if opt.grad_accum > 1:
            new_state["grad_sum"] = _nest(g)
        return dict(p), new_state

    if opt.grad_accum == 1:
        new_sel, new_state = apply(None)
    else:
        new_sel, new_state = jax.lax.cond(micro >= opt.grad_accum, apply, hold, None)
    out = traverse_util.flatten_dict(params)
    out.update(new_sel)
    return traverse_util.unflatten_dict(out), new_state
