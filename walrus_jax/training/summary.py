"""WORKDIR/summary.json: what a finished (or stopped) training run reports."""
from __future__ import annotations

import os

import numpy as np

from walrus_jax import jsonio
from walrus_jax.inference import evaluation


def loss_window(n: int) -> int:
    """Steps averaged for initial_loss / final_loss: 5% of the run, between 1 and 20."""
    return max(1, min(20, n // 20))


def write_summary(workdir, losses, steps_done, resumed_from, report, wall, train_seconds, stopped_early,
                  is_main, timing: dict | None = None, notes: dict | None = None) -> dict:
    """WORKDIR/summary.json:
    steps_done, initial_loss / final_loss (means over the first / last `loss_window` steps),
    losses (one per optimizer step, across resumes), resumed_from_step (null if fresh),
    eval {vrmse_1_10, persistence_vrmse_1_10, nrmse_1_10, ... and per dataset}, wall_seconds,
    timing {data_seconds (incl. miniwell generation), setup_seconds (everything before the first
    step), first_step_seconds (compile + one step), train_seconds (the loop, incl. the first step),
    eval_seconds (final rollout evaluation, incl. its compile)}, plus `notes` (e.g.
    checkpoints_moved_aside: unrestorable checkpoints renamed <step>.corrupt-<time>).
    """
    w = loss_window(len(losses))
    summary = {
        "steps_done": int(steps_done),
        "initial_loss": float(np.mean(losses[:w])) if losses else None,
        "final_loss": float(np.mean(losses[-w:])) if losses else None,
        "loss_window": w,
        "losses": losses,
        "resumed_from_step": resumed_from,
        "stopped_early": stopped_early,
        "eval": evaluation.strip_arrays(report) if report is not None else None,
        "train_seconds": train_seconds,
        "wall_seconds": wall,
        "timing": dict(timing or {}),
        **dict(notes or {}),
    }
    if is_main:
        jsonio.write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
