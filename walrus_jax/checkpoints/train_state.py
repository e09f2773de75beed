"""Orbax checkpoints of the whole training bundle.

One checkpoint = one directory `WORKDIR/checkpoints/<step>/` holding
  state/   params, optimizer state, micro-step counter, RNG key data (sharded arrays, Orbax)
  meta/    JSON: model config, architecture fingerprint (every parameter's path and shape),
           optimizer step, the data iterators' states (one per process), free-form extras.
Saves are asynchronous (the next train step runs while the previous state is written) and the
last `keep` checkpoints are kept. Orbax writes into a temporary directory and renames it when
complete, so a half-written checkpoint is never listed; a finalized one that fails to restore
(truncated or corrupted files) is skipped with a warning and the previous one is used. The broken
one is moved aside to `<step>.corrupt-<time>` (kept for inspection, no longer listed), so that
training can save that step again; `Checkpointer.moved_aside` lists what was moved.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from walrus_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class CheckpointMismatchError(ConfigError):
    """The workdir holds checkpoints of another architecture / another parameter layout."""


def checkpoint_dir(path: str) -> str | None:
    """The checkpoints folder inside a training workdir (or `path` itself when it is one), or None
    if `path` holds no checkpoint (`<step>/state`)."""
    for cand in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(cand) and any(d.isdigit() and os.path.isdir(os.path.join(cand, d, "state"))
                                       for d in os.listdir(cand)):
            return cand
    return None


def read_params(directory: str, what: str) -> tuple[int, dict, dict]:
    """(step, params as a nested dict of numpy arrays, meta) of the newest readable checkpoint in
    `directory` (a checkpoints/ folder), restored without knowing the model (no shardings, host
    arrays). An unreadable checkpoint is skipped with a warning; DataError naming `what` when none is."""
    mgr = Checkpointer(directory, keep=1_000_000, async_save=False)
    errors = []
    for step in reversed(mgr.steps()):
        try:
            meta = mgr.read_meta(step)
            sdir = os.path.join(directory, str(step), "state")
            c = ocp.PyTreeCheckpointer()
            md = c.metadata(sdir)
            tree = getattr(getattr(md, "item_metadata", md), "tree", getattr(md, "item_metadata", md))
            ra = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            state = c.restore(sdir, args=ocp.args.PyTreeRestore(restore_args=ra))
        except Exception as e:  # noqa: BLE001 - corrupt: previous checkpoint
            log.warning("%s: checkpoint %s/%d unreadable (%s); trying the previous one", what, directory, step, e)
            errors.append(step)
            continue
        return step, state["params"], meta
    raise DataError(f"{what}: no readable checkpoint (tried steps {errors})")


def _encode_process_states(state: Any) -> list:
    """Gathers every process's (JSON-able) data-iterator state into one list, index = process."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.array([raw.size], np.int32))))
    padded = np.zeros((n,), np.uint8)
    padded[: raw.size] = raw
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32)).reshape(-1)
    allb = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), n)
    return [json.loads(bytes(allb[i, : lengths[i]]).decode()) for i in range(len(lengths))]


def jsonable(state: Any) -> Any:
    """Data-iterator states may be bytes (grain's PyGrain iterators): stored as text."""
    if isinstance(state, bytes):
        return {"__bytes__": state.decode("latin-1")}
    return state


def unjsonable(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return state["__bytes__"].encode("latin-1")
    return state


class Checkpointer:
    """Keep-k, asynchronous Orbax checkpoint manager with corrupt-latest fallback."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(directory)
        # [{"step", "moved_to", "error"}] for each checkpoint restore_latest moved aside.
        self.moved_aside: list[dict[str, Any]] = []
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                            create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))

    # ---------------------------------------------------------------------------- query
    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def latest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint whose metadata reads; None if none."""
        for step in reversed(self.steps()):
            try:
                return step, self.read_meta(step)
            except Exception as e:  # noqa: BLE001 - any read failure means "unusable", fall back
                log.warning("checkpoint %s/%d: metadata unreadable (%s: %s); trying the previous one",
                            self.directory, step, type(e).__name__, e)
        return None

    def check_compatible(self, model_config: Mapping[str, Any], param_fingerprint: Mapping[str, list]) -> None:
        """Raises CheckpointMismatchError if the newest checkpoint was written by another architecture.

        Runs before any compute so that a wrong --workdir fails in seconds.
        """
        found = self.latest_meta()
        if found is None:
            return
        step, meta = found
        where = f"{self.directory}/{step}"
        saved_cfg = meta.get("model_config", {})
        diffs = {k: (saved_cfg.get(k), v) for k, v in model_config.items()
                 if k in saved_cfg and _norm(saved_cfg.get(k)) != _norm(v)}
        if diffs:
            pretty = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diffs.items()))
            raise CheckpointMismatchError(
                f"checkpoint {where} was written by another architecture ({pretty}); use another --workdir "
                "or the matching config")
        saved_fp = meta.get("fingerprint", {})
        if saved_fp and saved_fp != dict(param_fingerprint):
            missing = sorted(set(param_fingerprint) - set(saved_fp))[:5]
            extra = sorted(set(saved_fp) - set(param_fingerprint))[:5]
            shape = [(k, saved_fp[k], param_fingerprint[k]) for k in sorted(set(saved_fp) & set(param_fingerprint))
                     if list(saved_fp[k]) != list(param_fingerprint[k])][:5]
            raise CheckpointMismatchError(
                f"checkpoint {where} holds a different parameter layout: missing in checkpoint {missing}, "
                f"unexpected {extra}, shape differences (name, checkpoint, model) {shape}")

    # ---------------------------------------------------------------------------- save
    def save(self, step: int, state: Any, meta: Mapping[str, Any], data_state: Any = None, *,
             force: bool = False) -> bool:
        """Starts an (asynchronous) save of the bundle at `step`. `data_state`: this process's
        iterator state (gathered from all processes here)."""
        meta = dict(meta)
        meta["data_states"] = _encode_process_states(jsonable(data_state))
        meta["step"] = int(step)
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ---------------------------------------------------------------------------- restore
    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, Any] | None:
        """Newest restorable checkpoint -> (step, state, meta, this process's data state).

        abstract_state: a pytree of jax.ShapeDtypeStruct with shardings (the restored arrays get
        them). A checkpoint that fails to restore is skipped with a warning naming it and moved
        aside (`moved_aside`). Returns None when there is no checkpoint at all; raises if every one
        is unreadable (then nothing is moved).
        """
        steps = self.steps()
        if not steps:
            return None
        errors = []
        for step in reversed(steps):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                state, meta = out["state"], out["meta"]
                _check_finite_structure(state, abstract_state, f"{self.directory}/{step}")
            except Exception as e:  # noqa: BLE001 - corrupt / truncated: fall back to the previous one
                msg = f"{type(e).__name__}: {str(e)[:300]}"
                log.warning("checkpoint %s/%d could not be restored (%s); falling back to the previous one",
                            self.directory, step, msg)
                errors.append((step, msg, isinstance(e, CheckpointMismatchError)))
                continue
            for bad, msg, mismatch in errors:
                if not mismatch:  # a readable checkpoint of another layout is not corrupt: leave it
                    self._move_aside(bad, msg)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                # Every process passes here once per restore: process 0's renames are done
                # before anyone lists the steps again.
                multihost_utils.sync_global_devices("checkpointing.restore_latest")
            if errors:
                self.manager.reload()
            states = meta.get("data_states") or [None]
            idx = jax.process_index() if len(states) > jax.process_index() else 0
            return step, state, meta, unjsonable(states[idx])
        raise RuntimeError(f"no checkpoint in {self.directory} could be restored: {[e[:2] for e in errors]}")

    def _move_aside(self, step: int, error: str) -> None:
        """Renames the unrestorable checkpoint `step` to `<step>.corrupt-<time>` (process 0 only:
        the directory is shared by the job) so the step number is free for a new save."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0 and os.path.isdir(src):
            os.rename(src, dst)
            log.warning("checkpoint %s could not be restored; moved aside to %s (kept for inspection)", src, dst)
        self.moved_aside.append({"step": int(step), "moved_to": dst, "error": error})


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def _check_finite_structure(state, abstract_state, where: str) -> None:
    got = jax.tree_util.tree_structure(state)
    want = jax.tree_util.tree_structure(abstract_state)
    if got != want:
        raise CheckpointMismatchError(f"checkpoint {where}: state structure differs from the model's")
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(abstract_state)):
        if tuple(a.shape) != tuple(b.shape):
            raise CheckpointMismatchError(f"checkpoint {where}: array of shape {a.shape}, expected {b.shape}")
