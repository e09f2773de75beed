"""The rollout job: a checkpoint rolled out on Well trajectories, predictions and metrics written out.

    python -m walrus_jax.main --config configs/rollout.py --config.checkpoint=DIR \
        --config.data=FILE_OR_DIR --workdir OUT

`run_rollout_job(config, workdir)` (what main.py's rollout mode calls) loads the checkpoint (a
converted release or a training workdir, via `walrus_jax.checkpoints.load`), reads full
trajectories from Well files with the checkpoint's field vocabulary, rolls each one out from its
first `n_input_steps` frames (walrus_jax.inference.rollouts: one compiled lax.scan per chunk) and writes
  predictions/<dataset>/traj_<j>.hdf5   Well layout: the input history, then the predicted frames
                                        (attribute walrus_n_input_steps); readable by WellDataset
  metrics.json                          VRMSE / NRMSE / MSE / spectral errors per field, per step and
                                        over horizon windows, plus the persistence baseline
  plots/                                per-field truth | prediction | error panels (PNG), an
                                        animation (GIF or MP4) and VRMSE vs step (PNG)
metrics.json is strict JSON (a non-finite value is written as null). A rollout that produces
NaN/Inf stops at the chunk where it happens: with config.on_nonfinite="error" (default) the job
fails naming the trajectory, step and field and writes nothing for it; with "truncate" every
trajectory is kept up to the step before the first non-finite one and metrics.json records where
it stopped (`nonfinite`). Horizon windows longer than the rollout are listed in `windows_skipped`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from typing import Mapping, Sequence

import jax
import numpy as np

from walrus_jax import normalization
from walrus_jax.checkpoints.load import field_vocabulary, load_model
from walrus_jax.errors import ConfigError, DataError, PathError
from walrus_jax.inference import metrics, rollouts
from walrus_jax.jsonio import write_json
from walrus_jax.models.config import BC_NAMES

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ Well output
def _tensor_fields(names: Sequence[str], orders: Sequence[int], n_dims: int):
    """Flattened channels -> [(core name, order, [channel indices])] in channel order."""
    out, c = [], 0
    while c < len(names):
        order = int(orders[c])
        n = n_dims ** order
        chans = list(range(c, c + n))
        core = names[c] if order == 0 else re.sub(r"_[^_]+$", "", names[c])
        out.append((core, order, chans))
        c += n
    return out


def write_well_predictions(path: str, *, dataset_name: str, frames: np.ndarray, time_grid: np.ndarray,
                           spatial_dims: Sequence[str], space_grid: np.ndarray | None, field_names: Sequence[str],
                           field_orders: Sequence[int], constant_fields: np.ndarray | None,
                           constant_names: Sequence[str], constant_orders: Sequence[int], bcs: np.ndarray,
                           n_input_steps: int, extra_attrs: Mapping | None = None) -> str:
    """One trajectory in Well layout. frames (T, *spatial, C_var) = input history then predictions."""
    from walrus_jax.data.writer import WellField, axis_boundaries, write_well_file

    n_dims = len(spatial_dims)
    shape = frames.shape[1:-1]
    groups: dict[int, dict] = {0: {}, 1: {}, 2: {}}
    for core, order, chans in _tensor_fields(field_names, field_orders, n_dims):
        data = frames[..., chans].reshape(frames.shape[:-1] + (n_dims,) * order)
        groups[order][core] = WellField(data[None].astype(np.float32), time_varying=True, sample_varying=True)
    if constant_fields is not None and constant_fields.shape[-1]:
        for core, order, chans in _tensor_fields(constant_names, constant_orders, n_dims):
            data = constant_fields[..., chans].reshape(constant_fields.shape[:-1] + (n_dims,) * order)
            groups[order][core] = WellField(data[None].astype(np.float32), time_varying=False, sample_varying=True)
    coords = {}
    for a, d in enumerate(spatial_dims):
        if space_grid is not None and space_grid.shape[:-1] == tuple(shape):
            idx = [0] * n_dims
            idx[a] = slice(None)
            coords[d] = np.asarray(space_grid[tuple(idx) + (a,)], np.float32)
        else:
            coords[d] = np.arange(shape[a], dtype=np.float32)
    boundaries = {}
    for a, d in enumerate(spatial_dims):
        lo, hi = (BC_NAMES[int(v)] for v in bcs[a])
        boundaries.update(axis_boundaries(d, shape[a], lo, hi))
    attrs = {"walrus_n_input_steps": int(n_input_steps), **(extra_attrs or {})}
    return write_well_file(path, dataset_name=dataset_name, n_trajectories=1, time=np.asarray(time_grid, np.float32),
                           coords=coords, t0_fields=groups[0], t1_fields=groups[1], t2_fields=groups[2],
                           boundaries=boundaries, extra_attrs=attrs)


# ------------------------------------------------------------------------------------ the job
def _parse_transforms(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in str(spec).split(","))):
        if ":" not in item:
            raise ConfigError(f"config field_transforms entry {item!r}: expected 'field:transform' "
                              "(e.g. 'density:log10')")
        k, v = item.split(":", 1)
        out[k.strip()] = v.strip()
    return out


def _open_dataset(config, vocab):
    from walrus_jax.data.well import WellDataset

    try:
        return WellDataset(config.data, n_steps_input=1, n_steps_output=0, split=config.split or None, vocab=vocab,
                           allow_new_fields=False, field_transforms=_parse_transforms(config.field_transforms))
    except KeyError as e:
        msg = e.args[0] if e.args else str(e)
        raise DataError(f"the data and the checkpoint {config.checkpoint} have different field vocabularies: {msg}. "
                        "A checkpoint predicts only fields it was trained on (fine-tune it to add fields)") from None


def _load_checkpoint(config):
    """(model, field vocabulary, source) of config.checkpoint (+ config.adapters), with errors that
    name config.checkpoint."""
    path = str(config.checkpoint)
    if not os.path.exists(path):
        raise PathError(f"config.checkpoint={path!r} does not exist (expected a converted checkpoint directory from "
                        "tools.convert_torch_ckpt or a walrus_jax training workdir)")
    if not os.path.isdir(path):
        raise PathError(f"config.checkpoint={path!r} is a file, not a directory (a PyTorch .pt checkpoint must be "
                        "converted first with `python -m tools.convert_torch_ckpt`)")
    model = load_model(path, adapters=str(config.adapters) if config.get("adapters") else None, dtype=config.dtype,
                       what="config.checkpoint")
    return model, field_vocabulary(model), model.source


@dataclasses.dataclass
class Plan:
    """What the job rolls out: trajectories `ids` from frame `start`, `t_in` frames of history, `n_steps`
    predicted steps, and the channel layout of the data (variable fields, then constant fields)."""
    ids: list[int]
    start: int
    t_in: int
    n_steps: int
    first: dict  # the first trajectory (its field names, indices, masks, boundary conditions)
    var_names: list[str]
    con_names: list[str]
    orders: list[int]


def _check_config(config) -> None:
    for key in ("checkpoint", "data"):
        if not config.get(key):
            raise ConfigError(f"config.{key} is required (--config.{key}=...)")
    if str(config.get("on_nonfinite", "error")) not in ("error", "truncate"):
        raise ConfigError(f"config.on_nonfinite={config.on_nonfinite!r}: expected 'error' or 'truncate'")
    if config.plot and config.animation and str(config.animation).lower() not in ("gif", "mp4"):
        raise ConfigError(f"config.animation={config.animation!r}: expected 'gif', 'mp4' or ''")
    ens = config.get("ensemble")
    if ens is not None and int(ens.members):
        if int(ens.members) < 2:
            raise ConfigError(f"config.ensemble.members={ens.members}: an ensemble needs at least 2 (0: none)")
        if not float(ens.perturbation) >= 0:
            raise ConfigError(f"config.ensemble.perturbation={ens.perturbation}: expected >= 0 (a fraction of the RMS)")
        if not ens.jitter and float(ens.perturbation) == 0:
            raise ConfigError("config.ensemble: with jitter=False the members need perturbation > 0, or they are "
                              "all the same")


def _members(config) -> int:
    ens = config.get("ensemble")
    return 0 if ens is None else int(ens.members)


def _plan(config, ds) -> Plan:
    t_in = int(config.n_input_steps)
    ids = [int(j) for j in config.trajectories] or list(range(min(int(config.max_trajectories), ds.n_trajectories)))
    for j in ids:
        if not 0 <= j < ds.n_trajectories:
            raise ConfigError(f"config.trajectories: {j} out of range; {config.data} has {ds.n_trajectories} trajectories")
    first = ds.trajectory(ids[0])
    n_total = first["fields"].shape[0]
    start = int(config.start_index)
    available = n_total - start - t_in
    if available < 1:
        raise DataError(f"{config.data}: trajectories have {n_total} frames; a rollout from frame {start} with a "
                        f"history of n_input_steps={t_in} needs at least {start + t_in + 1}")
    names = list(first["field_names"])
    n_var = first["fields"].shape[-1]
    return Plan(ids, start, t_in, int(min(available, int(config.max_rollout_steps))), first, names[:n_var],
                names[n_var:], [int(o) for o in first["field_tensor_orders"]])


@dataclasses.dataclass
class Group:
    """One batch of trajectories rolled out together. Arrays (B, T, *spatial, C_var)."""
    ids: list[int]
    trajectories: list[dict]
    constants: np.ndarray | None  # (B, *spatial, C_con)
    inputs: np.ndarray
    truth: np.ndarray
    predictions: np.ndarray
    persistence: np.ndarray
    seconds: float
    nonfinite: dict | None = None  # where a truncated rollout met its first NaN/Inf
    n_ok: int | None = None  # steps kept when truncated
    members: np.ndarray | None = None  # (E, B, n_steps, *spatial, C_var) of an ensemble; predictions is their mean


def _roll_group(config, model, ds, plan: Plan, g: int, norm_stats, key) -> Group:
    """Rolls out trajectories plan.ids[g : g + batch_size]. A NaN/Inf prediction fails the job
    (config.on_nonfinite="error") or truncates the group's rollout before it ("truncate")."""
    ids = plan.ids[g:g + max(1, int(config.batch_size))]
    trajs = [plan.first if j == plan.ids[0] else ds.trajectory(j) for j in ids]
    first, start, t_in, n_steps = plan.first, plan.start, plan.t_in, plan.n_steps
    fields = np.stack([t["fields"] for t in trajs])  # (B, T_total, *spatial, C_var)
    consts = np.stack([t["constant_fields"] for t in trajs])
    consts = consts if consts.shape[-1] else None
    inputs = fields[:, start:start + t_in]
    truth = fields[:, start + t_in:start + t_in + n_steps]
    mask = normalization.mask_from_constants(consts, [str(n) for n in plan.con_names]) if consts is not None else None
    t0 = time.time()
    nonfinite, n_ok = None, None
    common = dict(field_indices=first["field_indices"], bcs=first["boundary_conditions"], n_steps=n_steps,
                  constant_fields=consts, padded_field_mask=first["padded_field_mask"], mask=mask,
                  eps=float(config.eps), chunk_size=int(config.chunk_size), min_input_steps=t_in,
                  on_nonfinite="raise", normalization_stats=norm_stats)
    members = _members(config)
    try:
        if members:
            keys = jax.random.split(jax.random.fold_in(jax.random.key(int(config.seed)), g), members)
            preds = rollouts.rollout_ensemble(model, inputs, keys, jitter=bool(config.ensemble.jitter),
                                              perturbation=float(config.ensemble.perturbation), **common)
        else:
            preds = rollouts.rollout(model, inputs, jitter=None if key is None else jax.random.fold_in(key, g),
                                     **common)
    except rollouts.NonFiniteRolloutError as e:  # stopped after the chunk holding the first NaN/Inf
        sample = e.sample[-1] if members else e.sample  # an ensemble's is (member, sample)
        where = {"trajectory": int(ids[sample]), "step": int(e.step) + 1, "field": str(plan.var_names[e.channel])}
        text = (f"the rollout of {config.checkpoint} on {config.data} diverged: trajectory {where['trajectory']}, "
                f"field {where['field']!r} is NaN/Inf at prediction step {where['step']} of {n_steps}")
        if str(config.get("on_nonfinite", "error")) == "error" or e.step == 0:
            raise rollouts.NonFiniteRolloutError(
                f"{text}; nothing was written for it. Check the data's units and config.field_transforms, or "
                "set --config.on_nonfinite=truncate to keep the steps before it", step=e.step,
                sample=where["trajectory"], channel=e.channel) from None
        log.warning("%s: keeping the %d steps before it (config.on_nonfinite=truncate)", text, e.step)
        preds, nonfinite, n_ok = e.predictions, where, int(e.step)
    seconds = time.time() - t0
    if mask is not None:  # the original compares against a reference zeroed on the mask too
        truth = np.where(mask[:, None, ..., None], 0.0, truth)
    preds = np.asarray(preds)
    ensemble = preds if members else None
    if members:
        preds = preds.mean(axis=0)
    return Group(ids, trajs, consts, inputs, truth, preds, metrics.persistence(inputs, n_steps), seconds,
                 nonfinite, n_ok, ensemble)


def _write_predictions(config, ds, plan: Plan, groups: Sequence[Group], n_steps: int, pred_dir: str) -> None:
    """predictions/<dataset>/traj_<j>.hdf5 for every trajectory: its history, then n_steps predictions."""
    first, start, t_in = plan.first, plan.start, plan.t_in
    n_var = len(plan.var_names)
    for grp in groups:
        for b, j in enumerate(grp.ids):
            traj = grp.trajectories[b]
            write_well_predictions(
                os.path.join(pred_dir, f"traj_{j}.hdf5"), dataset_name=ds.dataset_name,
                frames=np.concatenate([grp.inputs[b], grp.predictions[b, :n_steps]]),
                time_grid=np.asarray(traj["time_grid"])[start:start + t_in + n_steps],
                spatial_dims=list(ds.metadata.spatial_dims), space_grid=traj.get("space_grid"),
                field_names=plan.var_names, field_orders=plan.orders[:n_var],
                constant_fields=None if grp.constants is None else grp.constants[b], constant_names=plan.con_names,
                constant_orders=plan.orders[n_var:], bcs=np.asarray(first["boundary_conditions"]), n_input_steps=t_in,
                extra_attrs={"walrus_source_trajectory": int(j), "walrus_checkpoint": str(config.checkpoint)})


def _plots(config, report: dict, truth: np.ndarray, preds: np.ndarray, dataset: str, workdir: str) -> dict:
    """Panels of the first trajectory at config.plot_steps, VRMSE vs step, and an optional animation."""
    from walrus_jax.inference import plotting

    pdir = os.path.join(workdir, "plots")
    names, valid, n_steps, j = report["field_names"], report["padded_field_mask"], report["n_steps"], report["trajectories"][0]
    steps = sorted({min(max(int(s), 1), n_steps) - 1 for s in config.plot_steps})
    vrmse = report["metrics"]["vrmse"]
    out = {
        "panels": plotting.field_panels(truth[0], preds[0], names, steps,
                                        os.path.join(pdir, f"{dataset}_traj{j}_panels.png"),
                                        title=f"{dataset} trajectory {j}"),
        "vrmse": plotting.metric_vs_step(
            {**{f: vrmse["per_step"][f] for f, ok in zip(names, valid) if ok},
             "mean": vrmse["per_step_mean"],
             "persistence (mean)": report["persistence"]["vrmse"]["per_step_mean"]},
            os.path.join(pdir, f"{dataset}_vrmse.png"), title=f"{dataset}: VRMSE vs step"),
    }
    if config.animation:
        ext = str(config.animation).lower()
        out["animation"] = plotting.animate(truth[0], preds[0], names, os.path.join(pdir, f"{dataset}_traj{j}.{ext}"))
    return out


def _ensemble_report(config, ens: np.ndarray, truth: np.ndarray, names, windows, valid) -> dict:
    """CRPS and spread-skill like the other metrics (per step, per window, per field) and the rank
    histogram's frequencies per window and field (E + 1 bins, flat when calibrated)."""
    per = {name: np.asarray(fn(ens, truth)) for name, fn in metrics.ENSEMBLE_METRICS.items()}
    ranks = np.asarray(metrics.rank_histogram(ens, truth))  # (B, n_steps, C, E + 1)
    hist = {}
    for w in windows:
        if int(w[1]) <= ranks.shape[1]:
            freq = np.asarray(metrics.horizon_mean(ranks, w, axis=1)).mean(axis=0)  # (C, E + 1)
            hist[metrics.window_name(w)] = {f: freq[c].tolist() for c, f in enumerate(names)}
    return {"members": int(ens.shape[0]), "jitter": bool(config.ensemble.jitter),
            "perturbation": float(config.ensemble.perturbation),
            "metrics": metrics.summarize(per, names, windows, valid), "rank_histogram": hist}


def run_rollout_job(config, workdir: str) -> dict:
    """Rolls out `config.checkpoint` on `config.data` (configs/rollout.py) and writes everything under workdir."""
    _check_config(config)
    t_start = time.time()
    model, vocab, source = _load_checkpoint(config)
    os.makedirs(workdir, exist_ok=True)
    ds = _open_dataset(config, vocab)
    plan = _plan(config, ds)
    log.info("rollout: %s (%s) on %s: %d trajectories x %d steps, T_in=%d, dtype=%s", config.checkpoint, source,
             ds.dataset_name, len(plan.ids), plan.n_steps, plan.t_in, config.dtype)
    norm_stats = None
    if config.normalization_stats:  # a model fine-tuned with the dataset's global statistics
        from walrus_jax.data.stats import load_stats

        norm_stats = load_stats(config.normalization_stats, [str(n) for n in plan.first["field_names"]],
                                padded_field_mask=plan.first["padded_field_mask"])
    key = jax.random.key(int(config.seed)) if config.jitter else None
    groups = [_roll_group(config, model, ds, plan, g, norm_stats, key)
              for g in range(0, len(plan.ids), max(1, int(config.batch_size)))]
    # After a truncation every trajectory keeps the same steps: those before the first NaN/Inf.
    cut = [grp for grp in groups if grp.n_ok is not None and grp.n_ok < plan.n_steps]
    first_cut = min(cut, key=lambda grp: grp.n_ok) if cut else None
    n_steps = plan.n_steps if first_cut is None else first_cut.n_ok
    preds = np.concatenate([grp.predictions for grp in groups])[:, :n_steps]
    truth = np.concatenate([grp.truth for grp in groups])[:, :n_steps]
    persist = np.concatenate([grp.persistence for grp in groups])[:, :n_steps]
    if config.write_predictions:
        _write_predictions(config, ds, plan, groups, n_steps, os.path.join(workdir, "predictions", ds.dataset_name))
    valid = list(np.asarray(plan.first["padded_field_mask"], bool))
    windows = tuple(tuple(int(v) for v in w) for w in config.windows)
    skipped = {metrics.window_name(w): f"needs {w[1]} steps, the rollout has {n_steps}" for w in windows if w[1] > n_steps}
    if skipped:
        log.warning("metrics windows %s skipped: longer than the rollout's %d steps", sorted(skipped), n_steps)
    per = {k: np.asarray(v) for k, v in metrics.compute_all(preds, truth).items()}
    base = {k: np.asarray(v) for k, v in metrics.compute_all(persist, truth, spectral=False).items()}
    report = {
        "checkpoint": str(config.checkpoint), "checkpoint_source": source, "data": str(config.data),
        "dataset": ds.dataset_name, "trajectories": plan.ids, "n_input_steps": plan.t_in, "n_steps": n_steps,
        "n_steps_requested": plan.n_steps, "nonfinite": None if first_cut is None else first_cut.nonfinite,
        "windows_skipped": skipped, "field_names": plan.var_names, "padded_field_mask": [bool(v) for v in valid],
        "dtype": config.dtype, "jitter": bool(config.jitter), "seed": int(config.seed),
        "metrics": metrics.summarize(per, plan.var_names, windows, valid),
        "persistence": metrics.summarize({k: base[k] for k in ("vrmse", "nrmse", "mse")}, plan.var_names, windows,
                                         valid),
        "per_trajectory_vrmse": {str(j): np.asarray(per["vrmse"][i]).tolist() for i, j in enumerate(plan.ids)},
        "rollout_seconds": [grp.seconds for grp in groups], "wall_seconds": time.time() - t_start,
    }
    if _members(config):
        ens = np.concatenate([grp.members for grp in groups], axis=1)[:, :, :n_steps]
        report["prediction"] = "ensemble mean"
        report["ensemble"] = _ensemble_report(config, ens, truth, plan.var_names, windows, valid)
    if config.plot:
        report["plots"] = _plots(config, report, truth, preds, ds.dataset_name, workdir)
    write_json(os.path.join(workdir, "metrics.json"), report)
    log.info("rollout done: VRMSE per window %s", {w: v["mean"] for w, v in report["metrics"]["vrmse"]["windows"].items()})
    return report
