"""Memory of a gradient through a long rollout (`wj.rollout_fn`), against the forward rollout.

    python -m tools.bench.rollout_gradient [--preset small] [--hw 128] [--t-in 6] [--fields 4]
                                           [--steps 10,50,100,200] [--schemes sqrt,step,none] [--remat full]

For each number of steps it compiles (XLA's memory analysis of the compiled program, this host's
backend) the forward rollout and, per checkpointing scheme, the gradient of a loss on the last state
with respect to the initial condition, and prints temporaries + outputs in MiB and their ratio to
the forward rollout's. Random weights; nothing is run, only compiled.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from walrus_jax.checkpoints.params import model_from_params, random_params
from walrus_jax.inference.differentiable import rollout_fn
from walrus_jax.models.config import OPEN, PERIODIC, WALL, ModelConfig

MIB = 2 ** 20


def _bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.output_size_in_bytes)


def measure(preset: str, hw: int, t_in: int, fields: int, n_steps: int, schemes, remat: str) -> dict:
    cfg = getattr(ModelConfig, preset)(remat=remat)
    model = model_from_params(cfg, random_params(cfg, seed=0, scale=0.5))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, t_in, hw, hw, fields), jnp.float32)
    kw = dict(field_indices=np.arange(3, 3 + fields), bcs=((PERIODIC, PERIODIC), (WALL, OPEN)), n_steps=n_steps)

    def forward(state, x):
        return rollout_fn(nnx.merge(graphdef, state), **kw, checkpoint="none", remat=None)(x)

    row = {"steps": n_steps}
    t0 = time.time()
    row["forward"] = _bytes(jax.jit(forward).lower(state, x).compile())
    for scheme in schemes:
        def loss(x, state, scheme=scheme):
            preds = rollout_fn(nnx.merge(graphdef, state), **kw, checkpoint=scheme, remat=None)(x)
            return jnp.mean(jnp.square(preds[:, -1]))

        row[scheme] = _bytes(jax.jit(jax.grad(loss)).lower(x, state).compile())
    row["compile_s"] = time.time() - t0
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--hw", type=int, default=128)
    p.add_argument("--t-in", type=int, default=6)
    p.add_argument("--fields", type=int, default=4)
    p.add_argument("--steps", default="10,50,100,200")
    p.add_argument("--schemes", default="sqrt,step,none")
    p.add_argument("--remat", default="full", help="the model's remat policy (what one step keeps for its backward)")
    a = p.parse_args(argv)
    schemes = a.schemes.split(",")
    print(f"{a.preset} preset (remat {a.remat}), 2-D {a.hw}x{a.hw}, T_in {a.t_in}, {a.fields} fields, batch 1, float32, "
          f"{jax.default_backend()}: temporaries + outputs of the compiled program, MiB (x forward)")
    print(f"{'steps':>5} {'forward':>9} " + " ".join(f"{'grad ' + s:>18}" for s in schemes) + f" {'compile':>8}")
    for n in (int(s) for s in a.steps.split(",")):
        r = measure(a.preset, a.hw, a.t_in, a.fields, n, schemes, a.remat)
        cells = " ".join(f"{r[s] / MIB:>9.1f} ({r[s] / r['forward']:>5.2f}x)" for s in schemes)
        print(f"{n:>5} {r['forward'] / MIB:>9.1f} {cells} {r['compile_s']:>7.0f}s", flush=True)


if __name__ == "__main__":
    main()
