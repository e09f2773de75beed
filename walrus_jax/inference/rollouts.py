"""Autoregressive rollouts as one compiled `lax.scan`, as the original Walrus rolls out (eval mode).

Each step, inside the compiled program:
  1. the window (B, T_in, *spatial, C_var) plus the constant fields repeated over time
     -> x (B, T_in, *spatial, C_var + C_con);
  2. RMS statistics recomputed from x (per sample and channel, eps 1e-5) and x / sample_rms;
  3. the model -> normalized deltas (B, T_in, *spatial, C); only the last one is used;
  4. next = x[last] + y[last] * delta_rms, constant channels dropped;
  5. points where the boolean `mask` is True and channels whose padded_field_mask is False -> 0;
  6. the window slides by one frame: drop the oldest, append `next`.

Non-finite predictions (a diverging rollout) are never silent: each step also records, inside the
compiled program, whether every value of each (sample, channel) is finite (one reduction over the
step's output), and `on_nonfinite` decides what happens: "warn" (default), "raise"
(NonFiniteRolloutError naming the first step, sample and channel; a chunked rollout stops after
the chunk where it happened) or "ignore". `return_finite=True` also returns that mask.

Public entry points:
  rollout(model, input_fields, *, field_indices, bcs, n_steps, ...)      -> (B, n_steps, *spatial, C_var)
  rollout_ensemble(model, input_fields, keys, *, ...)                     -> (E, B, n_steps, *spatial, C_var)
  predict_next(model, window, field_indices, bcs, ...)                    one step, un-jitted (pure)

`model` is any callable `model(x, field_indices, bcs, jitter=...)` with the walrus_jax.Walrus layout;
an `nnx.Module` is split into (graphdef, state) so the compiled program is cached per
(graph, static arguments, shapes) and never retraced for new input values.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from walrus_jax import normalization, xla_options
from walrus_jax.errors import DataError, UserError
from walrus_jax.models.jitter import Jitter, sample_jitter
from walrus_jax.models.patching import choose_strides, normalize_bcs
from walrus_jax.models.walrus import Walrus

DEFAULT_EPS = normalization.DEFAULT_EPS
DEFAULT_MAX_ROLLOUT_STEPS = 200

# Number of times a rollout program has been traced (tests assert one compilation per shape).
TRACE_COUNT = {"scan": 0}
ON_NONFINITE = ("warn", "raise", "ignore")


class NonFiniteRolloutError(UserError, FloatingPointError):
    """A rollout produced NaN/Inf. Attributes: step (0-based prediction step), sample, channel (the
    first non-finite one; for an ensemble `sample` is (member, sample)), predictions (what was
    computed: up to and including the failing chunk, the rest of a chunked output left unwritten)
    and finite ((B, n_steps, C) bool, False where a step's channel holds NaN/Inf or was not run)."""

    def __init__(self, message, *, step, sample, channel, predictions=None, finite=None):
        super().__init__(message)
        self.step, self.sample, self.channel = step, sample, channel
        self.predictions, self.finite = predictions, finite


def first_nonfinite(finite) -> tuple[int, tuple[int, ...], int] | None:
    """(step, sample index tuple, channel) of the earliest False in a finite mask (..., n_steps, C)
    (leading axes: sample, or member and sample); None when everything is finite."""
    f = np.asarray(finite, bool)
    bad_steps = np.nonzero(~f.all(axis=tuple(i for i in range(f.ndim) if i != f.ndim - 2)))[0]
    if bad_steps.size == 0:
        return None
    t = int(bad_steps[0])
    where = np.argwhere(~f[..., t, :])[0]
    return t, tuple(int(i) for i in where[:-1]), int(where[-1])


def _nonfinite_message(first, n_steps: int) -> str:
    t, sample, c = first
    who = ("sample " + str(sample[0])) if len(sample) == 1 else f"ensemble member {sample[0]}, sample {sample[1]}"
    prior = f"; steps 1..{t} are finite" if t else ""
    return (f"rollout diverged: prediction step {t + 1} of {n_steps} holds NaN/Inf ({who}, channel {c}){prior}. "
            "The model is outside the range it was trained on (check the input units, field transforms and "
            "history length); on_nonfinite='ignore' returns the predictions anyway")


# ------------------------------------------------------------------------------------ helpers
def n_rollout_steps(n_available: int, n_input_steps: int, max_rollout_steps: int = DEFAULT_MAX_ROLLOUT_STEPS) -> int:
    """The original's rollout step count: min(T_out, max_rollout_steps + T_in - 1)."""
    return int(min(n_available, max_rollout_steps + n_input_steps - 1))


def _is_key(x) -> bool:
    if isinstance(x, Jitter) or x is None:
        return False
    dt = getattr(x, "dtype", None)
    if dt is None:
        return False
    if jax.dtypes.issubdtype(dt, jax.dtypes.prng_key):
        return True
    return np.dtype(dt) == np.uint32 and tuple(np.shape(x)) == (2,)


def _model_config(model, cfg):
    if cfg is not None:
        return cfg
    for name in ("cfg", "config"):
        c = getattr(model, name, None)
        if c is not None and hasattr(c, "n_blocks"):
            return c
    return None


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that shapes the compiled program besides array shapes (hashable)."""

    field_indices: tuple[int, ...]
    bcs: tuple[tuple[int, int], ...]
    n_var: int
    jitter_mode: str  # "none" | "key" | "stacked"
    has_consts: bool
    has_mask: bool
    eps: float
    cfg: Any  # ModelConfig (frozen) when jitter_mode == "key", else None


# ------------------------------------------------------------------------------------ one step
def predict_next(model, window, field_indices, bcs, constant_fields=None, mask=None, padded_field_mask=None,
                 jitter: Jitter | None = None, eps: float = DEFAULT_EPS, stats=None) -> jax.Array:
    """One autoregressive step (normalize, model, de-normalize, mask), pure and un-jitted.

    window (B, T_in, *spatial, C_var) physical units; constant_fields (B, *spatial, C_con) or None;
    mask (B, *spatial) bool or None (True -> 0); padded_field_mask (C_var,) bool or None (False -> 0);
    jitter: None or one Jitter; stats: None (per-window RMS statistics) or the dataset's global
    (rms, rms_delta), each (C_var + C_con,): x / (rms + 1e-8), next = x[last] + y[last]·(rms_delta + 1e-8)
    (a model fine-tuned with data.normalization='global'). Returns next (B, *spatial, C_var) float32.
    """
    n_var = window.shape[-1]
    x = normalization.format_window(window, constant_fields)
    xn, d_rms = normalization.normalize(x, eps, stats)
    # Only the last frame's prediction is used: a Walrus decodes just that one (the same numbers).
    last_only = {"last_frame_only": True} if isinstance(model, Walrus) else {}
    y = model(xn, field_indices, bcs, jitter=jitter, **last_only)
    nxt = normalization.next_state(x[:, -1], y[:, -1], d_rms)[..., :n_var]
    if mask is not None:
        nxt = jnp.where(mask[..., None], jnp.zeros((), nxt.dtype), nxt)
    if padded_field_mask is not None:
        nxt = jnp.where(padded_field_mask, nxt, jnp.zeros((), nxt.dtype))
    return nxt


def _scan_body(get_model, st: _Static, window, consts, mask, pmask, jitter_xs, key, start, stats=None):
    """The lax.scan step. `get_model()` builds the model inside the step's trace: NNX graph
    transforms inside the model (nnx.scan over blocks) refuse variables created at an outer trace
    level, so an nnx model is merged from (graphdef, state) here rather than outside the scan."""
    fi = np.asarray(st.field_indices, np.int32)
    spatial = window.shape[2:-1]

    def step(carry, xs):
        win, t = carry
        if st.jitter_mode == "key":
            jitter = sample_jitter(jax.random.fold_in(key, t), st.cfg, spatial, st.bcs)
        elif st.jitter_mode == "stacked":
            jitter = xs
        else:
            jitter = None
        nxt = predict_next(get_model(), win, fi, st.bcs, consts, mask, pmask, jitter, st.eps, stats)
        win = jnp.concatenate([win[:, 1:], nxt[:, None].astype(win.dtype)], axis=1)
        finite = jnp.isfinite(nxt).all(axis=tuple(range(1, nxt.ndim - 1)))  # (B, C_var)
        return (win, t + 1), (nxt, finite)

    return step


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, fn, st: _Static, n: int, ensemble: bool):
    """jit(scan of n steps) for one model and static setup; jax caches per input shape below.

    An nnx model comes as `graphdef` (its state is a jit argument, so new weights never retrace);
    a plain callable comes as `fn` and is closed over (the cache holds it by identity).
    """

    def run(state, window, consts, mask, pmask, jitter_xs, key, start, stats):
        TRACE_COUNT["scan"] += 1  # runs at trace time only
        get_model = (lambda: nnx.merge(graphdef, state, copy=True)) if graphdef is not None else (lambda: fn)

        def one(window, key):
            step = _scan_body(get_model, st, window, consts, mask, pmask, jitter_xs, key, start, stats)
            (win, _), (preds, finite) = jax.lax.scan(step, (window, start), jitter_xs, length=n)
            return win, jnp.moveaxis(preds, 0, 1), jnp.moveaxis(finite, 0, 1)  # (n, B, ...) -> (B, n, ...)

        if ensemble:
            return jax.vmap(one)(window, key)
        return one(window, key)

    return xla_options.jit(run)


# ------------------------------------------------------------------------------------ validation
def _check_finite(name: str, arr) -> None:
    a = np.asarray(arr)
    bad = ~np.isfinite(a)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{name} contains {int(bad.sum())} non-finite values (NaN/Inf); first at index {first} "
                        f"of shape {a.shape} (layout (B, T, *spatial, C) / (B, *spatial, C))")


def _prepare(model, input_fields, field_indices, bcs, n_steps, constant_fields, padded_field_mask, mask,
             jitter, cfg, eps, min_input_steps, check_finite):
    if not hasattr(input_fields, "shape") or input_fields.ndim not in (5, 6):
        raise DataError(f"input_fields must be (B, T_in, H, W, C_var) or (B, T_in, H, W, D, C_var); got shape "
                        f"{getattr(input_fields, 'shape', type(input_fields))}")
    b, t_in = input_fields.shape[:2]
    spatial = tuple(input_fields.shape[2:-1])
    n_var = input_fields.shape[-1]
    need = max(1, int(min_input_steps))
    if t_in < need:
        raise DataError(f"input_fields has a history of T_in={t_in} frames (axis 1 of shape {input_fields.shape}) "
                        f"but the model needs at least {need}")
    if int(n_steps) < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    fi = np.asarray(field_indices)
    if fi.ndim != 1 or not np.issubdtype(fi.dtype, np.integer):
        raise DataError(f"field_indices must be a 1-D integer array (C_var + C_con,), got {fi.dtype} {fi.shape}")
    n_con = 0 if constant_fields is None else constant_fields.shape[-1]
    if constant_fields is not None:
        want = (b,) + spatial
        if tuple(constant_fields.shape[:-1]) != want:
            raise DataError(f"constant_fields shape {tuple(constant_fields.shape)} does not match input_fields "
                            f"{tuple(input_fields.shape)}: expected (B, *spatial, C_con) = {want + ('C_con',)}")
    if fi.shape[0] != n_var + n_con:
        raise DataError(f"field_indices has {fi.shape[0]} entries but the data has {n_var} variable + {n_con} "
                        f"constant channels = {n_var + n_con} (input_fields {tuple(input_fields.shape)}, "
                        f"constant_fields {None if constant_fields is None else tuple(constant_fields.shape)})")
    mcfg = _model_config(model, cfg)
    if mcfg is not None:
        n_states = int(mcfg.n_states)
        if (fi < 0).any() or (fi >= n_states).any():
            raise DataError(f"field_indices {fi.tolist()} out of the model's vocabulary [0, {n_states})")
    bcs_t = normalize_bcs(bcs, len(spatial))
    try:
        choose_strides(spatial + (1,) * (3 - len(spatial)))  # clear error for unsupported grid sizes
    except ValueError as e:
        raise DataError(f"input_fields of shape {tuple(input_fields.shape)}: {e}") from None
    if padded_field_mask is not None:
        pm = np.asarray(padded_field_mask)
        if pm.shape != (n_var,):
            raise DataError(f"padded_field_mask must have shape (C_var,) = ({n_var},), got {pm.shape}")
        padded_field_mask = jnp.asarray(pm.astype(bool))
    if mask is not None:
        m = jnp.asarray(mask)
        if m.ndim == len(spatial) + 2 and m.shape[-1] == 1:
            m = m[..., 0]
        if tuple(m.shape) != (b,) + spatial:
            raise DataError(f"mask must be (B, *spatial) = {(b,) + spatial} (or with a trailing 1), got {tuple(jnp.shape(mask))}")
        mask = m.astype(bool)
    if check_finite:
        _check_finite("input_fields", input_fields)
        if constant_fields is not None:
            _check_finite("constant_fields", constant_fields)

    if jitter is None:
        mode, jitter_xs, key = "none", None, None
    elif isinstance(jitter, Jitter):
        ps, ts = jnp.asarray(jitter.patch_shift), jnp.asarray(jitter.token_shift)
        if ps.ndim == 1:  # one Jitter reused at every step
            ps, ts = jnp.broadcast_to(ps, (n_steps,) + ps.shape), jnp.broadcast_to(ts, (n_steps,) + ts.shape)
        if ps.shape[0] != n_steps or ts.ndim != 3 or ts.shape[0] != n_steps or ps.shape[1:] != (3,):
            raise ValueError(f"a stacked Jitter needs patch_shift (n_steps, 3) and token_shift (n_steps, n_blocks, 3) "
                             f"with n_steps={n_steps}; got {ps.shape} and {ts.shape}")
        mode, jitter_xs, key = "stacked", Jitter(ps.astype(jnp.int32), ts.astype(jnp.int32)), None
    elif _is_key(jitter):
        if mcfg is None:
            raise ValueError("jitter given as a PRNG key needs the model config (n_blocks, kernel sizes) to draw "
                             "draws: the model has no `cfg` attribute; pass cfg=ModelConfig(...)")
        mode, jitter_xs, key = "key", None, jitter
    else:
        raise TypeError(f"jitter must be None, a PRNG key or a (stacked) Jitter; got {type(jitter).__name__}")

    st = _Static(tuple(int(v) for v in fi), bcs_t, int(n_var), mode, constant_fields is not None,
                 mask is not None, float(eps), mcfg if mode == "key" else None)
    consts = None if constant_fields is None else jnp.asarray(constant_fields, jnp.float32)
    return st, consts, mask, padded_field_mask, jitter_xs, key


def _split(model):
    """nnx.Module -> (graphdef, None, state); plain callable -> (None, callable, None)."""
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return graphdef, None, state
    return None, model, None


def _slice_jitter(j: Jitter | None, a: int, b: int):
    return None if j is None else Jitter(j.patch_shift[a:b], j.token_shift[a:b])


# ------------------------------------------------------------------------------------ public API
def rollout(model, input_fields, *, field_indices, bcs, n_steps: int, constant_fields=None,
            padded_field_mask=None, mask=None, jitter=None, cfg=None, eps: float = DEFAULT_EPS,
            chunk_size: int | None = None, sink=None, min_input_steps: int = 1, check_finite: bool = True,
            on_nonfinite: str = "warn", return_finite: bool = False, normalization_stats=None):
    """Autoregressive rollout, one compiled lax.scan.

    input_fields (B, T_in, *spatial, C_var) physical units, spatial (H, W) or (H, W, D).
    field_indices (C_var + C_con,) vocabulary rows; bcs (n_spatial_dims, 2) or (B, n_spatial_dims, 2).
    constant_fields (B, *spatial, C_con) or None; padded_field_mask (C_var,) bool or None;
    mask (B, *spatial) bool or None: True points are set to 0 in every prediction (see
    `normalization.mask_from_constants`).
    jitter: None (no random shifts); a PRNG key (a draw per step with sample_jitter(fold_in(key,
    step)), inside the compiled program; the same key gives the same rollout, chunked or not); or a
    Jitter stacked over steps (patch_shift (n_steps, 3), token_shift (n_steps, n_blocks, 3)) or a
    single Jitter reused every step.
    chunk_size: None runs all steps in one scan and returns a device array. Otherwise the rollout
    runs in scans of chunk_size steps; each chunk is copied to host memory (into `sink` when given:
    anything supporting `sink[:, a:b] = chunk` with shape (B, n_steps, *spatial, C_var), e.g. an
    h5py dataset) so device memory stays bounded; returns the numpy array (or `sink`).
    min_input_steps: the shortest history accepted (the released model was trained with 6 in 2D).
    check_finite: refuse NaN/Inf in input_fields / constant_fields (ValueError naming the index).
    on_nonfinite: what a NaN/Inf prediction does: "warn" (RuntimeWarning naming the first step,
    sample and channel), "raise" (NonFiniteRolloutError, with the predictions attached; a chunked
    rollout stops after the chunk where it happened) or "ignore". Checking waits for the rollout
    to finish (it reads a (B, n_steps, C_var) flag array computed inside the scan).
    Returns preds (B, n_steps, *spatial, C_var) float32 in physical units; with return_finite=True
    (preds, finite), finite (B, n_steps, C_var) bool numpy: every value of that step and channel
    is finite.
    normalization_stats: None (each window normalized by its own RMS, as pretrained) or the dataset's
    global statistics {"rms", "rms_delta"} / (rms, rms_delta), each (C_var + C_con,), for a model
    fine-tuned with data.normalization='global' (`walrus_jax.data.load_stats`).
    """
    st, consts, mask, pmask, jitter_xs, key = _prepare(model, input_fields, field_indices, bcs, n_steps,
                                                   constant_fields, padded_field_mask, mask, jitter, cfg, eps,
                                                   min_input_steps, check_finite)
    _check_on_nonfinite(on_nonfinite)
    window = jnp.asarray(input_fields, jnp.float32)
    return _drive(model, st, window, consts, mask, pmask, jitter_xs, key, int(n_steps), chunk_size, sink,
                  ensemble=False, on_nonfinite=on_nonfinite, return_finite=return_finite,
                  stats=_global_stats(normalization_stats, len(st.field_indices)))


PERTURBATION_STREAM = 2 ** 32 - 1  # fold_in(keys[e], this) draws member e's perturbation; jitter uses fold_in(key, step)


def rollout_ensemble(model, input_fields, keys, *, field_indices, bcs, n_steps: int, constant_fields=None,
                     padded_field_mask=None, mask=None, cfg=None, eps: float = DEFAULT_EPS, jitter: bool = True,
                     perturbation: float = 0.0, chunk_size: int | None = None, sink=None, min_input_steps: int = 1,
                     check_finite: bool = True, on_nonfinite: str = "warn", return_finite: bool = False,
                     normalization_stats=None):
    """An ensemble of rollouts, vmapped over the members in one compiled program.

    keys: (E,) PRNG keys (jax.random.split(key, E)), one per member. Members differ by
    - their jitter (jitter=True): member e draws it as rollout(..., jitter=keys[e]) does, and equals
      that rollout when perturbation is 0;
    - a perturbed initial condition (perturbation > 0): member e starts from input_fields +
      perturbation * rms * N(0, 1), rms per sample and channel over the input window (the model's
      own normalization), the noise drawn from fold_in(keys[e], PERTURBATION_STREAM).
    Returns (E, B, n_steps, *spatial, C_var). on_nonfinite / return_finite as in `rollout` (the
    finite mask is (E, B, n_steps, C_var)).
    """
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if keys.ndim < 1 or not _is_key(keys[0]):
        raise TypeError(f"keys must be a stack of PRNG keys (E,) (jax.random.split(key, E)); got {keys.dtype} "
                        f"{keys.shape}")
    perturbation = float(perturbation)
    if not perturbation >= 0:
        raise ValueError(f"perturbation must be >= 0 (a fraction of each channel's RMS), got {perturbation}")
    if not jitter and perturbation == 0:
        raise ValueError("an ensemble without jitter needs perturbation > 0: its members would all be the same")
    st, consts, mask, pmask, _, _ = _prepare(model, input_fields, field_indices, bcs, n_steps, constant_fields,
                                             padded_field_mask, mask, keys[0] if jitter else None, cfg, eps,
                                             min_input_steps, check_finite)
    _check_on_nonfinite(on_nonfinite)
    e = keys.shape[0]
    window = jnp.broadcast_to(jnp.asarray(input_fields, jnp.float32)[None], (e,) + tuple(input_fields.shape))
    if perturbation > 0:
        window = _perturbed(window, keys, perturbation)
    return _drive(model, st, window, consts, mask, pmask, None, keys, int(n_steps), chunk_size, sink,
                  ensemble=True, on_nonfinite=on_nonfinite, return_finite=return_finite,
                  stats=_global_stats(normalization_stats, len(st.field_indices)))


@jax.jit
def _perturbed(windows, keys, perturbation):
    """windows (E, B, T, *spatial, C) + perturbation * rms * N(0, 1), member e's noise from keys[e]."""
    rms = normalization.sample_rms(windows[0])  # (B, 1, *1, C)

    def one(window, key):
        noise = jax.random.normal(jax.random.fold_in(key, PERTURBATION_STREAM), window.shape, window.dtype)
        return window + perturbation * rms * noise

    return jax.vmap(one)(windows, keys)


def _global_stats(normalization_stats, n_channels: int):
    """None, or (rms, rms_delta) float32 (C,) arrays checked against the channel count."""
    if normalization_stats is None:
        return None
    if isinstance(normalization_stats, dict):
        normalization_stats = (normalization_stats["rms"], normalization_stats["rms_delta"])
    rms, rms_delta = (np.asarray(a, np.float32).reshape(-1) for a in normalization_stats)
    if rms.shape != (n_channels,) or rms_delta.shape != (n_channels,):
        raise DataError(f"normalization_stats: rms {rms.shape} and rms_delta {rms_delta.shape} must each have one "
                        f"value per channel (C_var + C_con = {n_channels},)")
    for name, a in (("rms", rms), ("rms_delta", rms_delta)):
        if not np.isfinite(a).all() or (a < 0).any():
            raise DataError(f"normalization_stats: {name} must be finite and >= 0, got {a.tolist()}")
    return jnp.asarray(rms), jnp.asarray(rms_delta)


def _check_on_nonfinite(on_nonfinite: str) -> None:
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite={on_nonfinite!r}: expected one of {ON_NONFINITE}")


def _report_nonfinite(finite, n_steps: int, on_nonfinite: str, preds) -> None:
    """Warns or raises (per on_nonfinite) when the finite mask has a False."""
    if on_nonfinite == "ignore":
        return
    first = first_nonfinite(finite)
    if first is None:
        return
    msg = _nonfinite_message(first, n_steps)
    if on_nonfinite == "raise":
        raise NonFiniteRolloutError(msg, step=first[0], sample=first[1] if len(first[1]) > 1 else first[1][0],
                                    channel=first[2], predictions=preds, finite=np.asarray(finite, bool))
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _drive(model, st, window, consts, mask, pmask, jitter_xs, key, n_steps, chunk_size, sink, ensemble,
           on_nonfinite="warn", return_finite=False, stats=None):
    graphdef, fn, state = _split(model)
    start0 = jnp.zeros((), jnp.int32)
    if chunk_size is None and sink is None:
        _, preds, finite = _compiled(graphdef, fn, st, n_steps, ensemble)(state, window, consts, mask, pmask,
                                                                         jitter_xs, key, start0, stats)
        if on_nonfinite != "ignore" or return_finite:
            finite = np.asarray(finite)
            _report_nonfinite(finite, n_steps, on_nonfinite, preds)
        return (preds, finite) if return_finite else preds
    chunk_size = n_steps if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = window.shape[:2] if ensemble else window.shape[:1]
    out_shape = tuple(lead) + (n_steps,) + tuple(window.shape[len(lead) + 1:])
    if sink is None:
        sink = np.empty(out_shape, np.float32)
    elif tuple(sink.shape) != out_shape:
        raise ValueError(f"sink has shape {tuple(sink.shape)}; expected {out_shape} (lead axes, n_steps, *spatial, C_var)")
    t_axis = len(lead)
    finite_all = np.zeros(tuple(lead) + (n_steps, int(st.n_var)), bool)  # False until a step has run
    pending = None  # (a, b, device preds, finite): copied to host while the next chunk runs (async dispatch)
    a = 0
    while a < n_steps:
        b = min(a + chunk_size, n_steps)
        fn_ab = _compiled(graphdef, fn, st, b - a, ensemble)
        window, preds, finite = fn_ab(state, window, consts, mask, pmask, _slice_jitter(jitter_xs, a, b), key,
                                      jnp.asarray(a, jnp.int32), stats)
        if pending is not None and not _write(sink, finite_all, t_axis, *pending) and on_nonfinite == "raise":
            pending = None  # stop: the chunk just written holds NaN/Inf
            break
        pending = (a, b, preds, finite)
        a = b
    if pending is not None:
        _write(sink, finite_all, t_axis, *pending)
    if on_nonfinite != "ignore":
        _report_nonfinite(finite_all, n_steps, on_nonfinite, sink)
    return (sink, finite_all) if return_finite else sink


def _write(sink, finite_all, t_axis, a, b, preds, finite) -> bool:
    """Copies one chunk (and its finite flags) to the host; True if it is all finite."""
    idx = (slice(None),) * t_axis + (slice(a, b),)
    sink[idx] = np.asarray(preds)
    finite_all[idx] = np.asarray(finite)
    return bool(finite_all[idx].all())
