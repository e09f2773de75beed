"""The training objective and the pure, jitted train / eval steps, as the original's trainer computes them.

Loss of one micro-batch (the original's trainer: the_well MAE on normalized deltas × loss_multiplier):
  x       = [input_fields | constant_fields repeated over time]            (B, T, *spatial, C)
  x_n     = x / sample_rms(x)                                               (the model input)
  target  = normalized_delta_targets(x, next frame)                         (B, T, *spatial, C)
            (with the dataset's global statistics in the batch — `norm_rms`, `norm_rms_delta` (C,)
            from its stats.yaml, as the original fine-tunes — x / (rms + 1e-8) and the deltas
            / (rms_delta + 1e-8) instead)
  y       = model(x_n, field_indices, bcs, jitter, train=True, key=k)       (B, T, *spatial, C)
  pred, target restricted to the variable channels (constants never enter the loss); a padded
            channel (a component added by 2D→3D inflation) has prediction and target set to 0 (its
            target is 0 anyway: a zero delta over the floored RMS) and still counts in the mean over channels; where a
            constant field named "mask" is non-zero (an object inside the domain) prediction and
            target are set to 0, and those points still count in the spatial mean.
  mae     = mean over space |pred − target|                                 (B, T, C_var)
  loss    = loss_multiplier · mean of mae over (batch, steps minimum_context.., channels)
The first `minimum_context` (1) causal predictions are not scored: prediction t is made from frames
0..t, and the one made from a single frame is left out (T = 6 → 5 scored steps).

Rollout (multi-step) training, `rollout_steps` = k > 1 (output_fields then holds k frames): after the
one-step loss above, the model's own prediction of the next state, x[last] + y[last] · delta_rms,
replaces the oldest frame of the window, and the model predicts again from it, k − 1 times. Step j
is scored on its last prediction only: |y[last] − (true frame j − x[last]) / delta_rms| (the same
normalized-delta MAE, which is the state error over the window's delta RMS), with a fresh
drop-path draw per step (and a fresh jitter draw, unless the batch brings one: the data pipeline's
draw then serves every step). As in a rollout, a predicted frame is 0 at the object mask's points
and in padded channels. loss = loss_multiplier · mean over the k steps of each step's mean MAE
(k = 1: the one-step loss, unchanged). By default the gradient stops at each predicted frame
(`rollout_stop_gradient` = True, the "pushforward" variant: each step learns to correct the inputs
its predecessor produces); False lets it flow back through the predicted frames to the first step
(the loss is then the k-step rollout's own error). Either way a step runs k forward and k backward
passes of the model. On the miniwell's Kolmogorov flow (tools/bench/rollout_training.py) the stopped
gradient held the one-step fine-tune's rollout error and the unstopped one made it worse, with one
held-out trajectory blowing up. Validation always reports the one-step loss.

The state is a plain dict of arrays (params as a pure dict, optimizer state, counters, RNG key
data) so that it shards, donates and checkpoints without NNX objects in the way.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from walrus_jax import normalization, xla_options
from walrus_jax.training import optim
from walrus_jax.models.activation_sharding import activation_mesh
from walrus_jax.models.kernels import compile_target, platform_of
from walrus_jax.models.jitter import Jitter, sample_jitter
from walrus_jax.models.patching import normalize_bcs

# Batch entries that are arrays with a leading batch axis (sharded over the mesh).
BATCH_KEYS = ("input_fields", "output_fields", "constant_fields", "object_mask")
# Batch entries shared by the whole batch (replicated).
SHARED_KEYS = ("field_indices", "padded_field_mask", "norm_rms", "norm_rms_delta")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static (hashable) options of a step; part of the compilation key."""

    loss_multiplier: float = 100.0
    eps: float = normalization.DEFAULT_EPS
    jitter: bool = True  # apply patch/token jitter in training (the release: jitter_patches=True)
    minimum_context: int = 1  # leading causal predictions not scored
    grad_accum: int = 1  # each micro-batch's loss is divided by this before differentiation
    rollout_steps: int = 1  # autoregressive steps in the training loss (module doc)
    rollout_stop_gradient: bool = True  # stop the gradient at each predicted frame (module doc)


# ---------------------------------------------------------------------------------- the loss
def real_channels(padded_field_mask: jax.Array | None, batch: int, c_var: int) -> jax.Array:
    """(B, C_var) float: 1 for real fields, 0 for padded ones (mask (C_var,) or (B, C_var); None: all real)."""
    if padded_field_mask is None:
        return jnp.ones((batch, c_var), jnp.float32)
    m = jnp.asarray(padded_field_mask).astype(jnp.float32)
    if m.shape[-1] != c_var:
        raise ValueError(f"padded_field_mask has {m.shape[-1]} entries but input_fields has {c_var} variable fields")
    return jnp.broadcast_to(m, (batch, c_var))


def scored_mae(pred: jax.Array, target: jax.Array, real: jax.Array, object_mask: jax.Array | None,
               minimum_context: int) -> jax.Array:
    """the_well MAE of the scored steps: pred, target (B, T, *sp, C_var); real (B, C_var);
    object_mask (B, *sp) or None -> (B, T − minimum_context, C_var) (module docstring)."""
    pred = pred.astype(jnp.float32)[:, minimum_context:]
    target = target.astype(jnp.float32)[:, minimum_context:]
    n_sp = pred.ndim - 3
    real = real.reshape(real.shape[:1] + (1,) * (n_sp + 1) + real.shape[1:])
    pred, target = pred * real, target * real  # a padded channel's target is 0 already (zero data)
    if object_mask is not None:
        keep = (object_mask == 0).astype(jnp.float32)[:, None, ..., None]
        pred, target = pred * keep, target * keep
    return jnp.mean(jnp.abs(pred - target), axis=tuple(range(2, 2 + n_sp)))


def compute_loss(model, batch: Mapping[str, jax.Array], key: jax.Array | None, *, bcs, opts: StepOptions,
                 train: bool) -> tuple[jax.Array, dict]:
    """Loss of `model` on one micro-batch (module docstring). bcs: static (n_dims, 2) tuple.

    Returns (loss, aux) with aux {"mae": (B, T − minimum_context + k − 1, C_var), the scored the_well
    MAE of every step (k = rollout_steps in training, 1 otherwise)}.
    """
    inp = batch["input_fields"]
    c_var, n_t = inp.shape[-1], inp.shape[1]
    if n_t <= opts.minimum_context:
        raise ValueError(f"input_fields has {n_t} time steps: none is scored with minimum_context="
                         f"{opts.minimum_context} (data.n_steps_input must exceed it)")
    const = batch.get("constant_fields")
    k = opts.rollout_steps if train else 1
    if batch["output_fields"].shape[1] < k:
        raise ValueError(f"rollout_steps={k} needs {k} output frames per sample; output_fields has shape "
                         f"{tuple(batch['output_fields'].shape)} (data.n_steps_output must be >= rollout_steps)")
    # the dataset's statistics (fine-tuning as released), else each window's own
    stats = (batch["norm_rms"], batch["norm_rms_delta"]) if batch.get("norm_rms") is not None else None
    cfg = model.cfg
    # one key per step; k = 1 keeps the caller's key as it is (the one-step loss, bit for bit)
    keys = [None] * k if key is None else [key] if k == 1 else list(jax.random.split(key, k))
    real = real_channels(batch.get("padded_field_mask"), inp.shape[0], c_var)

    def normalized(x, true_next):
        """Model input, target deltas and the delta RMS of window x (B, T, *sp, C) and its next frame."""
        x_n, d_rms = normalization.normalize(x, opts.eps, stats)
        return x_n, normalization.deltas(x, true_next) / d_rms, d_rms

    def predict(x_n, step_key):
        k_jitter = k_model = None
        if step_key is not None:
            k_jitter, k_model = jax.random.split(step_key)
        jitter = None
        if opts.jitter and cfg.jitter_patches:
            if "jitter" in batch and batch["jitter"] is not None:
                jitter = batch["jitter"]
            elif k_jitter is not None:
                jitter = sample_jitter(k_jitter, cfg, inp.shape[2:-1], bcs)
        return model(x_n, batch["field_indices"], bcs, jitter, train=train, key=k_model if train else None)

    x = normalization.format_window(inp, const)
    x_n, target, d_rms = normalized(x, normalization.format_window(batch["output_fields"][:, :1], const))
    y = predict(x_n, keys[0])
    mae = scored_mae(y[..., :c_var], target[..., :c_var], real, batch.get("object_mask"), opts.minimum_context)
    step_losses = [jnp.mean(mae)]
    window = inp.astype(jnp.float32)
    for j in range(1, k):
        predicted = normalization.next_state(x[:, -1], y[:, -1], d_rms)[..., :c_var]
        predicted = predicted * real.reshape(real.shape[:1] + (1,) * (predicted.ndim - 2) + real.shape[1:])
        if batch.get("object_mask") is not None:
            predicted = jnp.where(batch["object_mask"][..., None] != 0, 0.0, predicted)
        if opts.rollout_stop_gradient:
            predicted = jax.lax.stop_gradient(predicted)
        window = jnp.concatenate([window[:, 1:], predicted[:, None]], axis=1)
        x = normalization.format_window(window, const)
        x_n, target, d_rms = normalized(x, normalization.format_window(batch["output_fields"][:, j:j + 1], const))
        y = predict(x_n, keys[j])
        last = scored_mae(y[:, -1:, ..., :c_var], target[:, -1:, ..., :c_var], real, batch.get("object_mask"), 0)
        step_losses.append(jnp.mean(last))
        mae = jnp.concatenate([mae, last], axis=1)
    loss = (step_losses[0] if k == 1 else jnp.mean(jnp.stack(step_losses))) * opts.loss_multiplier
    return loss, {"mae": mae}


def object_mask(constant_fields, field_names) -> np.ndarray | None:
    """(B, *sp) float32 from the constant field named "mask" (non-zero = object), or None.

    constant_fields (B, *sp, C_con); field_names: the C_var + C_con flattened names, constants last.
    """
    if constant_fields is None or field_names is None or np.shape(constant_fields)[-1] == 0:
        return None
    names = [str(n) for n in np.asarray(field_names).reshape(-1)]
    # the same rule as the rollouts' (which force the masked points to 0 in every prediction)
    mask = normalization.mask_from_constants(constant_fields, names[len(names) - np.shape(constant_fields)[-1]:])
    return None if mask is None else mask.astype(np.float32)


# ------------------------------------------------------------------------------------ state
def init_state(params: Mapping[str, Any], tx, seed_key: jax.Array, trainable_mask=None) -> dict:
    """The train state bundle: params (pure dict), opt_state (`tx.init` of the trainable parameters;
    tx from `optim.build`), micro-step counter, RNG key data."""
    return {
        "params": params,
        "opt_state": tx.init(optim.select(params, trainable_mask)),
        "step": jnp.zeros((), jnp.int32),  # micro-batches done
        # A copy: the state is donated to the step, the caller's key must survive.
        "rng": jnp.array(jax.random.key_data(seed_key) if jnp.issubdtype(seed_key.dtype, jax.dtypes.prng_key)
                         else seed_key, copy=True),
    }


def _split_rng(rng_data):
    key = jax.random.wrap_key_data(rng_data)
    key, sub = jax.random.split(key)
    return jax.random.key_data(key), sub


def present_mask(params, n_spatial_axes: int):
    """Which parameters take part in a micro-batch whose input has `n_spatial_axes` non-singleton
    spatial axes: everything except the encoders / decoders of the other dimensionalities (the model
    picks `embed/d{n}` and `debed/d{n}`). Same structure as params, Python bools."""
    def used(path, _):
        keys = [str(getattr(k, "key", k)) for k in path]
        if len(keys) >= 2 and keys[0] in ("embed", "debed") and keys[1].startswith("d"):
            return keys[1] == f"d{n_spatial_axes}"
        return True

    return jax.tree_util.tree_map_with_path(used, params)


def active_spatial_axes(input_fields_shape) -> int:
    """Non-singleton spatial axes of (B, T, *spatial, C): the encoder the model uses."""
    return sum(1 for n in input_fields_shape[2:-1] if n > 1)


# ------------------------------------------------------------------------------------ steps
def loss_and_grads(params, batch: Mapping[str, Any], rest, key, *, graphdef, bcs, opts: StepOptions,
                   trainable_mask=None):
    """(loss of the micro-batch in train mode, gradients of loss / grad_accum) w.r.t. params; with a
    trainable mask, w.r.t. the (partly) trainable parameters only (a nested dict of those): frozen
    weights get no gradient buffers at all, which is what makes adapter fine-tuning small."""
    trained = optim.select(params, trainable_mask)

    def loss_fn(p):
        model = nnx.merge(graphdef, optim.merge(params, p), rest)
        loss, _ = compute_loss(model, batch, key, bcs=bcs, opts=opts, train=True)
        return loss / opts.grad_accum, loss

    (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    return loss, grads


def train_step(state: dict, batch: Mapping[str, Any], rest, *, graphdef, tx, schedule, bcs, opts: StepOptions,
               trainable_mask=None):
    """One micro-batch: loss, gradients of loss / grad_accum, and the optimizer `tx` (`optim.build`:
    accumulation, and on the update's last micro-batch clipping and AdamW). Pure.

    state: see `init_state`; batch: arrays (BATCH_KEYS with a leading batch axis, SHARED_KEYS,
    optionally `jitter`); rest: the model's non-parameter variables (pure dict).
    Returns (new_state, metrics{loss (this micro-batch, unscaled), grad_norm, clip_coef, lr (of the
    latest update; set when `applied`), applied (True on an update's last micro-batch)}).
    """
    rng, key = _split_rng(state["rng"])
    loss, grads = loss_and_grads(state["params"], batch, rest, key, graphdef=graphdef, bcs=bcs, opts=opts,
                                 trainable_mask=trainable_mask)
    present = present_mask(state["params"], active_spatial_axes(batch["input_fields"].shape))
    trained = optim.select(state["params"], trainable_mask)
    updates, opt_state = tx.update(grads, state["opt_state"], trained, present=optim.select(present, trainable_mask))
    params = optim.merge(state["params"], optax.apply_updates(trained, updates))
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
    return new, {"loss": loss, **optim.last_update(opt_state, schedule), "applied": opt_state.micro == 0}


def eval_loss(params, batch, rest, *, graphdef, bcs, opts: StepOptions):
    """Loss in eval mode (no drop path / field dropout, no jitter): a deterministic number."""
    model = nnx.merge(graphdef, params, rest)
    loss, _ = compute_loss(model, batch, None, bcs=bcs, opts=dataclasses.replace(opts, jitter=False), train=False)
    return loss


def build_train_step(graphdef, tx, schedule, opts: StepOptions, state_shardings=None,
                     rest_shardings=None, trainable_mask=None):
    """jit(train_step) with donated state, static bcs (one compile per bcs / shape / field count).

    With shardings, the state keeps its layout across steps (out_shardings = in_shardings), and the
    model's activations keep their batch axis split over the shardings' mesh (`activation_mesh`).
    Usage: step(state, batch, rest, bcs) with bcs a normalized (static, hashable) tuple.
    """
    mesh = mesh_of(state_shardings)

    def fn(state, batch, rest, bcs):
        with placed_on(mesh):
            return train_step(state, batch, rest, graphdef=graphdef, tx=tx, schedule=schedule, bcs=bcs, opts=opts,
                              trainable_mask=trainable_mask)

    kw = {}
    if state_shardings is not None:
        kw = dict(in_shardings=(state_shardings, None, rest_shardings), out_shardings=(state_shardings, None))
    return xla_options.jit(fn, static_argnums=(3,), donate_argnums=(0,), **kw)


def build_eval_loss(graphdef, opts: StepOptions, mesh=None):
    """jit(eval_loss); usage: fn(params, batch, rest, bcs=bcs). mesh: where the batch is split
    (`activation_mesh`), None for one device."""
    def fn(params, batch, rest, bcs):
        with placed_on(mesh):
            return eval_loss(params, batch, rest, graphdef=graphdef, bcs=bcs, opts=opts)

    return xla_options.jit(fn, static_argnames=("bcs",))


@contextlib.contextmanager
def placed_on(mesh):
    """While tracing a step for `mesh` (None: one device, decided by `wj.jit`): the model's kernels
    are the mesh's platform's (`kernels.compile_target`) and its activations stay split by sample
    (`activation_mesh`)."""
    with activation_mesh(mesh), compile_target(None if mesh is None else platform_of(mesh.devices.flat)):
        yield


def mesh_of(shardings):
    """The mesh of the first NamedSharding in a tree of shardings, or None."""
    for leaf in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
        if isinstance(leaf, NamedSharding):
            return leaf.mesh
    return None


def device_batch(batch: Mapping[str, Any]) -> tuple[dict, tuple]:
    """Splits a pipeline batch into (arrays for the step, static bcs tuple).

    Drops non-array entries (dataset_name, ...), reads `boundary_conditions` ((n_dims, 2), or
    (B, n_dims, 2) identical across the batch) into a static tuple, and derives `object_mask`
    (B, *sp) from a constant field named "mask" when `field_names` lists one.
    """
    if "boundary_conditions" not in batch:
        raise KeyError(f"batch has no 'boundary_conditions' entry (keys: {sorted(batch)})")
    bcs = normalize_bcs(np.asarray(batch["boundary_conditions"]))
    out = {}
    for k in BATCH_KEYS + SHARED_KEYS:
        if k in batch and batch[k] is not None:
            out[k] = batch[k]
    for k in ("input_fields", "output_fields", "field_indices"):
        if k not in out:
            raise KeyError(f"batch has no '{k}' entry (keys: {sorted(batch)})")
    if "object_mask" not in out:
        m = object_mask(batch.get("constant_fields"), batch.get("field_names"))
        if m is not None:
            out["object_mask"] = m
    if batch.get("jitter") is not None:
        j = batch["jitter"]
        if not isinstance(j, Jitter):
            raise TypeError(f"batch['jitter'] must be a walrus_jax Jitter, got {type(j).__name__}")
        out["jitter"] = j
    return out, bcs
