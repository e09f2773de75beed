"""Memory of one fine-tuning train step of the released 1.3B model, from XLA's compiled memory analysis.

    python -m tools.bench.finetune_memory                                  # every mode, batch 1 and 2, every remat
    python -m tools.bench.finetune_memory --modes lora16,full_f32 --batches 1,2 --remat full

For each (mode, per-device batch, remat policy) the real train step (`walrus_jax.steps.train_step`:
loss, gradients, clipping, AdamW, donated state) is lowered on abstract inputs only
(jax.ShapeDtypeStruct / nnx.eval_shape: nothing of the 1.3B model is allocated) for a 2D 128×128
batch of T=6 frames and 4 fields with periodic boundaries, compiled for the local backend, and
`compiled.memory_analysis()` read:
  args      parameters, optimizer state and batch handed to the step
  out       new state and metrics (aliased with the donated state: not counted twice)
  temp      XLA temporaries (activations kept for the backward pass, gradients, workspace)
  total     args + out + temp − aliased bytes: what the step needs on one device
Modes: full_f32 (every parameter trains, float32), full_bf16 (bfloat16 compute, float32 parameters
and optimizer state), lora16 (rank-16 adapters on the default targets of configs/finetune.py:lora,
base frozen: no gradients or moments for it). Also prints the trainable-parameter count and
fraction of each mode. The analysis is of the compiled program for this backend: on CPU it is
the CPU compiler's buffer assignment (the GPU's fused attention and buffer sharing differ).
Prints a Markdown table; --json FILE writes the rows.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from walrus_jax import xla_options
from walrus_jax.checkpoints import adapters
from walrus_jax.huge_pages import reexec_with_huge_pages
from walrus_jax.training import optim, steps
from walrus_jax.models import ModelConfig, Walrus
from walrus_jax.models.config import LORA_TARGETS
from walrus_jax.models.processor import REMAT_POLICIES

MODES = ("full_f32", "full_bf16", "lora16")
DEFAULT_LORA_TARGETS = ("time.qkv", "space.fused")  # configs/finetune.py:lora
GB = 1e9


def mode_config(mode: str, remat: str, targets=DEFAULT_LORA_TARGETS) -> ModelConfig:
    cfg = ModelConfig.walrus_1p3b(remat=remat, drop_path=0.0)
    if mode == "full_bf16":
        return cfg.replace(dtype="bfloat16")
    if mode.startswith("lora"):
        return cfg.replace(lora_rank=int(mode[4:]), lora_targets=tuple(targets))
    if mode != "full_f32":
        raise SystemExit(f"error: unknown mode {mode!r} (known: {', '.join(MODES)}, lora<rank>)")
    return cfg


def abstract_parts(cfg: ModelConfig):
    """(graphdef, abstract params, abstract rest, trainable mask) of a model, nothing allocated."""
    graphdef, p_abs, r_abs = nnx.split(nnx.eval_shape(lambda: Walrus(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    params, rest = nnx.to_pure_dict(p_abs), nnx.to_pure_dict(r_abs)
    mask = adapters.trainable_mask(params, cfg, cfg.n_states) if cfg.lora_rank else None
    return graphdef, params, rest, mask


def measure(mode: str, batch: int, remat: str, size: int = 128, n_t: int = 6, n_fields: int = 4,
            targets=DEFAULT_LORA_TARGETS) -> dict:
    cfg = mode_config(mode, remat, targets)
    graphdef, params, rest, mask = abstract_parts(cfg)
    schedule = optim.Schedule(base_lr=1e-4, max_epochs=10, warmup_epochs=1, cooldown_epochs=1)
    tx = optim.build(optim.OptimizerConfig(), schedule, mask)
    state = jax.eval_shape(lambda p: steps.init_state(p, tx, jax.random.key(0), mask), params)
    f32 = jnp.float32
    data = {"input_fields": jax.ShapeDtypeStruct((batch, n_t, size, size, n_fields), f32),
            "output_fields": jax.ShapeDtypeStruct((batch, 1, size, size, n_fields), f32),
            "field_indices": jax.ShapeDtypeStruct((n_fields,), jnp.int32)}
    bcs = ((2, 2), (2, 2))
    fn = functools.partial(steps.train_step, graphdef=graphdef, tx=tx, schedule=schedule, bcs=bcs,
                           opts=steps.StepOptions(), trainable_mask=mask)
    t0 = time.time()
    compiled = xla_options.jit(fn, donate_argnums=(0,)).lower(state, data, rest).compile()
    m = compiled.memory_analysis()
    n_train, n_all = adapters.count_trainable(params, mask)
    args, out, temp, alias = (int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                           "temp_size_in_bytes", "alias_size_in_bytes"))
    return {"mode": mode, "batch": batch, "remat": remat, "args_gb": args / GB, "out_gb": out / GB,
            "temp_gb": temp / GB, "alias_gb": alias / GB, "total_gb": (args + out + temp - alias) / GB,
            "trainable": n_train, "params": n_all, "trainable_frac": n_train / n_all,
            "compile_s": time.time() - t0, "backend": jax.default_backend()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES} (or lora<rank>)")
    ap.add_argument("--batches", default="1,2", help="per-device batch sizes")
    ap.add_argument("--remat", default="none," + ",".join(REMAT_POLICIES), help="remat policies (or 'none')")
    ap.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS), help=f"subset of {LORA_TARGETS}")
    ap.add_argument("--counts-only", action="store_true", help="only the trainable-parameter counts (no compile)")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    targets = tuple(t for t in args.lora_targets.split(",") if t)
    if args.counts_only:
        for mode in modes:
            cfg = mode_config(mode, "none", targets)
            _, params, _, mask = abstract_parts(cfg)
            n, total = adapters.count_trainable(params, mask)
            print(f"{mode} targets={targets if cfg.lora_rank else 'all'}: {n:,} of {total:,} parameters train "
                  f"({100 * n / total:.3f}%)")
        return
    rows = []
    print("| mode | batch | remat | args GB | out GB | temp GB | total GB | trainable | trainable % | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for remat in [r for r in args.remat.split(",") if r]:
            for b in [int(v) for v in args.batches.split(",") if v]:
                r = measure(mode, b, remat, targets=targets)
                rows.append(r)
                print(f"| {mode} | {b} | {remat} | {r['args_gb']:.2f} | {r['out_gb']:.2f} | {r['temp_gb']:.2f} | "
                      f"{r['total_gb']:.2f} | {r['trainable']:,} | {100 * r['trainable_frac']:.3f} | "
                      f"{r['compile_s']:.0f} |", flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    reexec_with_huge_pages()  # as `python -m walrus_jax.main` runs (walrus_jax/huge_pages.py)
    main()
