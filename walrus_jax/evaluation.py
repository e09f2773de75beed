"""Evaluation during and after training: autoregressive rollouts on held-out trajectories.

For each dataset, the first `eval.n_trajectories` trajectories of the held-out split are rolled out
from their first T_in frames (at the training's smallest time stride) for up to
`eval.rollout_steps` steps with `walrus_jax.rollouts.rollout` (deterministic: no jitter), and
scored against the truth with the_well's VRMSE and NRMSE (`walrus_jax.metrics`), per field and
averaged over horizon windows (1-10, 11-30 by default, 1-based inclusive). The persistence
baseline u(t+k) = u(t) (the last input frame repeated) is scored the same way.

Headline numbers (`vrmse_1_10`, `persistence_vrmse_1_10`, ...) are the mean over real (not
padded) fields, then over trajectories, then over datasets.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from walrus_jax import metrics as metrics_lib
from walrus_jax import rollouts as rollout_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalSet:
    """Held-out trajectories of one dataset, stacked (all share one shape).

    inputs (N, T_in, *sp, C_var); truth (N, H, *sp, C_var); constants (N, *sp, C_con);
    bcs ((lo, hi),) * n_dims; field_indices (C_var + C_con,); padded_field_mask (C_var,).
    """

    name: str
    inputs: np.ndarray
    truth: np.ndarray
    constants: np.ndarray
    bcs: tuple
    field_indices: np.ndarray
    padded_field_mask: np.ndarray
    field_names: list[str]


def load_eval_sets(paths: Sequence[str], *, n_steps_input: int, n_trajectories: int, rollout_steps: int,
                   stride: int = 1, split: str = "valid", vocab=None, allow_new_fields: bool = True) -> list[EvalSet]:
    """Reads held-out trajectories of each dataset directory in `paths` (Well layout)."""
    from walrus_jax.data import WellDataset

    sets = []
    for path in paths:
        ds = WellDataset(path, n_steps_input=n_steps_input, n_steps_output=1, split=split, vocab=vocab,
                         allow_new_fields=allow_new_fields)
        n = min(int(n_trajectories), ds.n_trajectories)
        if n == 0:
            raise ValueError(f"evaluation: dataset {path} has no trajectories in split {split!r}")
        trajs = [ds.trajectory(j) for j in range(n)]
        frames = [t["fields"][::stride] for t in trajs]
        avail = min(f.shape[0] for f in frames) - n_steps_input
        if avail < 1:
            raise ValueError(f"evaluation: trajectories of {path} ({split}) have {min(f.shape[0] for f in frames)} "
                             f"frames at stride {stride}, fewer than n_steps_input + 1 = {n_steps_input + 1}")
        h = min(int(rollout_steps), avail)
        t0 = trajs[0]
        names = [str(s) for s in t0["field_names"]]
        c_var = frames[0].shape[-1]
        sets.append(EvalSet(
            name=str(t0.get("dataset_name", os.path.basename(os.path.normpath(path)))),
            inputs=np.stack([f[:n_steps_input] for f in frames]).astype(np.float32),
            truth=np.stack([f[n_steps_input:n_steps_input + h] for f in frames]).astype(np.float32),
            constants=np.stack([t["constant_fields"] for t in trajs]).astype(np.float32),
            bcs=tuple(tuple(int(v) for v in row) for row in np.asarray(t0["boundary_conditions"])),
            field_indices=np.asarray(t0["field_indices"], np.int32),
            padded_field_mask=np.asarray(t0["padded_field_mask"], bool),
            field_names=names[:c_var]))
    return sets


def _field_mean(per_field: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(..., C) -> (...) mean over real fields."""
    return per_field[..., valid].mean(axis=-1)


def evaluate(model, sets: Sequence[EvalSet], *, windows=((1, 10), (11, 30)), batch_size: int = 4) -> dict[str, Any]:
    """Rolls `model` out on every set; returns a JSON-ready report (module docstring).

    Per dataset: {"n_trajectories", "n_steps", "fields", and for metric in (vrmse, nrmse) and
    baseline in ("", "persistence_"): f"{baseline}{metric}_per_step" (mean over trajectories and
    real fields, one per step), f"{baseline}{metric}_{a}_{b}" {field: value, "mean": value}}.
    Top level: f"{baseline}{metric}_{a}_{b}" means over datasets (None when no set has that many
    steps), plus "datasets" and the arrays kept for plotting under "_arrays" (not JSON).
    """
    report: dict[str, Any] = {"datasets": {}}
    arrays = {}
    for s in sets:
        preds = []
        for a in range(0, s.inputs.shape[0], batch_size):
            b = min(a + batch_size, s.inputs.shape[0])
            p = rollout_lib.rollout(model, s.inputs[a:b], field_indices=s.field_indices, bcs=s.bcs,
                                    n_steps=s.truth.shape[1], constant_fields=s.constants[a:b],
                                    padded_field_mask=s.padded_field_mask, jitter=None)
            preds.append(np.asarray(p))
        pred = np.concatenate(preds)
        persist = np.repeat(s.inputs[:, -1:], s.truth.shape[1], axis=1)
        entry: dict[str, Any] = {"n_trajectories": int(pred.shape[0]), "n_steps": int(pred.shape[1]),
                                 "fields": s.field_names}
        valid = s.padded_field_mask
        for prefix, guess in (("", pred), ("persistence_", persist)):
            for mname in ("vrmse", "nrmse"):
                per = np.asarray(getattr(metrics_lib, mname)(jnp.asarray(guess), jnp.asarray(s.truth)), np.float64)
                entry[f"{prefix}{mname}_per_step"] = _field_mean(per, valid).mean(axis=0).tolist()
                for w in windows:
                    if w[1] > per.shape[1]:
                        continue
                    hw = np.asarray(metrics_lib.horizon_mean(per, w, axis=1))  # (N, C)
                    entry[f"{prefix}{mname}_{w[0]}_{w[1]}"] = {
                        **{f: float(hw[:, c].mean()) for c, f in enumerate(s.field_names)},
                        "mean": float(_field_mean(hw, valid).mean()),
                        "median_over_trajectories": float(np.median(_field_mean(hw, valid)))}
        report["datasets"][s.name] = entry
        arrays[s.name] = (pred, s.truth, s.inputs)
    for prefix in ("", "persistence_"):
        for mname in ("vrmse", "nrmse"):
            for w in windows:
                key = f"{prefix}{mname}_{w[0]}_{w[1]}"
                vals = [e[key]["mean"] for e in report["datasets"].values() if key in e]
                report[key] = float(np.mean(vals)) if vals else None
    report["_arrays"] = arrays
    return report


def strip_arrays(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def plot_rollout(report: dict, sets: Sequence[EvalSet], path: str, steps: Sequence[int] | None = None) -> str | None:
    """PNG of prediction vs truth (and their difference) for the first trajectory of the first set,
    first real field, at a few rollout steps. 3D data is shown through its middle D slice."""
    if not sets:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = sets[0]
    pred, truth, _ = report["_arrays"][s.name]
    c = int(np.flatnonzero(s.padded_field_mask)[0]) if s.padded_field_mask.any() else 0
    n = pred.shape[1]
    steps = sorted({1, max(1, n // 2), n} if steps is None else {int(k) for k in steps if 1 <= k <= n})

    def img(a):  # (*sp) -> 2D
        return a if a.ndim == 2 else a[..., a.shape[-1] // 2]

    fig, axes = plt.subplots(3, len(steps), figsize=(3.2 * len(steps), 8.5), squeeze=False)
    for j, k in enumerate(steps):
        t, p = img(truth[0, k - 1, ..., c]), img(pred[0, k - 1, ..., c])
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        for i, (a, title) in enumerate(((t, "truth"), (p, "prediction"), (p - t, "prediction - truth"))):
            ax = axes[i, j]
            im = ax.imshow(a.T, origin="lower", cmap="RdBu_r" if i == 2 else "viridis",
                           vmin=None if i == 2 else lo, vmax=None if i == 2 else hi)
            ax.set_title(f"{title}, step {k}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{s.name}: {s.field_names[c]} (trajectory 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
