"""Entry point: `python -m walrus_jax.main --config configs/demo.py --workdir runs/demo`.

Flags:
  --config PATH.py[:VARIANT]   an ml_collections config file (`get_config(variant)`); the config is
                               locked, so unknown keys fail: `--config.train.steps=100`,
                               `--config.mesh.fsdp=4`, `--config.init_from=ckpt/`.
                               `config.checkpoint` and `config.init_from` also take a hub repository
                               (`polymathic-ai/walrus`, `hf://ORG/NAME@REVISION`) or a folder in the
                               released layout: downloaded and converted once (checkpoints/hub.py).
  --workdir DIR                checkpoints, metrics.jsonl, TensorBoard events, summary.json.
  --mode train|eval|rollout    train (default; resumes from DIR), eval (rollout metrics of the
                               newest checkpoint in DIR -> DIR/eval.json), rollout
                               (walrus_jax.inference.rollout_job, configs/rollout.py).
Multi-host: `jax.distributed.initialize` runs when --coordinator_address is given (with
--num_processes / --process_id), or with --distributed=on (cluster auto-detection: TPU pods,
SLURM, ...). On CPU, cross-process collectives use gloo.

A mistake of the user's (unknown config key, unreadable config file, bad path or data, a full disk
or read-only directory) ends with one line `error: <message>` on stderr and exit status 2; `--verbose`
(or WALRUS_JAX_VERBOSE=1) prints the traceback too.

SIGTERM or SIGINT during training finishes the current update, saves a checkpoint, releases the
workdir lock and ends with one line `stopped: SIGTERM received; training stopped after optimizer
step N ...` and exit status 128 + the signal's number (143, 130); the same command resumes.

On Linux the command first re-executes itself once under glibc's `glibc.malloc.hugetlb=1` tunable,
where the kernel grants transparent huge pages on request: XLA:CPU's per-call buffers then fault in
2 MiB at a time (walrus_jax/huge_pages.py; WALRUS_JAX_HUGE_PAGES=0 turns it off).
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from walrus_jax.errors import ConfigError, PathError, quiet_after_command, run_command, verbose_requested
from walrus_jax.huge_pages import reexec_with_huge_pages



def define_flags(fv: flags.FlagValues, argv) -> None:
    """The command line's flags on `fv`. The config flag learns its `--config.*` overrides from
    `argv`, so every command line gets its own FlagValues (cli() can run in-process, e.g. in tests)."""
    config_flags.DEFINE_config_file("config", None, "Config file (path.py[:variant]).", flag_values=fv,
                                    lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "Working directory (checkpoints, logs, summary.json).", flag_values=fv)
    flags.DEFINE_enum("mode", None, ["train", "eval", "rollout"],
                      "What to run; default: the config's `mode` entry (configs/rollout.py sets rollout), else train.",
                      flag_values=fv)
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                      "jax.distributed.initialize: auto = when --coordinator_address is set; on = always "
                      "(cluster auto-detection); off = never.", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).", flag_values=fv)
    flags.DEFINE_string("cpu_collectives", "gloo", "CPU cross-process collectives implementation (gloo or mpi).",
                        flag_values=fv)
    flags.DEFINE_bool("verbose", False, "Print the traceback of an error (also: env WALRUS_JAX_VERBOSE=1).",
                      flag_values=fv)


log = logging.getLogger("walrus_jax")


def init_distributed(mode: str, coordinator_address=None, num_processes=None, process_id=None,
                     cpu_collectives: str = "gloo") -> bool:
    """Initialises jax.distributed when asked (see module docstring). Returns True if it did."""
    import jax

    if mode == "off" or (mode == "auto" and not coordinator_address):
        return False
    if coordinator_address and (num_processes is None or process_id is None):
        raise ConfigError("--coordinator_address needs --num_processes and --process_id")
    # CPU collectives must be chosen before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kw = {}
    if coordinator_address:
        kw = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kw)
    return True


def load_config(spec: str, overrides=()):
    """The config that `--config spec --config.k=v ...` gives (same parser, locked). For tests/notebooks.
    Raises ConfigError / PathError naming the file or the `--config.key` at fault."""
    argv = ["walrus_jax", f"--config={spec}"] + [f"--config.{o}" for o in overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    parse_flags(fv, argv)
    return fv.config


# ------------------------------------------------------------------------------ flag errors
def _config_spec(argv) -> str | None:
    """The value of --config in argv (forms `--config=X` and `--config X`)."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_config_file(spec: str | None) -> None:
    if not spec:
        return
    path = spec.split(":", 1)[0]
    if not os.path.exists(path):
        raise PathError(f"--config {path}: no such file (expected a Python config file, e.g. configs/demo.py)")
    if not os.path.isfile(path):
        raise PathError(f"--config {path}: not a file (expected a Python config file, e.g. configs/demo.py)")


def _flag_error(e: BaseException, argv) -> ConfigError:
    """A config-flag parsing failure (absl / ml_collections) as one ConfigError naming the flag."""
    spec = _config_spec(argv)
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, SyntaxError):
        path = (spec or "").split(":", 1)[0]
        why = "it is a binary file" if "null bytes" in str(e.msg) or "codec can't decode" in str(e.msg) else \
            f"{e.msg} at line {e.lineno}"
        return ConfigError(f"--config {path}: not a readable Python config file ({why})")
    if isinstance(e, (KeyError, AttributeError)):
        # ml_collections: "'stpes'\nDid you mean \"steps\" instead of \"stpes\"?" (quoted once more).
        names = re.findall(r"[\\']*'([^'\\]+)[\\']*'", msg)
        key = names[0] if names else msg.strip("'\"")
        hint = re.search(r'Did you mean \\?"([^"\\]+)\\?"', msg)
        flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.")
                     and key in a.split("=", 1)[0].split(".")), None)
        where = f"{flag}: " if flag else ""
        return ConfigError(f"{where}the config ({spec}) has no key {key!r}"
                           + (f"; did you mean {hint.group(1)!r}?" if hint else ""))
    if isinstance(e, flags.UnrecognizedFlagError):
        if msg.startswith("Unknown command line flag 'config.") and spec is None:
            return ConfigError(f"{msg}: --config is required before --config.* overrides")
        return ConfigError(f"{msg} (see --help)")
    if isinstance(e, flags.Error):
        if "Traceback (most recent call last)" in msg:  # the config file's own get_config raised
            head = msg.split(":", 1)[0] if msg.startswith("flag ") else f"--config {spec}"
            last = [ln for ln in msg.splitlines() if ln.strip()][-1]
            return ConfigError(f"{head.removeprefix('flag ')}: {last}")
        return ConfigError(msg.removeprefix("flag "))
    return ConfigError(f"--config {spec}: {type(e).__name__}: {msg}")


def parse_flags(flag_values, argv) -> list[str]:
    """flag_values(argv) with every parsing failure raised as ConfigError / PathError naming the flag."""
    _check_config_file(_config_spec(argv))
    try:
        rest = flag_values(argv)
        if "config" in flag_values and flag_values["config"].present:
            flag_values.config.get("mode")  # a config file that failed to load raises on first access
    except (ConfigError, PathError):
        raise
    except Exception as e:  # noqa: BLE001 - any failure here comes from the user's flags or config file
        raise _flag_error(e, argv) from e
    return rest


def resolve_checkpoints(config) -> None:
    """Replaces a hub repository (ORG/NAME, hf://...) or a released-layout folder in config.checkpoint
    / config.init_from by its converted directory (walrus_jax.checkpoints.hub: downloaded and
    converted on first use, from the cache after). Other values are left to the job's own checks."""
    from walrus_jax.checkpoints import hub

    for key in ("checkpoint", "init_from"):
        value = config.get(key)
        if not value or not isinstance(value, str):
            continue
        if hub.is_repo_reference(value) or os.path.exists(value):
            resolved = hub.resolve(value, what=f"config.{key}")
            if resolved != value:
                logging.getLogger(__name__).info("config.%s=%s: %s", key, value, resolved)
                config[key] = resolved


def run(config, workdir: str, mode: str = "train") -> dict | None:
    """Dispatches one job (what main() does after flags and distributed init)."""
    if not workdir:
        raise ConfigError("--workdir is required")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise PathError(f"--workdir {workdir}: is a file, not a directory")
    resolve_checkpoints(config)
    if mode == "train":
        from walrus_jax.training.loop import train

        return train(config, workdir)
    if mode == "eval":
        from walrus_jax.inference.evaluation import evaluate_job

        return evaluate_job(config, workdir)
    if mode == "rollout":
        from walrus_jax.inference.rollout_job import run_rollout_job

        return run_rollout_job(config, workdir)
    raise ConfigError(f"unknown mode {mode!r}: expected train, eval or rollout")


def stopped_line(out: dict, total_steps: int) -> str:
    """The one line a run stopped by a signal ends with: where it stopped and how to go on."""
    where = out.get("stopped_checkpoint") or "no checkpoint (no update was done)"
    return (f"stopped: {out['stopped_by']} received; training stopped after optimizer step {out['steps_done']} "
            f"of {total_steps}, checkpoint {where}; run the same command to resume")


def main(fv: flags.FlagValues, argv) -> int | None:
    """The command after flag parsing (fv: the parsed flags; argv: what the flags left). Returns
    the exit status: None (0), or 128 + the signal's number when SIGTERM / SIGINT stopped the
    training (walrus_jax/training/preemption.py says why not 0)."""
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {argv[1:]}")
    if fv.config is None:
        raise ConfigError("--config is required, e.g. --config configs/demo.py")
    if not fv.workdir:
        raise ConfigError("--workdir is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    init_distributed(fv.distributed, fv.coordinator_address, fv.num_processes, fv.process_id, fv.cpu_collectives)
    mode = fv.mode or fv.config.get("mode", "train")
    out = run(fv.config, fv.workdir, mode)
    import jax

    if jax.process_index() == 0 and isinstance(out, dict):
        keys = ("steps_done", "initial_loss", "final_loss", "resumed_from_step", "wall_seconds")
        brief = {k: out[k] for k in keys if k in out}
        if mode == "eval":  # the report itself: its headline numbers and the checkpoint
            brief = {k: v for k, v in out.items() if v is None or isinstance(v, (int, float, str))}
        ev = out.get("eval") or {}
        for k in ("vrmse_1_10", "persistence_vrmse_1_10"):
            if k in ev:
                brief[k] = ev[k]
        print(json.dumps(brief))
    if isinstance(out, dict) and out.get("stopped_by"):
        import signal

        if jax.process_index() == 0:
            sys.stdout.flush()
            print(stopped_line(out, fv.config.train.steps), file=sys.stderr, flush=True)
        return 128 + int(signal.Signals[out["stopped_by"]])
    return None


def cli(argv=None) -> int:
    """Parses the flags and runs main; returns the exit status (2 and one `error:` line for a user's
    mistake, see the module docstring)."""
    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    define_flags(fv, argv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(fv.get_help())
        return 0
    return run_command(lambda: main(fv, parse_flags(fv, argv)), verbose_requested(argv))


if __name__ == "__main__":
    reexec_with_huge_pages()  # once, before any work: glibc reads its tunables only at start-up
    rc = cli()
    quiet_after_command(verbose_requested(sys.argv))
    sys.stdout.flush()
    sys.stderr.flush()
    if rc:
        # Everything is written by now (the job's finally blocks ran); leave at once instead of
        # waiting for library threads (checkpoint writers, data workers) that may never finish.
        os._exit(rc)
    sys.exit(rc)
