"""The training job: `train(config, workdir)` (what `python -m walrus_jax.main` runs in train mode).

`setup` builds the run (data, model, sharded state: resumed from WORKDIR/checkpoints when there
is one); then `train.steps` optimizer updates of `train.grad_accum` micro-batches each run here,
with a progress bar, WORKDIR/metrics.jsonl and TensorBoard events every `train.log_every` updates,
checkpoints every `checkpoint.every` updates and at the end, and rollout evaluation
(`walrus_jax.inference.evaluation`) every `eval.every` updates and at the end. Last come
WORKDIR/summary.json (`training.summary`) and WORKDIR/rollout.png.

SIGTERM or SIGINT (`walrus_jax.training.preemption`) ends the run after the current update: a
checkpoint of that update is saved (and complete) before `train` returns, the evaluation is left
out, and the summary's `stopped_by` names the signal (the command line then exits 128 + its number).
"""
from __future__ import annotations

import logging
import math
import os
import time

import jax
import numpy as np
from flax import nnx

from walrus_jax import workdir_lock
from walrus_jax.inference import evaluation
from walrus_jax.training.batches import load_batch
from walrus_jax.training.config import micro_steps_per_update, validate_config
from walrus_jax.training.reporting import Progress, eval_scalars
from walrus_jax.training.preemption import StopRequest
from walrus_jax.training.setup import Run, setup
from walrus_jax.training.summary import write_summary

log = logging.getLogger(__name__)


class LossLog:
    """Losses of the updates done. The device values of recent updates are fetched only at log
    points (`flush`), so the host never waits on the device between them."""

    def __init__(self, run: Run):
        self.run = run
        self.losses = run.losses
        self.pending: list[tuple[int, list, list]] = []  # (update index, device losses, grad norms)

    @property
    def last(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def add(self, step: int, losses: list, grad_norms: list) -> None:
        self.pending.append((step, losses, grad_norms))

    def flush(self) -> None:
        """Fetches pending losses (FloatingPointError on a non-finite one) and writes the metrics log."""
        t = self.run.config.train
        for s, ls, gn in self.pending:
            loss = float(np.mean([float(v) for v in ls]))
            self.losses.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at optimizer step {s + 1}")
            if (s + 1) % t.log_every == 0 or s + 1 == t.steps:
                self.run.writer.write(s + 1, {"train/loss": loss,
                                              "train/grad_norm": float(np.mean([float(v) for v in gn])),
                                              "train/lr": float(self.run.schedule(s))})
        self.pending.clear()


def train(config, workdir: str) -> dict:
    """Runs (or resumes) the training job; returns the summary written to WORKDIR/summary.json.
    The workdir is locked for the run (walrus_jax.workdir_lock): a second job on it fails at once."""
    validate_config(config)  # a bad config fails before the workdir (and its lock) is created
    with workdir_lock.hold(os.path.abspath(workdir), primary=jax.process_index() == 0,
                           n_processes=jax.process_count()):
        with StopRequest() as stop:
            return _train(config, workdir, stop)


def _train(config, workdir: str, stop: StopRequest) -> dict:
    t_start = time.time()
    run = setup(config, workdir)
    run.timing["setup_seconds"] = time.time() - t_start  # data, model init, optimizer state, eval sets
    losses = LossLog(run)
    report = None
    try:
        step, stopped_early = _loop(run, losses, t_start, stop)
        # A signal that comes later (during the final evaluation) lets the run finish: its checkpoint is saved.
        stopped_by = stop.signal
        train_seconds = run.timing["train_seconds"]
        if step > run.start_step or not run.checkpointer.steps():
            save(run, losses, step, force=True)
        stopped_at = None
        if stopped_by is not None:  # stopped on request: the checkpoint is what matters, complete before the exit
            run.checkpointer.wait()
            stopped_at = _newest_checkpoint(run)
        elif run.plan is not None:  # adapter runs: WORKDIR/adapters, the small delta (walrus_jax/checkpoints/adapters.py)
            run.plan.write_delta(os.path.join(run.workdir, "adapters"), run.state["params"], run.vocab, run.meta,
                                 write=run.is_main)
        t_eval = time.time()
        report = evaluate(run, step) if run.eval_sets and stopped_by is None else None
        run.timing["eval_seconds"] = time.time() - t_eval
    finally:
        # Let a started (asynchronous) save finish even when something above failed, so the
        # newest checkpoint is complete; an unfinished one is never listed anyway.
        run.checkpointer.close()
        run.writer.close()
    summary = write_summary(run.workdir, losses.losses, step, run.resumed_from, report, time.time() - t_start,
                            train_seconds, stopped_early, run.is_main, run.timing,
                            {"checkpoints_moved_aside": run.checkpointer.moved_aside,
                             "stopped_by": stopped_by.name if stopped_by is not None else None,
                             "stopped_checkpoint": stopped_at})
    if report is not None and run.is_main and config.eval.plot:
        evaluation.plot_rollout(report, run.eval_sets, os.path.join(run.workdir, "rollout.png"))
    return summary


def _newest_checkpoint(run: Run) -> str | None:
    steps = run.checkpointer.steps()
    return os.path.join(run.checkpointer.directory, str(steps[-1])) if steps else None


def _loop(run: Run, losses: LossLog, t_start: float, stop: StopRequest) -> tuple[int, bool]:
    """Optimizer updates from run.start_step to train.steps -> (steps done, stopped early)."""
    config, t_loop = run.config, time.time()
    progress = Progress(config.train.steps, run.start_step, run.is_main)
    step, stopped_early, total = run.start_step, False, config.train.steps
    while step < total:
        if stop.now(step):  # checked before each update: a signal during setup stops before the first
            stopped_early = True
            break
        losses.add(step, *_update(run, t_loop))
        step += 1
        if step % config.train.log_every == 0 or step == total:
            losses.flush()
        progress.update(step, losses.last)
        if config.checkpoint.every and step % config.checkpoint.every == 0 and step < total:
            save(run, losses, step)
        if run.eval_sets and config.eval.every and step % config.eval.every == 0 and step < total:
            evaluate(run, step)
        if config.train.max_wall_seconds and time.time() - t_start > config.train.max_wall_seconds:
            log.warning("train.max_wall_seconds=%s reached after %d steps: stopping", config.train.max_wall_seconds,
                        step)
            stopped_early = True
            break
    losses.flush()
    progress.update(step, losses.last, force=True)
    progress.close()
    run.timing["train_seconds"] = time.time() - t_loop
    return step, stopped_early


def _update(run: Run, t_loop: float) -> tuple[list, list]:
    """One optimizer update (its micro-steps) -> (device losses, device grad norms) of the micro-steps."""
    micro_losses, norms = [], []
    for _ in range(micro_steps_per_update(run.config)):
        batch, bcs = load_batch(run.mesh, next(run.pipeline))
        run.state, met = run.step_fn(run.state, batch, run.rest, bcs)
        if "first_step_seconds" not in run.timing:  # compile + one execution (blocks once, to time it)
            jax.block_until_ready(met["loss"])
            run.timing["first_step_seconds"] = time.time() - t_loop
        micro_losses.append(met["loss"])
        norms.append(met["grad_norm"])
    return micro_losses, norms


def save(run: Run, losses: LossLog, step_done: int, force: bool = False) -> None:
    """Starts an (asynchronous) checkpoint of the run after `step_done` updates."""
    losses.flush()
    meta = dict(run.meta, opt_step=step_done, losses=losses.losses)
    run.checkpointer.save(step_done, run.state, meta, run.pipeline.get_state(), force=force)


def evaluate(run: Run, step_done: int) -> dict:
    """Rollout evaluation of the current parameters on the validation sets, logged at `step_done`."""
    model = nnx.merge(run.parts.graphdef, run.state["params"], run.rest)
    config = run.config
    report = evaluation.evaluate(model, run.eval_sets, windows=tuple(tuple(w) for w in config.eval.windows),
                                 batch_size=config.eval.batch_size, jitter=evaluation.eval_jitter_key(config))
    run.writer.write(step_done, eval_scalars(report))
    return report
