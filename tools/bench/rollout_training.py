"""One-step against rollout (multi-step) fine-tuning at equal compute, on a miniwell system.

    python -m tools.bench.rollout_training [--work DIR] [--base-steps 300] [--updates 150] [--k 3]
                                           [--lr 5e-4] [--horizon 40]

1. trains a base model with the demo configuration (configs/demo.py: Kolmogorov flow 32², hidden
   64, 2 blocks, 2-frame history) for --base-steps updates;
2. fine-tunes it twice from the same weights: --updates one-step updates, and --updates / k updates
   with train.rollout_steps=k (each costs about k one-step updates: equal compute);
3. rolls every model out --horizon steps from the start of the held-out trajectories (valid and
   test splits, no jitter) and prints VRMSE per horizon window and the fine-tuning wall times.
Everything runs through `python -m walrus_jax.main`, as a user would.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                    "demo.py")


def _main(workdir: str, *overrides: str, mode: str = "train") -> float:
    t0 = time.time()
    cmd = [sys.executable, "-m", "walrus_jax.main", "--config", DEMO, "--workdir", workdir, "--mode", mode,
           *[f"--config.{o}" for o in overrides]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.time() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="")
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--updates", type=int, default=150)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--horizon", type=int, default=40)
    a = p.parse_args(argv)
    work = a.work or tempfile.mkdtemp(prefix="rollout_training_")
    base = os.path.join(work, "base")
    if not os.path.exists(os.path.join(base, "summary.json")):
        _main(base, f"train.steps={a.base_steps}", "eval.n_trajectories=0", "train.max_wall_seconds=0")
    windows = [(1, 10), (11, 20), (21, a.horizon)]

    def evaluate(wd: str) -> dict:
        """{split: eval.json} of the newest checkpoint in wd."""
        scores = {}
        for split in ("valid", "test"):
            _main(wd, f"eval.split={split}", f"eval.rollout_steps={a.horizon}", f"eval.windows={tuple(windows)}",
                  "eval.jitter=False", "eval.n_trajectories=4", "eval.plot=False", mode="eval")
            with open(os.path.join(wd, "eval.json")) as f:
                scores[split] = json.load(f)
        return scores

    rows = {"base": (a.base_steps, None, evaluate(base))}
    for name, updates, k in (("one-step", a.updates, 1), (f"rollout k={a.k}", a.updates // a.k, a.k)):
        wd = os.path.join(work, name.replace(" ", "_").replace("=", ""))
        seconds = _main(wd, f"init_from={base}", f"train.steps={updates}", f"train.rollout_steps={k}",
                        f"train.lr={a.lr}", "eval.n_trajectories=0", "train.max_wall_seconds=0",
                        "checkpoint.every=0")
        rows[name] = (updates, seconds, evaluate(wd))
    print(f"demo model (Kolmogorov flow 32^2), base {a.base_steps} updates, fine-tuned at lr {a.lr}; VRMSE of "
          f"{a.horizon}-step rollouts from the held-out trajectories' start, no jitter (valid / test split)")
    head = " ".join(f"{f'steps {w[0]}-{w[1]}':>15}" for w in windows)
    print(f"{'model':<14} {'updates':>7} {'seconds':>8} {head}")
    for name, (updates, seconds, scores) in [("persistence", rows["base"])] + list(rows.items()):
        key = "persistence_vrmse" if name == "persistence" else "vrmse"
        cells = " ".join(f"{scores['valid'][f'{key}_{w[0]}_{w[1]}']:>7.3f}/{scores['test'][f'{key}_{w[0]}_{w[1]}']:<7.3f}"
                         for w in windows)
        shown = "" if name in ("persistence", "base") or seconds is None else f"{seconds:.0f}"
        print(f"{name:<14} {'' if name == 'persistence' else updates:>7} {shown:>8} {cells}")
    print(f"(seconds: the fine-tuning command, compile included; work folder {work})")


if __name__ == "__main__":
    main()
