"""What a training run reports while it runs: a progress bar and the metrics log.

Progress: `rich.progress` (a dependency of flax, so always installed) draws the bar with steps/s,
ETA and the latest loss on a terminal; when stderr is not a terminal (batch jobs, log files) a
plain line goes to the log every 10 s instead of a redrawn bar.
Metrics: WORKDIR/metrics.jsonl (one JSON object per line, strict JSON) and TensorBoard events
through tensorboardX's SummaryWriter (WORKDIR/tensorboard). Both on process 0 only.
A run that starts after `start_step` updates (resumed from that checkpoint, or 0 when fresh) first
cuts metrics.jsonl back to the rows of steps <= start_step, and TensorBoard is told to drop the
earlier events of later steps (its `purge_step`), so each step appears once after a resume.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

from walrus_jax import jsonio

log = logging.getLogger(__name__)
PLAIN_EVERY_S = 10.0  # seconds between progress lines when stderr is not a terminal


class Progress:
    """Training progress: step / total, loss, steps/s, ETA."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.t0, self.last_line = time.time(), 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                    TextColumn("loss {task.fields[loss]} | {task.fields[rate]} steps/s | ETA"),
                                    TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", rate="-")
            self.bar.start()

    def update(self, step: int, loss: float | None, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.time()
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        loss_s = f"{loss:.4g}" if loss is not None else "-"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss_s, rate=f"{rate:.2f}")
            return
        if not force and now - self.last_line < PLAIN_EVERY_S:
            return
        self.last_line = now
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
        sys.stderr.write(f"step {step}/{self.total} loss {loss_s} | {rate:.2f} steps/s | ETA {eta_s}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class MetricsWriter:
    """WORKDIR/metrics.jsonl and TensorBoard events (module docstring); a no-op when not enabled."""

    def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            cut_metrics(self.path, start_step)
            tb_dir = os.path.join(workdir, "tensorboard")
            # Rows are logged at step = updates done, so the restored run's own rows are <= start_step.
            purge = start_step + 1 if os.path.isdir(tb_dir) and os.listdir(tb_dir) else None
            self.tb = SummaryWriter(tb_dir, purge_step=purge)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(jsonio.dumps({"step": int(step), **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def cut_metrics(path: str, start_step: int) -> int:
    """Drops the rows of `path` (metrics.jsonl) logged after `start_step` updates, and a last line
    cut off by a killed run; returns how many lines were dropped. The file is replaced atomically."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for ln in lines:
        try:
            row = json.loads(ln)
        except ValueError:
            continue  # a line cut off when the run was killed
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start_step:
            keep.append(ln if ln.endswith("\n") else ln + "\n")
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
        log.warning("%s: %d row(s) after step %d dropped (the run goes on from there)", path,
                    len(lines) - len(keep), start_step)
    return len(lines) - len(keep)


def eval_scalars(report: dict, prefix: str = "eval/") -> dict:
    """The scalars of an evaluation report (`walrus_jax.inference.evaluation.evaluate`) for the
    metrics log: the headline numbers and each dataset's window means."""
    out = {prefix + k: v for k, v in report.items() if isinstance(v, float)}
    for name, e in report.get("datasets", {}).items():
        for k, v in e.items():
            if isinstance(v, dict) and "mean" in v:
                out[f"{prefix}{name}/{k}"] = v["mean"]
    return out
