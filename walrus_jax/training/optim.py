"""The original trainer's optimizer and learning-rate schedule, as optax transformations.

`build(opt, schedule, trainable_mask)` returns one `optax.GradientTransformationExtraArgs`:

    accumulate(chain(keep_entries, clip_by_global_norm, <optimizer>, keep_entries), grad_accum)

whose `update(grads, state, params, present=...)` takes the gradient of one micro-batch. One
optimizer *update* consumes `grad_accum` micro-batches: per micro-batch the gradient of
`loss / grad_accum` is added to an accumulator (the original backpropagates loss/k into the same
.grad buffers) and the parameters that got a gradient at all (`present`) are recorded; the updates
are zero until the last micro-batch of the update, when the inner chain runs on the sum:

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

`<optimizer>` is the release's (`torch_adamw`, the default) or any optax optimizer by name
(`train.optimizer="lion"`, with `train.optimizer_args`), driven by the same schedule. Only the
release's skips absent gradients: another optimizer sees zeros for them.

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
import ast
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from walrus_jax.errors import ConfigError

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)


# ------------------------------------------------------------------------------------- schedule
@dataclasses.dataclass(frozen=True)
class Schedule:
    """InverseSqrtLinearWarmupSqrtCooldown (formula: module docstring), in pseudo-epochs.

    An optax schedule: call with the 0-based optimizer update index (Python int or traced int array)
    -> lr (float32).
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
RELEASE = "release"  # train.optimizer: the original trainer's torch AdamW


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Which optimizer, with clipping and accumulation (the release's: module docstring).

    name: "release" (torch AdamW with b1, b2, eps, weight_decay) or an optax optimizer's name
    (`optax.<name>(learning_rate=schedule, **args)`; b1 ... weight_decay then do not apply).
    args: (key, value) pairs for that optimizer.
    """

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-10
    weight_decay: float = 1e-4
    clip_norm: float | None = 10.0
    grad_accum: int = 1
    name: str = RELEASE
    args: tuple = ()

    def __post_init__(self):
        if self.grad_accum < 1:
            raise ConfigError(f"config train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"config train.clip_norm must be > 0 (or None to disable), got {self.clip_norm}")
        if self.name != RELEASE and not callable(getattr(optax, self.name, None)):
            raise ConfigError(f"config train.optimizer={self.name!r} is neither {RELEASE!r} nor an optax "
                              "optimizer (e.g. adamw, lion, adafactor, sgd)")


def parse_args(text: str) -> tuple:
    """"b1=0.95, weight_decay=0.1" -> (("b1", 0.95), ("weight_decay", 0.1)): values are Python literals."""
    out = []
    for item in filter(None, (s.strip() for s in str(text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"config train.optimizer_args: {item!r} is not key=value")
        try:
            out.append((key.strip(), ast.literal_eval(value.strip())))
        except (ValueError, SyntaxError):
            raise ConfigError(f"config train.optimizer_args: the value of {key.strip()!r} ({value.strip()!r}) "
                              "is not a Python literal (a number, string, bool or None)") from None
    return tuple(out)


def optimizer_config(train_cfg) -> OptimizerConfig:
    """The optimizer of a `train` config section."""
    return OptimizerConfig(b1=float(train_cfg.b1), b2=float(train_cfg.b2), eps=float(train_cfg.eps),
                           weight_decay=float(train_cfg.weight_decay),
                           clip_norm=None if not train_cfg.clip_norm else float(train_cfg.clip_norm),
                           grad_accum=int(train_cfg.grad_accum), name=str(train_cfg.get("optimizer", RELEASE)),
                           args=parse_args(train_cfg.get("optimizer_args", "")))


def _bias_correction(beta: float, step):
    # 1 − β^step without the cancellation of computing β^step in float32 first.
    return -jnp.expm1(step.astype(jnp.float32) * np.float32(math.log(beta)))


def clip_coefficient(grad_norm, clip_norm: float | None):
    """min(1, clip_norm / (grad_norm + 1e-6)); 1 when clipping is off."""
    if clip_norm is None:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, jnp.float32(clip_norm) / (grad_norm + CLIP_EPS))


class ClipState(NamedTuple):
    grad_norm: jax.Array  # total norm of the latest clipped gradient (before clipping)
    clip_coef: jax.Array  # the factor it was multiplied by


def clip_by_global_norm(max_norm: float | None) -> optax.GradientTransformation:
    """torch's `clip_grad_norm_`: every gradient times min(1, max_norm / (n + 1e-6)), n the total norm
    (always multiplied, unlike `optax.clip_by_global_norm`); None: factor 1. Its state keeps n and the
    factor for logging."""
    def init(params):
        del params
        return ClipState(jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32))

    def update(updates, state, params=None):
        del state, params
        leaves = jax.tree.leaves(updates)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in leaves)) if leaves \
            else jnp.zeros((), jnp.float32)
        coef = clip_coefficient(norm, max_norm)
        return jax.tree.map(lambda g: g.astype(jnp.float32) * coef, updates), ClipState(norm, coef)

    return optax.GradientTransformation(init, update)


def keep_entries(masks) -> optax.GradientTransformation:
    """Zeroes the updates outside `masks` (a tree like the parameters: bool arrays broadcastable to
    them, or None for a fully trained parameter). Stateless."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u if m is None else jnp.where(m, u, jnp.zeros_like(u)), updates, masks,
                            is_leaf=lambda x: x is None), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class TorchAdamWState(NamedTuple):
    count: jax.Array  # updates applied: the schedule's index
    step: Any  # per parameter: its own step count (int32), as torch keeps
    mu: Any
    nu: Any


def torch_adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-10,
                weight_decay: float = 1e-4) -> optax.GradientTransformationExtraArgs:
    """torch.optim.AdamW in float32 (formula: module docstring). `update(..., present=tree of bools)`
    skips the parameters without a gradient in this update (default: none skipped); needs params.

    The update is written as (p·(1 − lr·wd) − p) − step, so that `optax.apply_updates` gives torch's
    p·(1 − lr·wd) − step to the bit whenever lr·wd rounds the factor to 1 in float32 (the release's
    lr 2e-4 × wd 1e-4), and to within an ulp otherwise.
    """
    lr_of = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params):
        zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)
        return TorchAdamWState(jnp.zeros((), jnp.int32), jax.tree.map(lambda p: jnp.zeros((), jnp.int32), params),
                               zeros(), zeros())

    def update(grads, state, params=None, *, present=None, **extra):
        del extra
        if params is None:
            raise ValueError("torch_adamw needs the parameters (its weight decay multiplies them)")
        present = jax.tree.map(lambda _: True, grads) if present is None else present
        lr = jnp.asarray(lr_of(state.count), jnp.float32)
        decay = (1.0 - lr * np.float32(weight_decay)).astype(jnp.float32)

        def one(g, p, on, t, m, v):
            g = g.astype(jnp.float32)
            t1 = t + 1
            m1 = m + (g - m) * np.float32(1.0 - b1)  # torch: lerp
            v1 = v * np.float32(b2) + np.float32(1.0 - b2) * g * g
            denom = jnp.sqrt(v1) / jnp.sqrt(_bias_correction(b2, t1)) + np.float32(eps)
            pf = p.astype(jnp.float32)
            u = (pf * decay - pf) - (lr / _bias_correction(b1, t1)) * (m1 / denom)
            on = jnp.asarray(on)
            return (jnp.where(on, u, 0.0).astype(p.dtype), jnp.where(on, t1, t),
                    jnp.where(on, m1, m).astype(m.dtype), jnp.where(on, v1, v).astype(v.dtype))

        out = jax.tree.map(one, grads, params, present, state.step, state.mu, state.nu)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)
        return pick(0), TorchAdamWState(state.count + 1, pick(1), pick(2), pick(3))

    return optax.GradientTransformationExtraArgs(init, update)


class AccumulateState(NamedTuple):
    count: jax.Array  # updates applied
    micro: jax.Array  # micro-batches accumulated in the current update
    seen: Any  # per parameter: got a gradient in the current update
    grad_sum: Any  # accumulated gradients (an empty dict when every update is one micro-batch)
    inner: Any


def accumulate(inner: optax.GradientTransformation, every: int) -> optax.GradientTransformationExtraArgs:
    """Sums `every` micro-batch gradients (each already divided by `every`) and the `present` flags,
    then runs `inner` once on the sum with `present=` the parameters seen in any of them; the updates
    of the other micro-batches are zeros. Unlike `optax.MultiSteps` it sums (the original's loss/k
    into one buffer) rather than averaging, and carries the presence flags."""
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return AccumulateState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                               jax.tree.map(lambda _: jnp.zeros((), jnp.bool_), params),
                               jax.tree.map(jnp.zeros_like, params) if every > 1 else {}, inner.init(params))

    def update(grads, state, params=None, *, present=None, **extra):
        present = jax.tree.map(lambda _: True, grads) if present is None else present
        seen = jax.tree.map(lambda s, p: s | jnp.asarray(p), state.seen, present)
        unseen = jax.tree.map(jnp.zeros_like, seen)
        if every == 1:
            updates, inner_state = inner.update(grads, state.inner, params, present=seen, **extra)
            return updates, AccumulateState(state.count + 1, state.micro, unseen, {}, inner_state)
        summed = jax.tree.map(lambda a, g: a + g.astype(a.dtype), state.grad_sum, grads)
        micro = state.micro + 1

        def apply(_):
            updates, inner_state = inner.update(summed, state.inner, params, present=seen, **extra)
            return updates, AccumulateState(state.count + 1, jnp.zeros((), jnp.int32), unseen,
                                            jax.tree.map(jnp.zeros_like, summed), inner_state)

        def hold(_):
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)
            return zeros, AccumulateState(state.count, micro, seen, summed, state.inner)

        return jax.lax.cond(micro >= every, apply, hold, None)

    return optax.GradientTransformationExtraArgs(init, update)


def _partial_masks(trainable_mask):
    """For `select(params, trainable_mask)`: the bool array of each partly trained parameter, None
    for the others; None when there is none."""
    if trainable_mask is None:
        return None
    flat = traverse_util.flatten_dict(trainable_mask)
    out = {k: (np.asarray(v) if np.ndim(v) > 0 and not np.all(v) else None)
           for k, v in flat.items() if np.any(v)}
    return _nest(out) if any(v is not None for v in out.values()) else None


def build(opt: OptimizerConfig, schedule: Callable, trainable_mask=None) -> optax.GradientTransformationExtraArgs:
    """The optimizer of the module docstring, for the parameters `select(params, trainable_mask)`:
    `init(select(params, mask))`, `update(grads, state, select(params, mask), present=...)`."""
    if opt.name == RELEASE:
        core = torch_adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    else:
        try:
            core = getattr(optax, opt.name)(learning_rate=schedule, **dict(opt.args))
        except TypeError as e:
            raise ConfigError(f"config train.optimizer={opt.name!r} with train.optimizer_args "
                              f"{dict(opt.args)}: {e}") from None
    parts = [clip_by_global_norm(opt.clip_norm), core]
    masks = _partial_masks(trainable_mask)
    if masks is not None:
        parts = [keep_entries(masks), *parts, keep_entries(masks)]
    return accumulate(optax.chain(*parts), opt.grad_accum)


def _nest(flat: dict[tuple, Any]) -> dict:
    # Optimizer states mirror the parameters' nesting, so sharding rules that match a parameter's
    # path (walrus_jax.sharding.like_params) place its moments like the parameter itself.
    return traverse_util.unflatten_dict(flat) if flat else {}


def select(tree, mask) -> dict:
    """The part of the nested dict `tree` that trains: the leaves where `mask` (same structure,
    bools or bool arrays) has any True; all of it without a mask."""
    if mask is None:
        return tree
    keep = traverse_util.flatten_dict(mask)
    return _nest({k: v for k, v in traverse_util.flatten_dict(tree).items() if np.any(keep[k])})


def merge(tree, part) -> dict:
    """`tree` with the leaves of `part` (a sub-tree of the same nesting) replaced."""
    flat = traverse_util.flatten_dict(tree)
    flat.update(traverse_util.flatten_dict(part))
    return traverse_util.unflatten_dict(flat)


def last_update(opt_state, schedule: Callable) -> dict:
    """{"grad_norm", "clip_coef", "lr"} of the latest applied update (zeros / 1 before the first)."""
    clip = _find(opt_state, ClipState)
    count = opt_state.count
    lr = jnp.where(count > 0, jnp.asarray(schedule(jnp.maximum(count - 1, 0)), jnp.float32), 0.0)
    return {"grad_norm": clip.grad_norm, "clip_coef": clip.clip_coef, "lr": lr}


def _find(state, kind):
    """The first sub-state of type `kind` in a (nested tuple) optax state."""
    if isinstance(state, kind):
        return state
    if isinstance(state, tuple):
        for s in state:
            found = _find(s, kind)
            if found is not None:
                return found
    return None
