"""Wall time of an ensemble rollout (`wj.rollout_ensemble`, members vmapped in one program) against
one member's rollout.

    python -m tools.bench.ensemble [--preset small] [--hw 128] [--t-in 6] [--fields 4] [--steps 10]
                                   [--members 1,4,16] [--repeats 3]

Random weights, 2-D data (periodic x, wall/open y), jittered members; times after a warm-up run
(compilation excluded), best of --repeats, on this host's default backend.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from walrus_jax.checkpoints.params import model_from_params, random_params
from walrus_jax.inference import rollouts
from walrus_jax.models.config import OPEN, PERIODIC, WALL, ModelConfig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--hw", type=int, default=128)
    p.add_argument("--t-in", type=int, default=6)
    p.add_argument("--fields", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--members", default="1,4,16")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    cfg = getattr(ModelConfig, a.preset)()
    model = model_from_params(cfg, random_params(cfg, seed=0, scale=0.5))
    x = np.random.default_rng(0).normal(size=(1, a.t_in, a.hw, a.hw, a.fields)).astype(np.float32)
    kw = dict(field_indices=np.arange(3, 3 + a.fields), bcs=((PERIODIC, PERIODIC), (WALL, OPEN)), n_steps=a.steps)

    def timed(run) -> float:
        jax.block_until_ready(run())  # compile and warm up
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            best = min(best, time.perf_counter() - t0)
        return best

    one = timed(lambda: rollouts.rollout(model, x, jitter=jax.random.key(0), **kw))
    print(f"{a.preset} preset, 2-D {a.hw}x{a.hw}, T_in {a.t_in}, {a.fields} fields, {a.steps} steps, jittered, "
          f"{jax.default_backend()}")
    print(f"{'members':>7} {'seconds':>8} {'x one member':>12} {'per member':>10}")
    print(f"{'rollout':>7} {one:>8.2f} {1.0:>12.2f} {one:>10.2f}")
    for e in (int(m) for m in a.members.split(",")):
        keys = jax.random.split(jax.random.key(1), e)
        t = timed(lambda: rollouts.rollout_ensemble(model, x, keys, **kw))
        print(f"{e:>7} {t:>8.2f} {t / one:>12.2f} {t / e:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
