"""Evaluation metrics as the_well defines them, in JAX.

Every metric takes `pred` and `target` in the Well's channels-last layout (..., *spatial, C),
typically (B, T, *spatial, C), and reduces over the spatial axes only, keeping every leading axis
(batch, time) and the channel axis: (B, T, *spatial, C) -> (B, T, C). The number of spatial axes is
`n_spatial_dims`; when it is None it is inferred as `ndim - 3` (the (B, T, *spatial, C) layout).

Definitions and epsilons (the_well.benchmark.metrics, eps = 1e-7):
  MSE   = mean_space (pred - target)^2
  RMSE  = sqrt(MSE)
  NMSE  = MSE / (mean_space target^2 + eps)              NRMSE = sqrt(NMSE)
  VMSE  = MSE / (var_space(target, ddof=1) + eps)        VRMSE = sqrt(VMSE)
  binned spectral error: per isotropic-|k| bin, the residual's energy in that bin
  (Parseval: summing the bins over all |k| gives the MSE) and the same normalized by the target's
  energy in the bin (+ eps).

Horizon helpers average a per-step metric over windows of rollout steps, 1-based and inclusive as in
the paper ("1-20", "21-60"; downstream "1-10", "11-30").

Ensemble metrics take the members along a leading axis, ensemble (E, B, T, *spatial, C) against
target (B, T, *spatial, C), and reduce the members and space: -> (B, T, C).
  CRPS          mean_space [ mean_e |x_e - y| - sum_{e,e'} |x_e - x_e'| / (2 E (E - 1)) ]  ("fair"
                estimator: unbiased for the CRPS of the distribution the members are drawn from;
                fair=False divides by 2 E^2, the CRPS of the empirical distribution itself)
  spread-skill  sqrt((E + 1) / E) * sqrt(mean_space var_e(x, ddof=1)) / sqrt(mean_space (mean_e x - y)^2)
                (1 for a calibrated ensemble: the target indistinguishable from a member; below 1
                over-confident, above 1 under-confident)
  rank histogram  per point, the target's rank among the members (0..E); frequencies over space
                (B, T, C, E + 1), flat (1 / (E + 1)) for a calibrated ensemble.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-7  # the_well's default for every normalized metric
N_FREQUENCY_BINS = 3

# (first step, last step), 1-based inclusive.
PAPER_WINDOWS = ((1, 1), (1, 20), (21, 60))
DOWNSTREAM_WINDOWS = ((1, 1), (1, 10), (11, 30))


# ----------------------------------------------------------------------------------- helpers
def _spatial_axes(x, n_spatial_dims: int | None) -> tuple[int, ...]:
    nd = x.ndim - 3 if n_spatial_dims is None else int(n_spatial_dims)
    if not 1 <= nd <= 3 or x.ndim < nd + 1:
        raise ValueError(
            f"metrics expect arrays laid out (..., *spatial, C) with 1-3 spatial axes; got shape {tuple(x.shape)} "
            f"with n_spatial_dims={n_spatial_dims} (inferred {nd}); pass n_spatial_dims explicitly for layouts "
            "other than (B, T, *spatial, C)")
    return tuple(range(-nd - 1, -1))


def _check_pair(pred, target):
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}; "
                         "both must be (B, T, *spatial, C)")


def _f32(x):
    x = jnp.asarray(x)
    return x if x.dtype in (jnp.float32, jnp.float64) else x.astype(jnp.float32)


# ----------------------------------------------------------------------------------- spatial
def mse(pred, target, n_spatial_dims: int | None = None) -> jax.Array:
    """Mean squared error over space. (B, T, *spatial, C) x2 -> (B, T, C)."""
    _check_pair(pred, target)
    pred, target = _f32(pred), _f32(target)
    return jnp.mean(jnp.square(pred - target), axis=_spatial_axes(pred, n_spatial_dims))


def mae(pred, target, n_spatial_dims: int | None = None) -> jax.Array:
    """Mean absolute error over space (the_well's MAE). (B, T, *spatial, C) x2 -> (B, T, C)."""
    _check_pair(pred, target)
    pred, target = _f32(pred), _f32(target)
    return jnp.mean(jnp.abs(pred - target), axis=_spatial_axes(pred, n_spatial_dims))


def rmse(pred, target, n_spatial_dims: int | None = None) -> jax.Array:
    """sqrt(MSE). (B, T, *spatial, C) x2 -> (B, T, C)."""
    return jnp.sqrt(mse(pred, target, n_spatial_dims))


def nmse(pred, target, n_spatial_dims: int | None = None, eps: float = EPS) -> jax.Array:
    """MSE / (mean_space target^2 + eps). -> (B, T, C)."""
    target_ = _f32(target)
    norm = jnp.mean(jnp.square(target_), axis=_spatial_axes(target_, n_spatial_dims))
    return mse(pred, target, n_spatial_dims) / (norm + eps)


def nrmse(pred, target, n_spatial_dims: int | None = None, eps: float = EPS) -> jax.Array:
    """sqrt(NMSE). -> (B, T, C)."""
    return jnp.sqrt(nmse(pred, target, n_spatial_dims, eps))


def vmse(pred, target, n_spatial_dims: int | None = None, eps: float = EPS) -> jax.Array:
    """MSE / (unbiased spatial variance of target + eps) (torch.std, N-1). -> (B, T, C)."""
    target_ = _f32(target)
    var = jnp.var(target_, axis=_spatial_axes(target_, n_spatial_dims), ddof=1)
    return mse(pred, target, n_spatial_dims) / (var + eps)


def vrmse(pred, target, n_spatial_dims: int | None = None, eps: float = EPS) -> jax.Array:
    """sqrt(VMSE): RMSE relative to the target's spatial standard deviation. -> (B, T, C).

    0 is perfect; 1 is what predicting the target's spatial mean everywhere scores."""
    return jnp.sqrt(vmse(pred, target, n_spatial_dims, eps))


# ----------------------------------------------------------------------------------- spectral
def spectral_bin_edges(spatial_shape: Sequence[int], n_bins: int = N_FREQUENCY_BINS) -> np.ndarray:
    """the_well's default edges: logspace(log10(2*pi / max N), log10(pi * sqrt(ndim) + 1e-6),
    n_bins + 1) with the first edge set to 0. Computed in float64 so that the Nyquist corner
    |k| = pi * sqrt(ndim) falls inside the last bin rather than on a rounding boundary."""
    ndim = len(spatial_shape)
    edges = np.logspace(np.log10(2 * np.pi / max(spatial_shape)), np.log10(np.pi * np.sqrt(ndim) + 1e-6), n_bins + 1)
    edges[0] = 0.0
    return edges


def wavenumber_bins(spatial_shape: Sequence[int], edges: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bin index of every Fourier mode, flattened row-major, and the mode count per bin.

    |k| = sqrt(sum_a (2*pi*fftfreq(N_a))^2). Bin j holds edges[j] <= |k| < edges[j+1]
    (torch.bucketize(right=True) - 1); modes at or beyond the last edge get index len(edges)-1,
    which the_well discards. Returns (index (prod(spatial),) int, counts (len(edges),) int).
    """
    edges = spectral_bin_edges(spatial_shape) if edges is None else np.asarray(edges, np.float64)
    k2 = np.zeros(tuple(spatial_shape), np.float64)
    for a, n in enumerate(spatial_shape):
        shape = [1] * len(spatial_shape)
        shape[a] = n
        k2 = k2 + (2 * np.pi * np.fft.fftfreq(n)).reshape(shape) ** 2
    kmag = np.sqrt(k2).ravel()
    idx = np.searchsorted(edges, kmag, side="right") - 1  # == bucketize(right=True) - 1
    idx = np.clip(idx, 0, len(edges) - 1)
    counts = np.bincount(idx, minlength=len(edges))
    return idx, counts


def binned_spectral_mse(pred, target, n_spatial_dims: int | None = None, edges: np.ndarray | None = None,
                        eps: float = EPS) -> dict[str, jax.Array]:
    """the_well's binned spectral error. (B, T, *spatial, C) x2 -> dict of (B, T, n_bins, C):

    "mse":  sum over modes in the bin of |FFT(pred - target)|^2 / prod(spatial)^2, times
            counts / (counts + 1e-7) (the_well divides the bin mean by counts + 1e-7, then
            multiplies by counts). Summed over all bins (plus the discarded beyond-last-edge bin)
            this is the MSE (Parseval).
    "nmse": mse / (the same quantity for the target alone + eps).
    """
    _check_pair(pred, target)
    pred, target = _f32(pred), _f32(target)
    axes = _spatial_axes(pred, n_spatial_dims)
    spatial = tuple(pred.shape[a] for a in axes)
    idx, counts = wavenumber_bins(spatial, edges)
    n_keep = len(counts) - 1
    onehot = np.zeros((idx.size, n_keep), np.float32)
    keep = idx < n_keep
    onehot[np.nonzero(keep)[0], idx[keep]] = 1.0
    # counts / (counts + 1e-7): the_well's bin mean uses counts + 1e-7 in the denominator.
    scale = (counts[:n_keep] / (counts[:n_keep] + 1e-7)) / float(np.prod(spatial)) ** 2

    def binned_energy(x):
        power = jnp.square(jnp.abs(jnp.fft.fftn(x, axes=axes)))
        power = power.reshape(power.shape[: axes[0] + power.ndim] + (-1, power.shape[-1]))  # (..., P, C)
        return jnp.einsum("...pc,pb->...bc", power, jnp.asarray(onehot, power.dtype)) * jnp.asarray(
            scale[:, None], power.dtype)

    res = binned_energy(pred - target)
    true = binned_energy(target)
    return {"mse": res, "nmse": res / (true + eps)}


# ----------------------------------------------------------------------------------- baseline
def persistence(inputs, n_steps: int) -> np.ndarray:
    """The persistence forecast u(t_last + k) = u(t_last), the baseline every rollout is scored
    against: (B, T_in, *spatial, C) -> (B, n_steps, *spatial, C)."""
    return np.repeat(np.asarray(inputs)[:, -1:], int(n_steps), axis=1)


# ----------------------------------------------------------------------------------- horizons
def window_name(window: tuple[int, int]) -> str:
    a, b = window
    return f"{a}" if a == b else f"{a}-{b}"


def horizon_mean(per_step, window: tuple[int, int], axis: int = 1) -> jax.Array:
    """Mean of a per-step metric over rollout steps window = (first, last), 1-based inclusive.

    per_step: e.g. (B, n_steps, C) from `vrmse`; the step axis is `axis`. -> per_step without `axis`.
    """
    first, last = (int(v) for v in window)
    n = per_step.shape[axis]
    if not 1 <= first <= last:
        raise ValueError(f"horizon window {window} must satisfy 1 <= first <= last (1-based, inclusive)")
    if last > n:
        raise ValueError(f"horizon window {window_name(window)} needs {last} rollout steps but the metric has "
                         f"{n} along axis {axis} (shape {tuple(per_step.shape)})")
    sl = [slice(None)] * per_step.ndim
    sl[axis] = slice(first - 1, last)
    return jnp.mean(jnp.asarray(per_step)[tuple(sl)], axis=axis)


def horizon_windows(per_step, windows: Iterable[tuple[int, int]] = PAPER_WINDOWS, axis: int = 1,
                    skip_incomplete: bool = False) -> dict[str, jax.Array]:
    """{window name: horizon_mean} for each window. With skip_incomplete, windows that need more
    steps than available are left out instead of raising."""
    out = {}
    for w in windows:
        if skip_incomplete and int(w[1]) > per_step.shape[axis]:
            continue
        out[window_name(w)] = horizon_mean(per_step, w, axis)
    return out


# ----------------------------------------------------------------------------------- ensembles
def _check_ensemble(ensemble, target):
    if ensemble.ndim != target.ndim + 1 or tuple(ensemble.shape[1:]) != tuple(target.shape):
        raise ValueError(f"ensemble shape {tuple(ensemble.shape)} must be (E,) + target shape {tuple(target.shape)}: "
                         "members along the first axis, then (B, T, *spatial, C)")
    if ensemble.shape[0] < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {ensemble.shape[0]} (axis 0 of "
                         f"{tuple(ensemble.shape)})")


def crps(ensemble, target, n_spatial_dims: int | None = None, fair: bool = True) -> jax.Array:
    """Continuous ranked probability score, mean over space. (E, B, T, *spatial, C), (B, T, *spatial, C)
    -> (B, T, C). 0 when every member equals the target."""
    _check_ensemble(ensemble, target)
    x, y = _f32(ensemble), _f32(target)
    e = x.shape[0]
    skill = jnp.mean(jnp.abs(x - y[None]), axis=0)
    # sum_{e,e'} |x_e - x_e'| = 2 sum_i (2i - E - 1) x_(i) over the sorted members (i = 1..E): O(E log E)
    weights = (2 * jnp.arange(1, e + 1) - e - 1).astype(x.dtype).reshape((e,) + (1,) * (x.ndim - 1))
    pair_sum = 2 * jnp.sum(weights * jnp.sort(x, axis=0), axis=0)
    spread = pair_sum / (2 * e * (e - 1) if fair else 2 * e * e)
    return jnp.mean(skill - spread, axis=_spatial_axes(y, n_spatial_dims))


def spread_skill(ensemble, target, n_spatial_dims: int | None = None, eps: float = EPS) -> jax.Array:
    """Spread over skill with the finite-ensemble factor (module doc). -> (B, T, C), 1 when calibrated."""
    _check_ensemble(ensemble, target)
    x, y = _f32(ensemble), _f32(target)
    e = x.shape[0]
    axes = _spatial_axes(y, n_spatial_dims)
    spread = jnp.sqrt(jnp.mean(jnp.var(x, axis=0, ddof=1), axis=axes))
    skill = jnp.sqrt(jnp.mean(jnp.square(jnp.mean(x, axis=0) - y), axis=axes))
    return jnp.sqrt((e + 1) / e) * spread / (skill + eps)


def rank_histogram(ensemble, target, n_spatial_dims: int | None = None) -> jax.Array:
    """Frequencies of the target's rank among the members, over space: (B, T, C, E + 1), each row
    summing to 1. A target equal to some members is placed in the middle of them."""
    _check_ensemble(ensemble, target)
    x, y = _f32(ensemble), _f32(target)
    e = x.shape[0]
    below = jnp.sum(x < y[None], axis=0)
    ties = jnp.sum(x == y[None], axis=0)
    rank = below + ties // 2  # (B, T, *spatial, C) in 0..E
    counts = jax.nn.one_hot(rank, e + 1, dtype=jnp.float32)  # (..., *spatial, C, E + 1)
    axes = tuple(a - 1 for a in _spatial_axes(y, n_spatial_dims))
    return jnp.mean(counts, axis=axes)


ENSEMBLE_METRICS = {"crps": crps, "spread_skill": spread_skill}


# ----------------------------------------------------------------------------------- reports
SPATIAL_METRICS = {"mse": mse, "rmse": rmse, "nmse": nmse, "nrmse": nrmse, "vmse": vmse, "vrmse": vrmse}


def compute_all(pred, target, n_spatial_dims: int | None = None, spectral: bool = True) -> dict[str, jax.Array]:
    """Every metric at once. (B, T, *spatial, C) x2 -> {name: (B, T, C)}; the spectral ones are
    split per bin as "spectral_mse_bin{j}" / "spectral_nmse_bin{j}"."""
    out = {name: fn(pred, target, n_spatial_dims) for name, fn in SPATIAL_METRICS.items()}
    if spectral:
        spec = binned_spectral_mse(pred, target, n_spatial_dims)
        for kind in ("mse", "nmse"):
            for j in range(spec[kind].shape[-2]):
                out[f"spectral_{kind}_bin{j}"] = spec[kind][..., j, :]
    return out


def summarize(per_metric: Mapping[str, jax.Array], field_names: Sequence[str],
              windows: Iterable[tuple[int, int]] = PAPER_WINDOWS, valid_fields: Sequence[bool] | None = None) -> dict:
    """JSON-ready report from {metric: (B, n_steps, C)} arrays (e.g. `compute_all` of a rollout).

    For each metric: "per_step" {field: [value per step]} (mean over the batch), "per_step_mean"
    [value per step] (mean over valid fields), and "windows" {window: {field: v, "mean": v,
    "median_over_trajectories": v}} for windows that fit in the rollout. `valid_fields` (C,) drops
    padded fields (False) from the field means, as the_well does.
    """
    report = {}
    for name, arr in per_metric.items():
        a = np.asarray(arr, np.float64)
        if a.ndim != 3:
            raise ValueError(f"summarize expects {name} with shape (B, n_steps, C), got {a.shape}")
        if a.shape[-1] != len(field_names):
            raise ValueError(f"{name} has {a.shape[-1]} channels but {len(field_names)} field names were given")
        valid = np.ones(a.shape[-1], bool) if valid_fields is None else np.asarray(valid_fields, bool)
        per_step = a.mean(axis=0)  # (n_steps, C)
        entry = {
            "per_step": {f: per_step[:, c].tolist() for c, f in enumerate(field_names)},
            "per_step_mean": per_step[:, valid].mean(axis=-1).tolist(),
            "windows": {},
        }
        for w in windows:
            if int(w[1]) > a.shape[1]:
                continue
            hw = np.asarray(horizon_mean(a, w, axis=1))  # (B, C)
            field_mean = hw[:, valid].mean(axis=-1)  # (B,)
            entry["windows"][window_name(w)] = {
                **{f: float(hw[:, c].mean()) for c, f in enumerate(field_names)},
                "mean": float(field_mean.mean()),
                "median_over_trajectories": float(np.median(field_mean)),
            }
        report[name] = entry
    return report
