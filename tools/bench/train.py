"""Train-step benchmark: step time, tokens/s, compile time, peak memory and model FLOP utilisation.

    python -m tools.bench.train                       # demo (small) and medium configs
    python -m tools.bench.train --models small --batch 8 --size 32 --steps 5

For each model it times one jitted train step (the real `walrus_jax.training.steps.train_step` with AdamW,
clipping, donation) on a synthetic 2D batch (B, T, S, S, C) with periodic boundaries, jitter off
(as the original's step that tools.bench.side_by_side runs beside it; `--jitter` turns it on):
  compile_s      lower + compile of the step
  step_ms        median wall time of `--steps` steps after one warm-up step
  tokens/s       B · T · (space tokens per frame) / step time (the processor's token count)
  peak_mem       device peak bytes in use (accelerators) or the process's max RSS (CPU)
  model_TFLOP    FLOPs of one step from XLA's cost analysis of the lowered (pre-fusion) program
  MFU            model FLOP/s ÷ the measured dense-matmul rate of the same device and dtype
Prints a Markdown table (and --json FILE writes the rows).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from walrus_jax.huge_pages import reexec_with_huge_pages
from walrus_jax.models import ModelConfig, Walrus
from walrus_jax.models.patching import choose_strides
from walrus_jax.training import optim, steps


def matmul_rate(dtype=jnp.float32, n: int | None = None, reps: int = 5) -> float:
    """Measured FLOP/s of a square matmul (the denominator of MFU)."""
    if n is None:
        n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(ts)


def jaxpr_flops(jaxpr) -> float:
    """2·MACs of every dot_general and convolution in a jaxpr (sub-jaxprs included; scan bodies
    times their length). Elementwise work is not counted: MFU is about the matrix units."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * float(np.prod([lhs[i] for i in lc]))
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            k_in = rhs[dn.rhs_spec[1]]
            k_sp = np.prod([rhs[i] for i in dn.rhs_spec[2:]])
            total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * float(k_in * k_sp)
        mult = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
        for v in eqn.params.values():
            subs = v if isinstance(v, (list, tuple)) else [v]
            for sub in subs:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    total += mult * jaxpr_flops(inner)
                elif hasattr(sub, "eqns"):
                    total += mult * jaxpr_flops(sub)
    return total


def peak_memory_bytes() -> int:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def bench_one(name: str, cfg: ModelConfig, batch: int, t_in: int, size: int, n_fields: int, n_steps: int,
              jitter: bool = False) -> dict:
    schedule = optim.Schedule(base_lr=1e-4, max_epochs=1000, warmup_epochs=10, cooldown_epochs=10)
    tx = optim.build(optim.OptimizerConfig(), schedule)  # the release: betas (0.9, 0.999), eps 1e-10, wd 1e-4, clip 10
    model = Walrus(cfg, rngs=nnx.Rngs(0))
    graphdef, p, r = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(p), nnx.to_pure_dict(r)
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    state = steps.init_state(params, tx, jax.random.key(0))
    rng = np.random.default_rng(0)
    b = {"input_fields": jnp.asarray(rng.normal(size=(batch, t_in, size, size, n_fields)), jnp.float32),
         "output_fields": jnp.asarray(rng.normal(size=(batch, 1, size, size, n_fields)), jnp.float32),
         "constant_fields": jnp.zeros((batch, size, size, 0), jnp.float32),
         "field_indices": jnp.arange(3, 3 + n_fields, dtype=jnp.int32),
         "padded_field_mask": jnp.ones((n_fields,), bool)}
    bcs = ((2, 2), (2, 2))
    fn = steps.build_train_step(graphdef, tx, schedule, steps.StepOptions(jitter=jitter))
    t = time.perf_counter()
    lowered = fn.lower(state, b, rest, bcs)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    # FLOPs counted from the step's jaxpr (backend-independent: on GPU, XLA's cost analysis misses
    # the matmuls and attention that become cuBLAS / cuDNN custom calls).
    flops = jaxpr_flops(jax.make_jaxpr(lambda s, bb, rr: fn(s, bb, rr, bcs))(state, b, rest).jaxpr)
    state, m = compiled(state, b, rest)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(n_steps):
        t = time.perf_counter()
        state, m = compiled(state, b, rest)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens_per_axis = [size // (s1 * s2) for s1, s2 in choose_strides((size, size, 1))[:2]]
    tokens = batch * t_in * int(np.prod(tokens_per_axis))
    return {"model": name, "params_M": n_params / 1e6, "batch": f"{batch}x{t_in}x{size}x{size}x{n_fields}",
            "compile_s": compile_s, "step_ms": 1e3 * step_s, "tokens_per_s": tokens / step_s,
            "peak_mem_GiB": peak_memory_bytes() / 2 ** 30, "model_TFLOP": flops / 1e12,
            "achieved_TFLOPs": flops / step_s / 1e12, "loss": float(m["loss"])}


MODELS = {"small": ModelConfig.small, "medium": ModelConfig.medium, "tiny": ModelConfig.tiny,
          "walrus_1p3b": ModelConfig.walrus_1p3b}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small,medium", help=f"comma-separated of {sorted(MODELS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--t_in", type=int, default=4)
    ap.add_argument("--size", type=int, default=32, help="square 2D grid size (on the stride table)")
    ap.add_argument("--fields", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--remat", default="",
                    help="remat policy (models/config.py REMAT_CHOICES); default: the preset's own (medium: dots_and_attention)")
    ap.add_argument("--jitter", action="store_true", help="patch/token jitter on (the reference step has it off)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    peak = matmul_rate()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)); "
          f"measured f32 matmul rate {peak / 1e12:.3f} TFLOP/s")
    rows = []
    for name in a.models.split(","):
        cfg = MODELS[name](drop_path=0.0, **({"remat": a.remat} if a.remat else {}))
        row = bench_one(name, cfg, a.batch, a.t_in, a.size, a.fields, a.steps, a.jitter)
        row["MFU"] = row["achieved_TFLOPs"] * 1e12 / peak
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["model", "params_M", "batch", "compile_s", "step_ms", "tokens_per_s", "peak_mem_GiB", "model_TFLOP",
            "achieved_TFLOPs", "MFU"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"matmul_TFLOPs": peak / 1e12, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    reexec_with_huge_pages()  # as `python -m walrus_jax.main` runs (walrus_jax/huge_pages.py)
    main()
