"""Rollout benchmark: one compiled lax.scan vs a Python loop of jitted single steps.

    python tools/bench/rollout.py [--configs medium:float32,walrus_1p3b:bfloat16] [--hw 128] [--t-in 6]
                                  [--steps 20] [--batch 1] [--fields 4] [--jitter]

For each "preset:dtype" (presets of walrus_jax.ModelConfig: tiny, small, medium, walrus_1p3b) it
builds a model with random weights (numpy, no eager init), 2D data of hw x hw with T_in frames
(periodic x, wall/open y), and prints per method: compile seconds, steady-state steps/s (after a
warm-up run), and memory: the compiled program's temporary + output bytes (memory_analysis) and,
on accelerators, the process's peak device memory after that method ran. The scan must not be
slower than the loop.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from walrus_jax.huge_pages import reexec_with_huge_pages  # noqa: E402


def _peak_bytes(dev) -> int | None:
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def _mem_analysis(compiled) -> int | None:
    try:
        ma = compiled.memory_analysis()
        return int(ma.temp_size_in_bytes + ma.output_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def bench_one(preset: str, dtype: str, hw: int, t_in: int, steps: int, batch: int, fields: int, jitter: bool,
              repeats: int = 2) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from walrus_jax.inference import rollouts
    from walrus_jax.checkpoints.params import model_from_params, random_params
    from walrus_jax.models.config import ModelConfig
    from walrus_jax.models.jitter import sample_jitter
    from walrus_jax import xla_options

    cfg = getattr(ModelConfig, preset)(dtype=dtype, param_dtype=dtype)
    t0 = time.time()
    model = model_from_params(cfg, random_params(cfg, seed=0, scale=0.5))
    build_s = time.time() - t0
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, t_in, hw, hw, fields)).astype(np.float32)
    fi = np.arange(3, 3 + fields)
    bcs = ((0, 1), (2, 2))
    dev = jax.devices()[0]
    key = jax.random.key(0) if jitter else None
    out = {"preset": preset, "dtype": dtype, "params": n_params, "hw": hw, "t_in": t_in, "steps": steps,
           "batch": batch, "fields": fields, "jitter": jitter, "build_s": round(build_s, 2),
           "device": str(dev.device_kind)}

    # ---------------- scan: the library's compiled lax.scan
    st, consts, mask, pmask, jitter_xs, key_ = rollouts._prepare(model, x, fi, bcs, steps, None, None, None, key, None,
                                                      1e-5, 1, True)
    graphdef, _, state = rollouts._split(model)
    fn = rollouts._compiled(graphdef, None, st, steps, False)
    win = jnp.asarray(x)
    start = jnp.zeros((), jnp.int32)
    t0 = time.time()
    compiled = fn.lower(state, win, consts, mask, pmask, jitter_xs, key_, start).compile()
    out["scan_compile_s"] = round(time.time() - t0, 2)
    out["scan_program_bytes"] = _mem_analysis(compiled)
    jax.block_until_ready(compiled(state, win, consts, mask, pmask, jitter_xs, key_, start))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.time()
        _, preds_scan = compiled(state, win, consts, mask, pmask, jitter_xs, key_, start)
        jax.block_until_ready(preds_scan)
        best = min(best, time.time() - t0)
    out["scan_steps_per_s"] = round(steps / best, 3)
    out["scan_peak_device_bytes"] = _peak_bytes(dev)
    # The public entry point (validation + dispatch) on top: same program, cached.
    t0 = time.time()
    jax.block_until_ready(rollouts.rollout(model, x, field_indices=fi, bcs=bcs, n_steps=steps, jitter=key))
    out["rollout_api_steps_per_s"] = round(steps / (time.time() - t0), 3)

    # ---------------- loop: a Python loop of one jitted step
    fi_j = np.asarray(fi, np.int32)

    def one_step(state, window, k):
        m = nnx.merge(graphdef, state, copy=True)
        jit_ = None if k is None else sample_jitter(k, cfg, (hw, hw), bcs)
        nxt = rollouts.predict_next(m, window, fi_j, bcs, jitter=jit_)
        return jnp.concatenate([window[:, 1:], nxt[:, None]], axis=1), nxt

    step = xla_options.jit(one_step)
    k0 = None if key is None else jax.random.fold_in(key, 0)
    t0 = time.time()
    step_c = step.lower(state, win, k0).compile()
    out["loop_compile_s"] = round(time.time() - t0, 2)
    out["loop_program_bytes"] = _mem_analysis(step_c)

    def run_loop():
        w, preds = win, []
        for t in range(steps):
            w, p = step_c(state, w, None if key is None else jax.random.fold_in(key, t))
            preds.append(p)
        return jnp.stack(preds, axis=1)

    jax.block_until_ready(run_loop())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.time()
        preds_loop = jax.block_until_ready(run_loop())
        best = min(best, time.time() - t0)
    out["loop_steps_per_s"] = round(steps / best, 3)
    out["loop_peak_device_bytes"] = _peak_bytes(dev)
    diff = float(jnp.max(jnp.abs(preds_loop.astype(jnp.float32) - preds_scan.astype(jnp.float32))))
    scale = float(jnp.max(jnp.abs(preds_scan.astype(jnp.float32))))
    out["scan_vs_loop_max_rel_diff"] = diff / max(scale, 1e-30)
    out["scan_over_loop_speed"] = round(out["scan_steps_per_s"] / out["loop_steps_per_s"], 3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="medium:float32,walrus_1p3b:bfloat16")
    ap.add_argument("--hw", type=int, default=128)
    ap.add_argument("--t-in", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--jitter", action="store_true", help="draw the released jitter per step from a key")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    results = []
    for spec in args.configs.split(","):
        preset, _, dtype = spec.partition(":")
        r = bench_one(preset, dtype or "float32", args.hw, args.t_in, args.steps, args.batch, args.fields, args.jitter)
        results.append(r)
        print(json.dumps(r), flush=True)
    cols = ["preset", "dtype", "params", "scan_compile_s", "loop_compile_s", "scan_steps_per_s", "loop_steps_per_s",
            "scan_over_loop_speed", "scan_program_bytes", "loop_program_bytes", "scan_peak_device_bytes"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(c)) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    reexec_with_huge_pages()  # as `python -m walrus_jax.main` runs (walrus_jax/huge_pages.py)
    main()
