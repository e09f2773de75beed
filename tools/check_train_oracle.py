"""Checks walrus_jax's training step against a training oracle file recorded from the original trainer.

    python -m tools.check_train_oracle FILE.npz [FILE.npz ...] [--verbose]

The file holds the original's model config, optimizer / scheduler / trainer settings
(`config_json`), the weights before training (`w0/<torch name>`), the micro-batches (`batch{i}/...`,
Well layout with 2D data inflated to D = 1), and what the original computed: the loss of every
micro-batch (`micro_loss`), per update the gradient norm before clipping, the clip coefficient and
the lr (`grad_norm_preclip`, `clip_coef`, `lr_used`), the accumulated gradient of update 1
(`grad0/<name>`), and the weights after update 1 and 3 (`w1/`, `w3/`).

This runs the project's own train step (`walrus_jax.training.steps.build_train_step`, the code the main job
runs) from those weights and batches, and compares:
  * micro-batch losses, gradient norms, clip coefficients, lrs: relative error <= 1e-5;
  * every gradient of update 1 (the same loss code, `steps.loss_and_grads`), per tensor, as
    max|ours − theirs| / max|theirs| <= 1e-4;
  * the parameter updates w1 − w0 and w3 − w0 per tensor, max-normalized by the update's own size,
    <= 1e-3 (an error in the lr, clipping or Adam shows there, where it would hide in the weights);
  * gradient elements that are analytically zero and numerically float32 noise (oracle gradient
    < 1e-6 of the largest gradient of the model) cannot be compared by their update, since Adam turns
    noise into ±lr steps whose sign no two implementations share: their update must be at most the
    sum of the lrs (the rest of the tensor is compared as above). A tensor made only of such
    elements is checked for a noise-level gradient (< 1e-6 of the largest) instead of by value. They are the time-attention
    key-norm biases (the same value added to every key of a query: softmax-invariant) and the
    channels of the space-attention key-norm bias that RoPE leaves unrotated (for those channels
    q·(k + b) − q·k = q·b is again the same for every key);
  * parameters without a gradient (`params_without_grad_json`) must not move at all, in our run and
    in the file (a file whose own no-gradient parameters moved was recorded by another trainer or
    with another setting, and fails too).
Exit status 0 only if every quantity is within its bound.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
UPDATE_TOL = 1e-3
NOISE = 1e-6


def _settings(meta: dict, kernels: str = "auto"):
    """(ModelConfig, OptimizerConfig, Schedule, StepOptions, n_micro, grad_accum) from config_json."""
    from walrus_jax.training import optim, steps
    from walrus_jax.models import ModelConfig

    mc = meta["model_config"]
    cfg = ModelConfig.from_torch_config(mc, n_states=int(mc["n_states"]), kernels=kernels)
    o, s, t = meta["optimizer"], meta["scheduler"], meta["trainer"]
    k = int(t["grad_acc_steps"])
    opt = optim.OptimizerConfig(b1=float(o["betas"][0]), b2=float(o["betas"][1]), eps=float(o["eps"]),
                            weight_decay=float(o["weight_decay"]), clip_norm=t.get("clip_gradient"), grad_accum=k)
    per_update = "per optimizer step" in s.get("stepped", "") or "per_step=True" in s.get("stepped", "")
    sched = optim.Schedule(base_lr=float(o["lr"]), max_epochs=int(s["max_epochs"]),
                           warmup_epochs=int(s["warmup_epochs"]), cooldown_epochs=int(s["cooldown_epochs"]),
                           steps_per_epoch=int(s.get("step_mult_factor", 1)) if per_update else
                           _steps_per_epoch(s, t),
                           per_update=per_update, warmup_factor=float(s["warmup_lr_factor"]),
                           offset=float(s.get("offset", 128)), exponent=float(s.get("exponent", 0.5)))
    opts = steps.StepOptions(loss_multiplier=float(t["loss_multiplier"]),
                             eps=float(t.get("epsilon (model_epsilon)", 1e-5)), jitter=False,
                             minimum_context=int(t.get("minimum_context", 1)), grad_accum=k)
    return cfg, opt, sched, opts, int(t["micro_batches"]), k


def _steps_per_epoch(sched: dict, trainer: dict) -> int:
    """Updates per pseudo-epoch of a schedule stepped per epoch (1 when the file does not say)."""
    for where in (sched, trainer):
        for key in ("steps_per_epoch", "updates_per_epoch", "optimizer_steps_per_epoch"):
            if key in where:
                return int(where[key])
    return 1


def _batches(f, meta) -> list[dict]:
    names = meta.get("batch", {})
    field_names = list(names.get("variable_field_names", [])) + list(names.get("constant_field_names", []))
    out, i = [], 0
    while f"batch{i}/input_fields" in f:
        b = {k: f[f"batch{i}/{k}"] for k in ("input_fields", "output_fields", "constant_fields", "field_indices",
                                             "padded_field_mask", "boundary_conditions") if f"batch{i}/{k}" in f}
        b["field_names"] = np.asarray(field_names) if field_names else None
        out.append(b)
        i += 1
    if not out:
        raise KeyError("no batch0/input_fields in the file")
    return out


def _to_torch_names(cfg, tree) -> dict[str, np.ndarray]:
    """A params-shaped pytree -> {torch state_dict name: array in torch layout}."""
    from walrus_jax.checkpoints import convert
    from walrus_jax.checkpoints import params as parameters

    flat = {p: np.asarray(v) for p, v in parameters.flatten(tree, sep=None).items()}
    out = {}
    for key, t in convert.mapping(cfg).items():
        if t.path in flat:
            out[key] = convert.INVERSE[t.transform](flat[t.path][t.index])
    return out


def run(path: str, kernels: str = "auto") -> tuple[bool, list[tuple[str, float, float, bool]]]:
    """Runs the check on one file through the model's `kernels` forms ("xla": the portable path).
    Returns (passed, rows of (quantity, error, bound, ok))."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from walrus_jax.checkpoints import convert
    from walrus_jax.checkpoints import params as parameters
    from walrus_jax.training import optim, steps

    from walrus_jax.data.from_arrays_cli import numpy_file_problem

    problem = numpy_file_problem(path, ".npz")
    if problem:
        raise ValueError(f"{problem} (a training oracle file is an .npz with config_json, w0/..., batch0/...)")
    f = np.load(path, allow_pickle=False)
    if "config_json" not in f:
        raise KeyError(f"no config_json: not a training oracle file (it holds {sorted(f.files)[:5]})")
    meta = json.loads(str(f["config_json"]))
    cfg, opt, sched, opts, n_micro, k = _settings(meta, kernels)
    w0 = {n[3:]: f[n] for n in f.files if n.startswith("w0/")}
    # the weights decide what the YAML cannot: vocabulary size, block count, learnable RoPE, APE
    cfg = convert.infer_config({n: v.shape for n, v in w0.items()}, cfg)
    values = convert.assemble_params(w0.items(), cfg, source=f"{path}: w0")
    graphdef, p_state, r_state = nnx.split(parameters.model_from_params(cfg, values, f"{path}: w0"), nnx.Param, ...)
    params, rest = nnx.to_pure_dict(p_state), nnx.to_pure_dict(r_state)
    batches = _batches(f, meta)
    tx = optim.build(opt, sched)
    step_fn = steps.build_train_step(graphdef, tx, sched, opts)
    state = steps.init_state(params, tx, jax.random.key(0))
    rows: list[tuple[str, float, float, bool]] = []

    def rel(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))

    # gradients of update 1: the same loss code, accumulated over its micro-batches
    grads = None
    for i in range(k):
        db, bcs = steps.device_batch(batches[i % len(batches)])
        _, g = steps.loss_and_grads(params, db, rest, None, graphdef=graphdef, bcs=bcs, opts=opts)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    ours_g = _to_torch_names(cfg, grads)
    theirs_g = {n[6:]: f[n] for n in f.files if n.startswith("grad0/")}
    gmax = max(float(np.max(np.abs(v))) for v in theirs_g.values())
    # elements whose gradient is float32 noise around an analytic zero (module docstring)
    noise = {n: np.abs(v) < NOISE * gmax for n, v in theirs_g.items()}

    w0_t = _to_torch_names(cfg, params)  # before the steps: the state (and params) are donated to them
    losses, norms, coefs, lrs, snaps = [], [], [], [], {}
    for i in range(n_micro):
        db, bcs = steps.device_batch(batches[i % len(batches)])
        state, met = step_fn(state, db, rest, bcs)
        losses.append(float(met["loss"]))
        if bool(met["applied"]):
            norms.append(float(met["grad_norm"]))
            coefs.append(float(met["clip_coef"]))
            lrs.append(float(met["lr"]))
            snaps[len(norms)] = jax.tree.map(np.asarray, state["params"])

    for name, ours, key in (("micro_loss", losses, "micro_loss"), ("grad_norm_preclip", norms, "grad_norm_preclip"),
                            ("clip_coef", coefs, "clip_coef"), ("lr_used", lrs, "lr_used")):
        theirs = np.asarray(f[key], np.float64)
        if len(ours) != len(theirs):
            rows.append((f"{name} (count {len(ours)} vs {len(theirs)})", float("inf"), LOSS_TOL, False))
            continue
        for j, (a, b) in enumerate(zip(ours, theirs)):
            e = abs(a - b) / max(abs(b), 1e-30)
            rows.append((f"{name}[{j}]", e, LOSS_TOL, e <= LOSS_TOL))

    ours_gmax = max(float(np.max(np.abs(v))) for v in ours_g.values())
    for name, theirs in sorted(theirs_g.items()):
        if name not in ours_g:
            rows.append((f"grad {name} (missing)", float("inf"), GRAD_TOL, False))
            continue
        if noise[name].all():  # a tensor of noise: relative error is meaningless, its size is checked
            e = float(np.max(np.abs(ours_g[name]))) / ours_gmax
            rows.append((f"grad {name} (noise: max |g| / largest)", e, NOISE, e < NOISE))
        else:
            e = rel(ours_g[name], theirs)
            rows.append((f"grad {name}", e, GRAD_TOL, e <= GRAD_TOL))

    no_grad = set(json.loads(str(f["params_without_grad_json"]))) if "params_without_grad_json" in f else set()
    for n_upd in (1, 3):
        names = sorted(x[len(f"w{n_upd}/"):] for x in f.files if x.startswith(f"w{n_upd}/"))
        if not names:
            continue
        if n_upd not in snaps:
            rows.append((f"w{n_upd} (only {len(snaps)} updates ran)", float("inf"), UPDATE_TOL, False))
            continue
        ours_w = _to_torch_names(cfg, snaps[n_upd])
        lr_sum = float(np.sum(np.asarray(f["lr_used"], np.float64)[:n_upd]))
        for name in names:
            if name not in ours_w:  # a buffer (the fixed RoPE frequencies), not a trained parameter
                continue
            theirs = np.asarray(f[f"w{n_upd}/{name}"], np.float64) - np.asarray(f[f"w0/{name}"], np.float64)
            ours = np.asarray(ours_w[name], np.float64) - np.asarray(w0_t[name], np.float64)
            if name in no_grad:
                e = float(np.max(np.abs(ours)))
                rows.append((f"update w{n_upd}-w0 {name} (no gradient: must not move)", e, 0.0, e == 0.0))
                e = float(np.max(np.abs(theirs)))
                rows.append((f"update w{n_upd}-w0 {name} (no gradient: the file's must not move)", e, 0.0, e == 0.0))
                continue
            nz = noise.get(name, np.zeros(theirs.shape, bool))
            if (~nz).any():
                e = float(np.max(np.abs(ours[~nz] - theirs[~nz]))) / float(np.max(np.abs(theirs[~nz])))
                rows.append((f"update w{n_upd}-w0 {name}", e, UPDATE_TOL, e <= UPDATE_TOL))
            if nz.any():
                e = float(np.max(np.abs(ours[nz]))) / lr_sum
                rows.append((f"update w{n_upd}-w0 {name} (noise, {int(nz.sum())} elements: max |dw| / sum of lrs)",
                             e, 1.0, e <= 1.0 + 1e-3))
    return all(r[3] for r in rows), rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="training oracle .npz files")
    ap.add_argument("--verbose", action="store_true", help="print every row, not only the worst per group")
    ap.add_argument("--kernels", default="auto", choices=("auto", "xla", "cpu"),
                    help="the model's kernels (ModelConfig.kernels); xla checks the portable path")
    args = ap.parse_args(argv)
    ok_all = True
    for path in args.files:
        try:
            ok, rows = run(path, args.kernels)
        except (OSError, KeyError, ValueError) as e:
            print(f"error: {path}: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
            return 2
        ok_all &= ok
        print(f"== {path}: {'PASS' if ok else 'FAIL'}")
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(r[0].split(" ")[0].split("[")[0] + (" noise" if "noise" in r[0] else ""), []).append(r)
        for g, rs in groups.items():
            shown = rs if args.verbose else [max(rs, key=lambda r: (not r[3], r[1] / max(r[2], 1e-300)))]
            n_bad = sum(not r[3] for r in rs)
            for name, e, bound, ok_r in shown:
                print(f"  {'ok  ' if ok_r else 'FAIL'} {name:<78s} {e:10.3e}  (bound {bound:.0e})"
                      + ("" if args.verbose else f"  [worst of {len(rs)}, {n_bad} over]"))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
