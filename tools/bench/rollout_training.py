"""One-step against rollout (multi-step) fine-tuning at equal compute, on a miniwell system.

    python -m tools.bench.rollout_training [--work DIR] [--system ns2d_kolmogorov] [--base-steps 600]
                                           [--updates 300] [--k 3] [--lr 5e-4] [--horizon 40]
                                           [--held-out 8] [--stop-gradient]

1. generates a 2-D miniwell system (--system, default the demo's Kolmogorov flow; 32², 5 training
   trajectories as the demo's, --held-out trajectories in each of the valid and test splits, and
   enough frames for the horizon), and trains a base model on it with
   the demo configuration (configs/demo.py: hidden 64, 2 blocks, 2-frame history) for --base-steps
   updates;
2. fine-tunes it from the same weights: --updates one-step updates, and for each k of --k,
   --updates / k updates with train.rollout_steps=k (each costs about k one-step updates: equal
   compute);
3. rolls every model out --horizon steps from the start of the held-out trajectories (valid and
   test splits, no jitter) and prints VRMSE per horizon window (mean and median over trajectories)
   and the fine-tuning wall times.
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
    p.add_argument("--system", default="ns2d_kolmogorov", choices=["ns2d_kolmogorov", "acoustics_box", "gray_scott"])
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--k", default="3", help="comma-separated rollout lengths to compare with one-step")
    p.add_argument("--stop-gradient", action="store_true", help="train.rollout_stop_gradient for the rollout runs")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--horizon", type=int, default=40)
    p.add_argument("--held-out", type=int, default=8)
    a = p.parse_args(argv)
    work = a.work or tempfile.mkdtemp(prefix="rollout_training_")
    from walrus_jax.data.miniwell import generate_system

    data = os.path.join(work, "data")
    if not os.path.isdir(os.path.join(data, a.system)):
        generate_system(a.system, data, quick=True, n_frames=max(48, a.horizon + 8),
                        n_traj={"train": 5, "valid": a.held_out, "test": a.held_out})
    on_data = (f"data.root={data}", "data.generate=", f"data.datasets=('{a.system}',)")
    base = os.path.join(work, "base")
    if not os.path.exists(os.path.join(base, "summary.json")):
        _main(base, *on_data, f"train.steps={a.base_steps}", "eval.n_trajectories=0", "train.max_wall_seconds=0")
    windows = [(1, 10), (11, 20), (21, a.horizon)]

    def evaluate(wd: str) -> dict:
        """{split: eval.json} of the newest checkpoint in wd."""
        scores = {}
        for split in ("valid", "test"):
            _main(wd, *on_data, f"eval.split={split}", f"eval.rollout_steps={a.horizon}",
                  f"eval.windows={tuple(windows)}", "eval.jitter=False", f"eval.n_trajectories={a.held_out}",
                  "eval.plot=False", mode="eval")
            with open(os.path.join(wd, "eval.json")) as f:
                scores[split] = json.load(f)
        return scores

    rows = {"base": (a.base_steps, None, evaluate(base))}
    sg = " sg" if a.stop_gradient else ""
    variants = [("one-step", a.updates, 1)] + [(f"rollout k={k}{sg}", a.updates // k, k)
                                              for k in (int(v) for v in a.k.split(","))]
    for name, updates, k in variants:
        wd = os.path.join(work, name.replace(" ", "_").replace("=", ""))
        if not os.path.exists(os.path.join(wd, "summary.json")):
            _main(wd, *on_data, f"init_from={base}", f"train.steps={updates}", f"train.rollout_steps={k}",
                  f"train.rollout_stop_gradient={bool(sg) and k > 1}", f"train.lr={a.lr}", "eval.n_trajectories=0",
                  "train.max_wall_seconds=0", "checkpoint.every=0")
        with open(os.path.join(wd, "summary.json")) as f:
            seconds = json.load(f)["wall_seconds"]
        rows[name] = (updates, seconds, evaluate(wd))
    for how, meaning in (("mean", "mean over trajectories"),
                         ("median_over_trajectories", "median over trajectories (one trajectory whose field dies "
                                                      "out can dominate the mean)")):
        print(f"demo model ({a.system} 32^2), base {a.base_steps} updates, fine-tuned at lr {a.lr}; VRMSE of "
              f"{a.horizon}-step rollouts from the start of {a.held_out} + {a.held_out} held-out trajectories, no "
              f"jitter, {meaning} (valid / test split)")
        head = " ".join(f"{f'steps {w[0]}-{w[1]}':>15}" for w in windows)
        print(f"{'model':<14} {'updates':>7} {'seconds':>8} {head}")
        for name, (updates, seconds, scores) in [("persistence", rows["base"])] + list(rows.items()):
            key = "persistence_vrmse" if name == "persistence" else "vrmse"
            cell = {split: [scores[split]["datasets"][a.system][f"{key}_{w[0]}_{w[1]}"][how] for w in windows]
                    for split in ("valid", "test")}
            cells = " ".join(f"{v:>7.3f}/{t:<7.3f}" for v, t in zip(cell["valid"], cell["test"]))
            shown = "" if name in ("persistence", "base") or seconds is None else f"{seconds:.0f}"
            print(f"{name:<14} {'' if name == 'persistence' else updates:>7} {shown:>8} {cells}")
        print()
    print(f"(seconds: the fine-tuning job's wall time, compile included; work folder {work})")


if __name__ == "__main__":
    main()
