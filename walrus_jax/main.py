"""Entry point: `python -m walrus_jax.main --config configs/demo.py --workdir runs/demo`.

Flags:
  --config PATH.py[:VARIANT]   an ml_collections config file (`get_config(variant)`); the config is
                               locked, so unknown keys fail: `--config.train.steps=100`,
                               `--config.mesh.fsdp=4`, `--config.init_from=ckpt/`.
  --workdir DIR                checkpoints, metrics.jsonl, TensorBoard events, summary.json.
  --mode train|eval|rollout    train (default; resumes from DIR), eval (rollout metrics of the
                               newest checkpoint in DIR -> DIR/eval.json), rollout
                               (walrus_jax.inference.run_rollout_job, configs/rollout.py).
Multi-host: `jax.distributed.initialize` runs when --coordinator_address is given (with
--num_processes / --process_id), or with --distributed=on (cluster auto-detection: TPU pods,
SLURM, ...). On CPU, cross-process collectives use gloo.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Working directory (checkpoints, logs, summary.json).")
flags.DEFINE_enum("mode", None, ["train", "eval", "rollout"],
                  "What to run; default: the config's `mode` entry (configs/rollout.py sets rollout), else train.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize: auto = when --coordinator_address is set; on = always "
                  "(cluster auto-detection); off = never.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_string("cpu_collectives", "gloo", "CPU cross-process collectives implementation (gloo or mpi).")

log = logging.getLogger("walrus_jax")


def init_distributed(mode: str, coordinator_address=None, num_processes=None, process_id=None,
                     cpu_collectives: str = "gloo") -> bool:
    """Initialises jax.distributed when asked (see module docstring). Returns True if it did."""
    import jax

    if mode == "off" or (mode == "auto" and not coordinator_address):
        return False
    if coordinator_address and (num_processes is None or process_id is None):
        raise ValueError("--coordinator_address needs --num_processes and --process_id")
    # CPU collectives must be chosen before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kw = {}
    if coordinator_address:
        kw = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kw)
    return True


def load_config(spec: str, overrides=()):
    """The config that `--config spec --config.k=v ...` gives (same parser, locked). For tests/notebooks."""
    argv = ["walrus_jax", f"--config={spec}"] + [f"--config.{o}" for o in overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def run(config, workdir: str, mode: str = "train") -> dict | None:
    """Dispatches one job (what main() does after flags and distributed init)."""
    if not workdir:
        raise ValueError("--workdir is required")
    if mode == "train":
        from walrus_jax import train

        return train.train(config, workdir)
    if mode == "eval":
        from walrus_jax import train

        return train.evaluate_job(config, workdir)
    if mode == "rollout":
        from walrus_jax import inference

        return inference.run_rollout_job(config, workdir)
    raise ValueError(f"unknown mode {mode!r}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    init_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                     FLAGS.cpu_collectives)
    mode = FLAGS.mode or FLAGS.config.get("mode", "train")
    out = run(FLAGS.config, FLAGS.workdir, mode)
    import jax

    if jax.process_index() == 0 and isinstance(out, dict):
        keys = ("steps_done", "initial_loss", "final_loss", "resumed_from_step", "wall_seconds")
        brief = {k: out[k] for k in keys if k in out}
        ev = out.get("eval") or {}
        for k in ("vrmse_1_10", "persistence_vrmse_1_10"):
            if k in ev:
                brief[k] = ev[k]
        print(json.dumps(brief))


if __name__ == "__main__":
    app.run(main)
