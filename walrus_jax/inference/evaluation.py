"""Validation: autoregressive rollouts on held-out trajectories, as the original validates.

Data is read the way training reads it (`walrus_jax.data.pipeline.make_eval_datasets`): 2D data
inflated to 3D when `data.inflate_to_3d` (the release: on; it changes WALL/OPEN outputs by ~2%), the
released per-dataset field transforms, and the released datasets' step downsampling (the 3D ones
roll out from half the history). For each dataset, `eval.n_trajectories` trajectories of the
held-out split, in an order shuffled by the seed, are rolled out from their first T_in frames (at
the training's smallest time stride) for up to `eval.rollout_steps` steps with
`walrus_jax.inference.rollouts.rollout` — with patch jitter when `eval.jitter` (the release's model applies it
in eval mode too; one key per dataset, derived from the seed) — and scored against the truth with
the_well's VRMSE (eps 1e-7), NRMSE and MAE (`walrus_jax.inference.metrics`), per field and averaged over
horizon windows (1-based, inclusive; the paper's 1-20 and 21-60, downstream 1-10 and 11-30). The
persistence baseline u(t+k) = u(t) is scored the same way. A constant field named "mask" marks
points forced to 0 in every prediction, as in training.

Headline numbers (`vrmse_1_10`, `persistence_vrmse_1_10`, ...) are the mean over real (not
padded) fields, then over trajectories, then over datasets; each window also reports the median
over trajectories (the paper's statistic).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from walrus_jax.normalization import mask_from_constants
from walrus_jax.inference import metrics as metrics_lib
from walrus_jax.inference import rollouts as rollout_lib

log = logging.getLogger(__name__)

EVAL_METRICS = ("vrmse", "nrmse", "mae")


@dataclasses.dataclass
class EvalSet:
    """Held-out trajectories of one dataset, stacked (all share one shape).

    inputs (N, T_in, *sp, C_var); truth (N, H, *sp, C_var); constants (N, *sp, C_con);
    bcs ((lo, hi),) * n_dims; field_indices (C_var + C_con,); padded_field_mask (C_var,);
    mask (N, *sp) bool or None: points forced to 0 (a constant field named "mask");
    trajectories: the trajectory index of each row in the dataset's split.
    """

    name: str
    inputs: np.ndarray
    truth: np.ndarray
    constants: np.ndarray
    bcs: tuple
    field_indices: np.ndarray
    padded_field_mask: np.ndarray
    field_names: list[str]
    mask: np.ndarray | None = None
    trajectories: tuple = ()
    stats: dict | None = None  # the dataset's global {"rms", "rms_delta"} (C,) (data.normalization='global')


def load_eval_sets(paths: Sequence[str], *, n_steps_input: int, n_trajectories: int, rollout_steps: int,
                   stride: int = 1, split: str = "valid", vocab=None, allow_new_fields: bool = True,
                   inflate_to_3d: bool = False, use_released_options: bool = True, seed: int = 0,
                   normalization: str = "sample") -> list[EvalSet]:
    """Reads held-out trajectories of each dataset directory in `paths` (module docstring).

    n_steps_input is the 2D history; a dataset's released step downsampling scales it (3D: half).
    Trajectories are taken in the order of a permutation seeded by (seed, dataset position).
    normalization 'global': rollouts normalize by the dataset's stats.yaml, as the model was trained.
    """
    from walrus_jax.data import pipeline

    dss, _ = pipeline.make_eval_datasets(paths, n_steps_input=n_steps_input, split=split,
                                         inflate_to_3d=inflate_to_3d, vocab=vocab, allow_new_fields=allow_new_fields,
                                         use_released_options=use_released_options)
    sets = []
    for i, (path, ds) in enumerate(zip(paths, dss)):
        n = min(int(n_trajectories), ds.n_trajectories)
        if n == 0:
            raise ValueError(f"evaluation: dataset {path} has no trajectories in split {split!r}")
        t_in = ds.n_steps_input
        order = np.random.default_rng([int(seed), i]).permutation(ds.n_trajectories)[:n]
        trajs = [ds.trajectory(int(j)) for j in order]
        frames = [t["fields"][::stride] for t in trajs]
        avail = min(f.shape[0] for f in frames) - t_in
        if avail < 1:
            raise ValueError(f"evaluation: trajectories of {path} ({split}) have {min(f.shape[0] for f in frames)} "
                             f"frames at stride {stride}, fewer than n_steps_input + 1 = {t_in + 1}")
        h = min(int(rollout_steps), avail)
        t0 = trajs[0]
        names = [str(s) for s in t0["field_names"]]
        c_var = frames[0].shape[-1]
        constants = np.stack([t["constant_fields"] for t in trajs]).astype(np.float32)
        mask = mask_from_constants(constants, names[c_var:]) if constants.shape[-1] else None
        sets.append(EvalSet(
            name=str(t0.get("dataset_name", os.path.basename(os.path.normpath(path)))),
            inputs=np.stack([f[:t_in] for f in frames]).astype(np.float32),
            truth=np.stack([f[t_in:t_in + h] for f in frames]).astype(np.float32),
            constants=constants,
            bcs=tuple(tuple(int(v) for v in row) for row in np.asarray(t0["boundary_conditions"])),
            field_indices=np.asarray(t0["field_indices"], np.int32),
            padded_field_mask=np.asarray(t0["padded_field_mask"], bool),
            field_names=names[:c_var], mask=mask, trajectories=tuple(int(j) for j in order),
            stats=None if normalization != "global" else pipeline.dataset_norm_stats([path], [ds])[0]))
    return sets


def evaluate(model, sets: Sequence[EvalSet], *, windows=((1, 10), (11, 30)), batch_size: int = 4,
             jitter: jax.Array | None = None) -> dict[str, Any]:
    """Rolls `model` out on every set; returns a JSON-ready report (module docstring).

    jitter: None (deterministic) or a PRNG key: set i rolls out with fold_in(jitter, i), every
    step drawing its own patch / token shifts (the original validates with jitter on).
    Per dataset: {"n_trajectories", "n_steps", "fields", "trajectories", and for metric in
    (vrmse, nrmse, mae) and baseline in ("", "persistence_"): f"{baseline}{metric}_per_step" (mean
    over trajectories and real fields, one per step), f"{baseline}{metric}_{a}_{b}" {field: value,
    "mean": value, "median_over_trajectories": value}}.
    Top level: f"{baseline}{metric}_{a}_{b}" means over datasets (None when no set has that many
    steps), plus "datasets" and the arrays kept for plotting under "_arrays" (not JSON).
    """
    report: dict[str, Any] = {"datasets": {}}
    arrays = {}
    use_jitter = jitter is not None and model.cfg.jitter_patches
    for i, s in enumerate(sets):
        preds = []
        key = jax.random.fold_in(jitter, i) if use_jitter else None
        for a in range(0, s.inputs.shape[0], batch_size):
            b = min(a + batch_size, s.inputs.shape[0])
            p = rollout_lib.rollout(model, s.inputs[a:b], field_indices=s.field_indices, bcs=s.bcs,
                                    n_steps=s.truth.shape[1], constant_fields=s.constants[a:b],
                                    padded_field_mask=s.padded_field_mask,
                                    mask=None if s.mask is None else s.mask[a:b],
                                    jitter=None if key is None else jax.random.fold_in(key, a),
                                    normalization_stats=s.stats)
            preds.append(np.asarray(p))
        pred = np.concatenate(preds)
        persist = metrics_lib.persistence(s.inputs, s.truth.shape[1])
        entry: dict[str, Any] = {"n_trajectories": int(pred.shape[0]), "n_steps": int(pred.shape[1]),
                                 "fields": s.field_names, "trajectories": list(s.trajectories)}
        for prefix, guess in (("", pred), ("persistence_", persist)):
            per = {m: np.asarray(getattr(metrics_lib, m)(jnp.asarray(guess), jnp.asarray(s.truth)), np.float64)
                   for m in EVAL_METRICS}
            summary = metrics_lib.summarize(per, s.field_names, windows, s.padded_field_mask)
            for m in EVAL_METRICS:  # the metrics report's entries under flat keys
                entry[f"{prefix}{m}_per_step"] = summary[m]["per_step_mean"]
                for w in windows:
                    if metrics_lib.window_name(w) in summary[m]["windows"]:
                        entry[f"{prefix}{m}_{w[0]}_{w[1]}"] = summary[m]["windows"][metrics_lib.window_name(w)]
        report["datasets"][s.name] = entry
        arrays[s.name] = (pred, s.truth, s.inputs)
    for prefix in ("", "persistence_"):
        for mname in EVAL_METRICS:
            for w in windows:
                key = f"{prefix}{mname}_{w[0]}_{w[1]}"
                vals = [e[key]["mean"] for e in report["datasets"].values() if key in e]
                report[key] = float(np.mean(vals)) if vals else None
    report["_arrays"] = arrays
    return report


def strip_arrays(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def plot_rollout(report: dict, sets: Sequence[EvalSet], path: str, steps: Sequence[int] | None = None) -> str | None:
    """PNG of truth, prediction and their difference for the first trajectory of the first set,
    first real field, at a few 1-based rollout steps (default: first, middle, last); 3D data is
    shown through its middle D slice (`plotting.field_panels`)."""
    if not sets:
        return None
    from walrus_jax.inference import plotting

    s = sets[0]
    pred, truth, _ = report["_arrays"][s.name]
    c = int(np.flatnonzero(s.padded_field_mask)[0]) if s.padded_field_mask.any() else 0
    n = pred.shape[1]
    steps = sorted({1, max(1, n // 2), n} if steps is None else {int(k) for k in steps if 1 <= k <= n})
    return plotting.field_panels(truth[0, ..., c:c + 1], pred[0, ..., c:c + 1], [s.field_names[c]],
                                 [k - 1 for k in steps], path, title=f"{s.name} (trajectory 0)")


# ------------------------------------------------------------------------------------ from a job config
def eval_sets_from_config(config, paths: Sequence[str], vocab, n_trajectories: int,
                          allow_new_fields: bool) -> list[EvalSet]:
    """Validation trajectories of a training config (configs/*.py), read as training reads the data."""
    return load_eval_sets(
        paths, n_steps_input=config.data.n_steps_input, n_trajectories=n_trajectories,
        rollout_steps=config.eval.rollout_steps, stride=config.data.min_dt_stride, split=config.eval.split,
        vocab=vocab, allow_new_fields=allow_new_fields, inflate_to_3d=config.data.inflate_to_3d, seed=config.seed,
        normalization=config.data.normalization)


def eval_jitter_key(config):
    """The validation rollouts' jitter key (None: eval.jitter off)."""
    return jax.random.fold_in(jax.random.key(config.seed), 0x5EED) if config.eval.jitter else None


def check_model_section(config, weights) -> None:
    """--mode=eval evaluates the checkpoint's own model: a config whose model section says otherwise
    (another config file, a --config.model.* override) is an error naming the settings, rather than
    silently ignored. n_states is left out (the training data's vocabulary may have grown it); a
    fine-tuning config (init_from) takes its architecture from the base checkpoint, so it has none to
    contradict."""
    from walrus_jax.errors import ConfigError
    from walrus_jax.training.config import model_config

    ours, theirs = model_config(config).to_dict(), weights.cfg.to_dict()
    diffs = sorted(k for k in ours if k != "n_states" and k in theirs and _same(ours[k]) != _same(theirs[k]))
    if diffs:
        pretty = ", ".join(f"model.{k}: checkpoint {theirs[k]!r} vs config {ours[k]!r}" for k in diffs[:6])
        more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
        raise ConfigError(f"--mode=eval: the config's model section contradicts checkpoint {weights.source} ({pretty}"
                          f"{more}); eval uses the checkpoint's model: pass the config it was trained with")


def _same(v):
    return [_same(x) for x in v] if isinstance(v, (list, tuple)) else v


def evaluate_job(config, workdir: str) -> dict:
    """--mode=eval: rollout metrics of the newest checkpoint in WORKDIR (or of config.init_from when
    WORKDIR has none) on the held-out split of the configured data -> WORKDIR/eval.json."""
    from walrus_jax.checkpoints.load import checkpoint_dir, field_vocabulary, load_model
    from walrus_jax.data.resolve import resolve_data
    from walrus_jax.errors import PathError
    from walrus_jax.jsonio import write_json

    workdir = os.path.abspath(workdir)
    source = workdir if checkpoint_dir(workdir) else config.init_from
    if not source:
        raise PathError(f"--mode=eval: no checkpoint in {workdir}/checkpoints and config init_from is empty")
    model = load_model(source, what="config init_from")  # as stored: the checkpoint's own dtype
    if source == workdir and not config.init_from:
        check_model_section(config, model)
    sets = eval_sets_from_config(config, resolve_data(config), field_vocabulary(model),
                                 max(1, config.eval.n_trajectories), False)
    report = evaluate(model, sets, windows=tuple(tuple(w) for w in config.eval.windows),
                      batch_size=config.eval.batch_size, jitter=eval_jitter_key(config))
    out = dict(strip_arrays(report), checkpoint=model.source)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_json(os.path.join(workdir, "eval.json"), out)
        if config.eval.plot:
            plot_rollout(report, sets, os.path.join(workdir, "eval_rollout.png"))
    return out
