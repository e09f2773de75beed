"""The training loop: data → sharded state → jitted steps → checkpoints → evaluation → summary.

`train(config, workdir)` runs a whole job described by an ml_collections config (configs/*.py):

1. Checks that need no compute, in this order: the config itself (mesh vs devices and batch,
   schedule lengths), `init_from`, the data (generating the miniwell into a cache when no data is
   configured), and the workdir's checkpoints (another architecture is an error).
2. Builds the model abstractly (`nnx.eval_shape`), derives parameter shardings from the logical
   axis names and `config.sharding.rules`, and initialises parameters and optimizer state directly
   sharded (a 1.3B model is never materialised on one device).
3. Resumes from the newest restorable checkpoint in WORKDIR/checkpoints (params, optimizer, step,
   data-iterator state, RNG), or starts fresh.
4. Runs `train.steps` optimizer updates of `train.grad_accum` micro-batches each, with a
   progress line (steps/s, ETA), `WORKDIR/metrics.jsonl` and TensorBoard events, checkpoints every
   `checkpoint.every` updates and at the end, and rollout evaluation every `eval.every` updates
   and at the end (`walrus_jax.evaluation`).
5. Writes WORKDIR/summary.json (keys in `write_summary`) and WORKDIR/rollout.png.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from walrus_jax import checkpointing, evaluation, jsonio, optim, sharding, steps, workdir_lock
from walrus_jax.errors import ConfigError, DataError, PathError
from walrus_jax.models.config import ModelConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- config checks
def model_config(config) -> ModelConfig:
    """The frozen ModelConfig described by `config.model` (placeholders → None)."""
    d = config.model.to_dict()
    return ModelConfig.from_dict(d)


def micro_batch_size(config) -> int:
    """Samples per micro-step: data.batch_size split over data.dataset_draws independent draws."""
    return int(config.data.batch_size) // int(config.data.dataset_draws)


def micro_steps_per_update(config) -> int:
    """Micro-steps per optimizer update: train.grad_accum micro-batches of data.dataset_draws draws each."""
    return int(config.train.grad_accum) * int(config.data.dataset_draws)


def validate_config(config) -> None:
    """Errors that need no data and no compute (raised before anything is built)."""
    t = config.train
    optim.make_schedule(t)  # raises on bad lengths (warmup + cooldown longer than the run, ...)
    optim.adamw_config(t)  # raises on grad_accum < 1, clip_norm <= 0
    if config.data.normalization not in ("sample", "global"):
        raise ConfigError(f"config data.normalization={config.data.normalization!r}; expected 'sample' (per-sample "
                          "RMS) or 'global' (the dataset's stats.yaml)")
    if t.minimum_context < 0 or config.data.n_steps_input <= t.minimum_context:
        raise ConfigError(f"config data.n_steps_input={config.data.n_steps_input} must exceed train.minimum_context="
                          f"{t.minimum_context} (>= 0): the first minimum_context predictions are not scored")
    if config.lora.rank > 0 and not config.init_from:
        raise ConfigError(f"config lora.rank={config.lora.rank} needs config.init_from (a base checkpoint to adapt)")
    if config.checkpoint.every < 0:
        raise ConfigError(f"config checkpoint.every must be >= 0 (0 = only at the end), got {config.checkpoint.every}")
    draws = config.data.dataset_draws
    if draws < 1 or config.data.batch_size % draws:
        raise ConfigError(f"config data.dataset_draws={draws} must be >= 1 and divide data.batch_size="
                          f"{config.data.batch_size} (each draw is one micro-step of batch_size / dataset_draws)")
    mesh_shape = sharding.mesh_shape(config.mesh, jax.device_count())
    n = mesh_shape[0] * mesh_shape[1]
    micro = micro_batch_size(config)
    what = f"data.batch_size={config.data.batch_size}" + (f" / data.dataset_draws={draws} = {micro}" if draws > 1 else "")
    if micro % n:
        raise ConfigError(f"config {what} is not divisible by the mesh's {n} devices (mesh.data={mesh_shape[0]} × "
                          f"mesh.fsdp={mesh_shape[1]}): the batch is sharded over both axes")
    if micro % jax.process_count():
        raise ConfigError(f"config {what} is not divisible by the {jax.process_count()} processes")
    sharding.rules_dict(config.sharding.rules)
    model_config(config)  # raises on an invalid architecture
    if config.init_from:
        from walrus_jax import finetune

        finetune.check_init_from(config.init_from)


# ------------------------------------------------------------------------------------------ data
def _dataset_dirs(root: str) -> list[str]:
    """The dataset folders (holding data/) under `root`: a local path or a URL (data.filesystem)."""
    from walrus_jax.data import filesystem as fsys

    if not fsys.isdir(root):
        return []
    return [p for p, is_dir in fsys.listdir(root) if is_dir and fsys.isdir(fsys.join(p, "data"))]


def generated_data_dir(config) -> str:
    d = config.data
    tag = ("quick" if d.generate_quick else "full") + (f"-{d.generate_systems.replace(',', '-')}"
                                                       if d.generate_systems else "")
    return os.path.join(os.path.expanduser(d.cache_dir), tag)


def resolve_data(config) -> list[str]:
    """Dataset directories (each with data/<split>/*.hdf5) for this job.

    data.root set: the datasets found there (all, or those named in data.datasets).
    data.root empty: the miniwell generated into data.cache_dir (generated once, atomically, by
    process 0 when missing).
    """
    from walrus_jax.data import filesystem as fsys

    d = config.data
    if d.root:
        root = d.root if fsys.is_remote(d.root) else os.path.expanduser(d.root)
        if not fsys.isdir(root):  # a URL's store errors (bucket, credentials) name it
            raise PathError(f"config data.root={d.root!r} does not exist")
    else:
        if d.generate != "miniwell":
            raise ConfigError("config data.root is empty and data.generate is not 'miniwell': no data to train on")
        root = generated_data_dir(config)
        if not _dataset_dirs(root) and jax.process_index() == 0:
            _generate_miniwell(root, d.generate_quick, d.generate_systems)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("walrus_jax_miniwell_generated")
    found = _dataset_dirs(root)
    if d.datasets:
        names = {fsys.basename(p): p for p in found}
        missing = [n for n in d.datasets if n not in names]
        if missing:
            raise PathError(f"config data.datasets names {missing}, not found under {root} "
                                    f"(found: {sorted(names)})")
        found = [names[n] for n in d.datasets]
    if not found:
        raise PathError(f"no Well datasets (directories with data/<split>/) under {root}")
    return found


def _generate_miniwell(root: str, quick: bool, systems: str) -> None:
    """Runs the miniwell generator into a temporary directory, then renames it into place, so an
    interrupted generation never leaves a half-written cache."""
    tmp = f"{root}.tmp-{os.getpid()}"
    cmd = [sys.executable, "-m", "walrus_jax.data.miniwell", "--out", tmp] + (["--quick"] if quick else []) \
        + (["--systems", systems] if systems else [])
    log.warning("no data configured: generating the miniwell into %s (%s)", root, " ".join(cmd[1:]))
    os.makedirs(os.path.dirname(root), exist_ok=True)
    subprocess.run(cmd, check=True)
    if os.path.isdir(root):  # another job generated it meanwhile
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, root)


def build_datasets(config, paths, vocab=None):
    """(datasets, weights, batch factors, vocabulary) of the training split (`data.build_datasets`)."""
    from walrus_jax.data import pipeline

    d = config.data
    return pipeline.build_datasets(
        paths, n_steps_input=d.n_steps_input, n_steps_output=d.n_steps_output, min_dt_stride=d.min_dt_stride,
        max_dt_stride=d.max_dt_stride, inflate_to_3d=d.inflate_to_3d, split="train", vocab=vocab,
        allow_new_fields=d.allow_new_fields, seed=config.seed)


def make_pipeline(config, paths, datasets, model_cfg: ModelConfig):
    """The data iterator over `build_datasets`' output. Every process steps through the same *global*
    batches (so a global batch holds one dataset, one shape, on every host) but reads only its own
    rows [p·B/P, (p+1)·B/P) of each (`data.pipeline`): I/O per host falls as 1/P."""
    from walrus_jax.data import pipeline

    d = config.data
    dss, weights, bfactors, vocab = datasets
    norm_stats = pipeline.dataset_norm_stats(paths, dss) if d.normalization == "global" else None
    return pipeline.assemble_pipeline(
        dss, weights, bfactors, vocab, batch_size=micro_batch_size(config), seed=config.seed,
        cfg=model_cfg if config.train.jitter else None, worker_count=d.worker_count, rotate=d.rotate,
        process_index=jax.process_index(), process_count=jax.process_count(), norm_stats=norm_stats,
        max_trajectories=d.max_trajectories, max_samples=d.max_samples)


def load_eval_sets(config, paths, vocab, n_trajectories: int, allow_new_fields: bool):
    """Validation trajectories read as training reads the data (walrus_jax.evaluation)."""
    return evaluation.load_eval_sets(
        paths, n_steps_input=config.data.n_steps_input, n_trajectories=n_trajectories,
        rollout_steps=config.eval.rollout_steps, stride=config.data.min_dt_stride, split=config.eval.split,
        vocab=vocab, allow_new_fields=allow_new_fields, inflate_to_3d=config.data.inflate_to_3d, seed=config.seed,
        normalization=config.data.normalization)


def eval_jitter_key(config):
    """The validation rollouts' jitter key (None: eval.jitter off)."""
    return jax.random.fold_in(jax.random.key(config.seed), 0x5EED) if config.eval.jitter else None


def step_options(config) -> steps.StepOptions:
    t = config.train
    return steps.StepOptions(loss_multiplier=float(t.loss_multiplier), eps=float(t.normalization_eps),
                             jitter=bool(t.jitter), minimum_context=int(t.minimum_context),
                             grad_accum=micro_steps_per_update(config))


def load_batch(mesh, batch) -> tuple[dict, tuple]:
    """This process's rows of a global batch (`make_pipeline`: process p of P holds rows
    [p·B/P, (p+1)·B/P), arrays (B/P, ...)) -> (global device arrays sharded over the mesh, static
    bcs). The rows are taken as they are: `jax.make_array_from_process_local_data` lays them out."""
    dbatch, bcs = steps.device_batch(batch)
    jitter = dbatch.pop("jitter", None)
    n_proc = jax.process_count()
    b = np.shape(dbatch["input_fields"])[0] * n_proc  # the global batch size
    n_dev = sharding.n_devices(mesh)
    if b % n_dev:
        raise DataError(f"a batch of dataset {batch.get('dataset_name', '?')!r} has {b} samples, not divisible by "
                         f"the mesh's {n_dev} devices (data.batch_size and the dataset's batch_downsample_factor "
                         "decide it)")
    local = {}
    for k, v in dbatch.items():
        a = np.asarray(v, np.int32) if k == "field_indices" else np.asarray(v)
        local[k] = a
    out = sharding.global_batch(mesh, local, steps.BATCH_KEYS)
    if jitter is not None:
        rep = sharding.replicated(mesh)
        out["jitter"] = jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(rep, np.asarray(a, np.int32), np.shape(a)), jitter)
    return out, bcs


# ------------------------------------------------------------------------------------- the model
@dataclasses.dataclass
class ModelParts:
    cfg: ModelConfig
    graphdef: Any
    params_abstract: dict  # pure dict of ShapeDtypeStruct
    rest_abstract: dict
    param_shardings: dict
    rest_shardings: dict


def abstract_model(model_cfg: ModelConfig, mesh, rules) -> ModelParts:
    from walrus_jax.models import Walrus

    abstract = nnx.eval_shape(lambda: Walrus(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, p_abs, r_abs = nnx.split(abstract, nnx.Param, ...)
    specs = sharding.param_specs(p_abs, sharding.rules_dict(rules), mesh)
    p_pure, r_pure = nnx.to_pure_dict(p_abs), nnx.to_pure_dict(r_abs)
    rep = sharding.replicated(mesh)
    return ModelParts(model_cfg, graphdef, p_pure, r_pure, sharding.named(mesh, specs),
                      jax.tree.map(lambda _: rep, r_pure))


def init_model(parts: ModelParts, seed: int) -> tuple[dict, dict]:
    """Random parameters (and non-parameter variables) placed with their shardings.

    On accelerators the initialiser is compiled with out_shardings, so each device creates only
    its shard (a 1.3B model never sits whole on one device). On CPU, where compiling the random
    initialisers costs far more than running them, the model is built eagerly and then placed.
    """
    from walrus_jax.models import Walrus

    def make():
        m = Walrus(parts.cfg, rngs=nnx.Rngs(seed))
        _, p, r = nnx.split(m, nnx.Param, ...)
        return nnx.to_pure_dict(p), nnx.to_pure_dict(r)

    if jax.default_backend() == "cpu":
        p, r = make()
        return jax.device_put(p, parts.param_shardings), jax.device_put(r, parts.rest_shardings)
    return jax.jit(make, out_shardings=(parts.param_shardings, parts.rest_shardings))()


def state_shardings(parts: ModelParts, opt: optim.AdamWConfig, mask, mesh) -> tuple[dict, dict]:
    """(abstract state, its shardings) for `steps.init_state`."""
    state_abs = jax.eval_shape(lambda p: steps.init_state(p, opt, jax.random.key(0), mask), parts.params_abstract)
    rep = sharding.replicated(mesh)
    sh = {"params": parts.param_shardings,
          "opt_state": sharding.like_params(state_abs["opt_state"], parts.params_abstract, parts.param_shardings,
                                            mesh),
          "step": rep, "rng": rep}
    return state_abs, sh


def with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ------------------------------------------------------------------------------------- logging
class Progress:
    """One status line: step, loss, steps/s, ETA (carriage-return updates on a terminal)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = time.time()
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0

    def update(self, step: int, loss: float | None, force: bool = False):
        if not self.enabled:
            return
        now = time.time()
        if not force and now - self.last_print < (0.5 if self.tty else 10.0):
            return
        self.last_print = now
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
        width = 30
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        loss_s = f"{loss:.4g}" if loss is not None else "-"
        line = f"[{bar}] step {step}/{self.total} loss {loss_s} | {rate:.2f} steps/s | ETA {eta_s}"
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")


class MetricsWriter:
    """WORKDIR/metrics.jsonl (one JSON object per line) and TensorBoard events (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # tensorboardX is a declared dependency; keep the jsonl log regardless
                log.warning("tensorboardX is not installed: no TensorBoard events")

    def write(self, step: int, values: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(jsonio.dumps({"step": int(step), **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _flat_eval(report: dict, prefix: str = "eval/") -> dict:
    out = {}
    for k, v in report.items():
        if isinstance(v, float):
            out[prefix + k] = v
    for name, e in report.get("datasets", {}).items():
        for k, v in e.items():
            if isinstance(v, dict) and "mean" in v:
                out[f"{prefix}{name}/{k}"] = v["mean"]
    return out


# ------------------------------------------------------------------------------------- the job
def train(config, workdir: str) -> dict:
    """Runs (or resumes) the training job; returns the summary written to WORKDIR/summary.json.
    The workdir is locked for the run (walrus_jax.workdir_lock): a second job on it fails at once."""
    validate_config(config)  # a bad config fails before the workdir (and its lock) is created
    with workdir_lock.hold(os.path.abspath(workdir), primary=jax.process_index() == 0,
                           n_processes=jax.process_count()):
        return _train(config, workdir)


def _train(config, workdir: str) -> dict:
    t_start = time.time()
    validate_config(config)
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    timing: dict[str, float] = {}  # wall-time split, reported in summary.json["timing"]
    t_data = time.time()
    paths = resolve_data(config)
    timing["data_seconds"] = time.time() - t_data

    base_cfg = model_config(config)
    ft = None
    vocab = None
    if config.init_from:
        from walrus_jax import finetune

        ft = finetune.prepare(config)
        base_cfg, vocab = ft.model_cfg, ft.vocab
    # The data's vocabulary decides the model's (new fields add rows), and the pipeline's jitter
    # draws need the final model config: datasets first, then the model, then the pipeline.
    datasets = build_datasets(config, paths, vocab)
    vocab = datasets[3]
    if ft is not None:
        model_cfg = ft.finalize_config(vocab.n_states)
    else:
        model_cfg = base_cfg.replace(n_states=max(base_cfg.n_states, vocab.n_states))
        if model_cfg.n_states != base_cfg.n_states:
            log.warning("the data's field vocabulary has %d entries: model.n_states %d -> %d", vocab.n_states,
                        base_cfg.n_states, model_cfg.n_states)

    it = make_pipeline(config, paths, datasets, model_cfg)
    parts = abstract_model(model_cfg, mesh, config.sharding.rules)
    mask = ft.trainable_mask(parts.params_abstract) if ft is not None else None
    opt = dataclasses.replace(optim.adamw_config(config.train), grad_accum=micro_steps_per_update(config))
    schedule = optim.make_schedule(config.train)
    state_abs, state_sh = state_shardings(parts, opt, mask, mesh)

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                      async_save=config.checkpoint.async_save)
    fp = checkpointing.fingerprint(parts.params_abstract)
    ckpt.check_compatible(model_cfg.to_dict(), fp)

    # ------------------------------------------------------------------ state: resume or fresh
    restored = ckpt.restore_latest(with_shardings(state_abs, state_sh))
    fresh_params, rest = init_model(parts, config.seed)
    losses: list[float] = []
    resumed_from = None
    if restored is not None:
        ck_step, state, meta, data_state = restored
        if data_state is not None:
            it.set_state(data_state)
        losses = [float(v) for v in meta.get("losses", [])]
        resumed_from = int(meta["opt_step"])
        log.warning("resuming from %s/%d (optimizer step %d)", ckpt.directory, ck_step, resumed_from)
    else:
        params = ft.initial_params(parts, fresh_params, config.seed) if ft is not None else fresh_params
        key = jax.random.key(config.seed)
        state = jax.jit(lambda p: steps.init_state(p, opt, key, mask), out_shardings=state_sh,
                        donate_argnums=0)(params)
    start = resumed_from or 0

    opts = step_options(config)
    step_fn = steps.build_train_step(parts.graphdef, opt, schedule, opts, state_sh, parts.rest_shardings, mask)
    meta_base = {"model_config": model_cfg.to_dict(), "fingerprint": fp, "vocab": vocab.to_dict(),
                 "config": json.loads(config.to_json_best_effort()), **(ft.checkpoint_meta() if ft else {})}

    eval_sets = None
    if config.eval.n_trajectories > 0:
        eval_sets = load_eval_sets(config, paths, vocab, config.eval.n_trajectories, config.data.allow_new_fields)

    writer = MetricsWriter(workdir, is_main)
    progress = Progress(config.train.steps, start, is_main)
    pending: list[tuple[int, list, list]] = []  # (step, device losses, grad norms) not yet fetched
    last_loss = losses[-1] if losses else None

    def flush():
        nonlocal last_loss
        for s, ls, gn in pending:
            loss = float(np.mean([float(v) for v in ls]))
            losses.append(loss)
            last_loss = loss
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at optimizer step {s + 1}")
            if (s + 1) % config.train.log_every == 0 or s + 1 == config.train.steps:
                writer.write(s + 1, {"train/loss": loss, "train/grad_norm": float(np.mean([float(v) for v in gn])),
                                     "train/lr": float(schedule(s))})
        pending.clear()

    def save(step_done: int, force: bool = False):
        flush()
        meta = dict(meta_base, opt_step=step_done, losses=losses)
        ckpt.save(step_done, state, meta, it.get_state(), force=force)

    def run_eval(step_done: int):
        model = nnx.merge(parts.graphdef, state["params"], rest)
        report = evaluation.evaluate(model, eval_sets, windows=tuple(tuple(w) for w in config.eval.windows),
                                     batch_size=config.eval.batch_size, jitter=eval_jitter_key(config))
        writer.write(step_done, _flat_eval(report))
        return report

    step = start
    stopped_early = False
    t_loop = time.time()
    timing["setup_seconds"] = t_loop - t_start  # data, model init, optimizer state, eval sets
    first_step = True
    try:
        while step < config.train.steps:
            micro_losses, norms = [], []
            for _ in range(micro_steps_per_update(config)):
                batch, bcs = load_batch(mesh, next(it))
                state, met = step_fn(state, batch, rest, bcs)
                if first_step:  # compile + one execution (blocks once, to time it)
                    jax.block_until_ready(met["loss"])
                    timing["first_step_seconds"] = time.time() - t_loop
                    first_step = False
                micro_losses.append(met["loss"])
                norms.append(met["grad_norm"])
            pending.append((step, micro_losses, norms))
            step += 1
            if step % config.train.log_every == 0 or step == config.train.steps:
                flush()
            progress.update(step, last_loss)
            if config.checkpoint.every and step % config.checkpoint.every == 0 and step < config.train.steps:
                save(step)
            if eval_sets and config.eval.every and step % config.eval.every == 0 and step < config.train.steps:
                run_eval(step)
            if config.train.max_wall_seconds and time.time() - t_start > config.train.max_wall_seconds:
                log.warning("train.max_wall_seconds=%s reached after %d steps: stopping", config.train.max_wall_seconds,
                            step)
                stopped_early = True
                break
        flush()
        progress.update(step, last_loss, force=True)
        progress.close()
        train_seconds = time.time() - t_loop
        timing["train_seconds"] = train_seconds
        if step > start or not ckpt.steps():
            save(step, force=True)
        if ft is not None:  # adapter runs: WORKDIR/adapters, the small delta (walrus_jax/adapters.py)
            ft.write_delta(os.path.join(workdir, "adapters"), state["params"], vocab, meta_base, write=is_main)
        t_eval = time.time()
        report = run_eval(step) if eval_sets else None
        timing["eval_seconds"] = time.time() - t_eval
    finally:
        # Let a started (asynchronous) save finish even when something above failed, so the
        # newest checkpoint is complete; an unfinished one is never listed anyway.
        ckpt.close()
        writer.close()
    summary = write_summary(workdir, losses, step, resumed_from, report, time.time() - t_start, train_seconds,
                            stopped_early, is_main, timing, {"checkpoints_moved_aside": ckpt.moved_aside})
    if report is not None and is_main and config.eval.plot:
        evaluation.plot_rollout(report, eval_sets, os.path.join(workdir, "rollout.png"))
    return summary


def loss_window(n: int) -> int:
    """Steps averaged for initial_loss / final_loss: 5% of the run, between 1 and 20."""
    return max(1, min(20, n // 20))


def write_summary(workdir, losses, steps_done, resumed_from, report, wall, train_seconds, stopped_early,
                  is_main, timing: dict | None = None, notes: dict | None = None) -> dict:
    """WORKDIR/summary.json:
    steps_done, initial_loss / final_loss (means over the first / last `loss_window` steps),
    losses (one per optimizer step, across resumes), resumed_from_step (null if fresh),
    eval {vrmse_1_10, persistence_vrmse_1_10, nrmse_1_10, ... and per dataset}, wall_seconds,
    timing {data_seconds (incl. miniwell generation), setup_seconds (everything before the first
    step), first_step_seconds (compile + one step), train_seconds (the loop, incl. the first step),
    eval_seconds (final rollout evaluation, incl. its compile)}, plus `notes` (e.g.
    checkpoints_moved_aside: unrestorable checkpoints renamed <step>.corrupt-<time>).
    """
    w = loss_window(len(losses))
    summary = {
        "steps_done": int(steps_done),
        "initial_loss": float(np.mean(losses[:w])) if losses else None,
        "final_loss": float(np.mean(losses[-w:])) if losses else None,
        "loss_window": w,
        "losses": losses,
        "resumed_from_step": resumed_from,
        "stopped_early": stopped_early,
        "eval": evaluation.strip_arrays(report) if report is not None else None,
        "train_seconds": train_seconds,
        "wall_seconds": wall,
        "timing": dict(timing or {}),
        **dict(notes or {}),
    }
    if is_main:
        jsonio.write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def evaluate_job(config, workdir: str) -> dict:
    """--mode=eval: rollout metrics of the newest checkpoint in WORKDIR (or of config.init_from when
    WORKDIR has none) on the held-out split of the configured data -> WORKDIR/eval.json."""
    from walrus_jax import finetune
    from walrus_jax.models import Walrus

    workdir = os.path.abspath(workdir)
    source = workdir if finetune._checkpoint_dir(workdir) else config.init_from
    if not source:
        raise PathError(f"--mode=eval: no checkpoint in {workdir}/checkpoints and config init_from is empty")
    base = finetune.load_base(source)
    paths = resolve_data(config)
    sets = load_eval_sets(config, paths, base.vocab, max(1, config.eval.n_trajectories), False)
    abstract = nnx.eval_shape(lambda: Walrus(base.cfg, rngs=nnx.Rngs(0)))
    graphdef, _, r_abs = nnx.split(abstract, nnx.Param, ...)
    rest = jax.jit(lambda: nnx.to_pure_dict(nnx.split(Walrus(base.cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[2]))()
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, base.params), rest)
    report = evaluation.evaluate(model, sets, windows=tuple(tuple(w) for w in config.eval.windows),
                                 batch_size=config.eval.batch_size, jitter=eval_jitter_key(config))
    out = dict(evaluation.strip_arrays(report), checkpoint=base.source)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        jsonio.write_json(os.path.join(workdir, "eval.json"), out)
        if config.eval.plot:
            evaluation.plot_rollout(report, sets, os.path.join(workdir, "eval_rollout.png"))
    return out
