"""Forward-pass benchmark: compile time, forward time, achieved GFLOP/s and its ratio to the
machine's measured float32 matmul rate, peak memory; float32 and bf16.

    python tools/bench/forward.py                                  # small, medium, 1.3B at 128x128, T=6
    python tools/bench/forward.py --configs small,medium --dtypes float32 --repeats 5
    python tools/bench/forward.py --compile-scaling                # compile time vs number of blocks

FLOPs are counted analytically (tools/bench/flops.py: matmuls, attention, convolutions). The matmul reference is numpy's
float32 4096x4096 dot on CPU (the machine-speed yardstick), or a jitted jnp.dot on an accelerator.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import walrus_jax as wj
from walrus_jax.huge_pages import reexec_with_huge_pages
from walrus_jax.models.config import PERIODIC

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import forward_flops  # noqa: E402

CONFIGS = {
    "small": lambda **kw: wj.ModelConfig.small(**kw),
    "medium": lambda **kw: wj.ModelConfig.medium(**kw),
    "walrus_1p3b": lambda **kw: wj.ModelConfig.walrus_1p3b(**kw),
}


def matmul_rate(n: int = 4096, repeats: int = 3) -> float:
    """Measured float32 matmul GFLOP/s (numpy on CPU, jnp on an accelerator)."""
    if jax.default_backend() == "cpu":
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
        a @ b
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    else:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        f = jax.jit(lambda a: a @ a)
        f(a).block_until_ready()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            f(a).block_until_ready()
            times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def peak_memory_gb() -> float:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB (process peak RSS)


def build(cfg: wj.ModelConfig):
    """A model with random weights, built abstractly and filled (no per-weight compiles)."""
    return wj.Walrus(cfg, rngs=nnx.Rngs(0))


def bench_one(name: str, dtype: str, spatial, T: int, C: int, repeats: int, B: int = 1):
    cfg = CONFIGS[name](dtype=dtype, param_dtype=dtype if dtype == "bfloat16" else "float32", n_states=67)
    model = build(cfg)
    graphdef, state = nnx.split(model)
    bcs = ((PERIODIC, PERIODIC),) * len(spatial)
    fi = jnp.arange(3, 3 + C)

    @wj.jit
    def fwd(state, x):
        return nnx.merge(graphdef, state)(x, fi, bcs)

    x = jax.random.normal(jax.random.key(1), (B, T) + tuple(spatial) + (C,), jnp.float32)
    t = time.perf_counter()
    compiled = fwd.lower(state, x).compile()
    compile_s = time.perf_counter() - t
    flops = forward_flops(cfg, spatial, T, C, B)
    compiled(state, x).block_until_ready()
    # The reference rate is re-measured before every timed forward: on a shared (virtual) machine it
    # drifts by +-15% over minutes, and the ratio should compare like with like.
    times, rates = [], []
    for _ in range(repeats):
        rates.append(matmul_rate(repeats=2))
        time.sleep(0.5)  # let numpy's BLAS threads stop spinning before XLA's start
        t = time.perf_counter()
        compiled(state, x).block_until_ready()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    ratio = statistics.median(flops / t / 1e9 / r for t, r in zip(times, rates))
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))
    del model, state, compiled
    gc.collect()
    return dict(config=name, dtype=dtype, params_m=n_params / 1e6, compile_s=compile_s, forward_s=med,
                gflop=flops / 1e9, gflops=flops / med / 1e9, rate=statistics.median(rates), ratio=ratio,
                peak_gb=peak_memory_gb())


def compile_scaling(blocks=(2, 40)):
    rows = []
    for n in blocks:
        cfg = wj.ModelConfig.walrus_1p3b(n_blocks=n)
        abstract = nnx.eval_shape(lambda: wj.Walrus(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        x = jax.ShapeDtypeStruct((1, 6, 128, 128, 4), jnp.float32)

        @wj.jit
        def fwd(state, x):
            return nnx.merge(graphdef, state)(x, jnp.arange(3, 7), ((PERIODIC, PERIODIC),) * 2)

        t = time.perf_counter()
        fwd.lower(state, x).compile()
        rows.append((n, time.perf_counter() - t))
    print("\n| blocks | compile (s) |\n|---|---|")
    for n, s in rows:
        print(f"| {n} | {s:.1f} |")
    print(f"ratio {rows[-1][0]} / {rows[0][0]} blocks: {rows[-1][1] / rows[0][1]:.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="small,medium,walrus_1p3b")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--T", type=int, default=6)
    p.add_argument("--C", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile-scaling", action="store_true")
    args = p.parse_args(argv)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
          f"compiler options {wj.compiler_options()}")
    if args.compile_scaling:
        compile_scaling()
        return
    print(f"\n2D {args.size}x{args.size}, T={args.T}, C={args.C}, B={args.batch}, periodic, no jitter")
    print("matmul rate: float32 4096x4096, measured before each timed forward (median); % = median of the "
          "per-repeat ratios\n")
    print("| config | dtype | params (M) | compile (s) | forward (s, median) | GFLOP | GFLOP/s | matmul GFLOP/s "
          "| % of matmul rate | peak mem (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        for dtype in args.dtypes.split(","):
            r = bench_one(name, dtype, (args.size, args.size), args.T, args.C, args.repeats, args.batch)
            print(f"| {r['config']} | {r['dtype']} | {r['params_m']:.1f} | {r['compile_s']:.1f} | {r['forward_s']:.3f} | "
                  f"{r['gflop']:.1f} | {r['gflops']:.1f} | {r['rate']:.1f} | {100 * r['ratio']:.0f}% | {r['peak_gb']:.2f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    reexec_with_huge_pages()  # as `python -m walrus_jax.main` runs (walrus_jax/huge_pages.py)
    main()
