"""One trainer per workdir: a lock file `WORKDIR/walrus_jax.lock` held while a job uses it.

Two trainers writing the same checkpoints would delete each other's in-progress saves. The lock
belongs to the job, not to each process: in a multi-process job only process 0 takes it (the
others learn the outcome from it), so the processes of one job never fight over it.

The file is created atomically with its content already in place (written to a private temporary
file, then hard-linked to the lock name, which fails if the name exists), and holds the holder's
pid, host, start time and the process's kernel start time. A second job fails at once naming
the holder. A lock whose holder is dead on this host (no such pid, or the pid now belongs to a
newer process) is stale: it is taken over with a warning. A holder on another host cannot be
checked from here: the message says which file to delete if that job is known to be gone.

    with workdir_lock.hold(workdir):          # raises WorkdirLockedError naming the holder
        ... train ...
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from typing import Iterator

from walrus_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "walrus_jax.lock"


class WorkdirLockedError(UserError, RuntimeError):
    """Another job holds the workdir's lock (the message names its pid, host and start time)."""


def _proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown.
    Tells a live holder from a newer process that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of /proc/<pid>/stat
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _describe(info: dict | None, path: str) -> str:
    if not info:
        return f"an unreadable lock file {path}"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid')} on host {info.get('host')}, started {when}"


def is_stale(info: dict | None) -> bool:
    """True when the holder is known to be gone: same host and its pid is dead or reused."""
    if not info or info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    pid = info["pid"]
    if not _pid_alive(pid):
        return True
    ticks = info.get("proc_start")
    return ticks is not None and _proc_start_ticks(pid) not in (None, ticks)


def acquire(workdir: str) -> dict:
    """Takes the lock of `workdir` (created if needed) for this process; returns what it wrote.
    Raises WorkdirLockedError naming a live holder; takes over a stale lock with a warning."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "proc_start": _proc_start_ticks(os.getpid()), "token": uuid.uuid4().hex}
    tmp = os.path.join(workdir, f".{LOCK_NAME}.{info['token']}")
    with open(tmp, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic; fails when a lock exists
                return info
            except FileExistsError:
                holder = _read(path)
                if not is_stale(holder):
                    raise WorkdirLockedError(
                        f"--workdir {workdir} is in use by another training job ({_describe(holder, path)}); "
                        f"wait for it to finish or use another --workdir. If that job is gone (e.g. it ran on "
                        f"another host that crashed), delete {path}") from None
                log.warning("workdir %s: taking over the stale lock of a job that is no longer running (%s)",
                            workdir, _describe(holder, path))
                # Move the stale file aside rather than deleting it: if two jobs race to take it
                # over, only one rename succeeds and the other re-reads the new holder.
                aside = f"{path}.stale-{info['token']}"
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue
                moved = _read(aside)
                if moved and moved.get("token") != holder.get("token"):
                    # Another job took the stale lock over in between: put its lock back.
                    with contextlib.suppress(FileExistsError):
                        os.link(aside, path)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(aside)
        raise WorkdirLockedError(f"--workdir {workdir}: could not take the lock {path} (other jobs keep taking it)")
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def release(workdir: str, info: dict) -> None:
    """Removes the lock if it is still the one `acquire` wrote (never another job's)."""
    path = os.path.join(workdir, LOCK_NAME)
    held = _read(path)
    if held and held.get("token") == info.get("token"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def hold(workdir: str, *, primary: bool = True, n_processes: int = 1) -> Iterator[dict | None]:
    """The lock of `workdir` for the duration of the block.

    primary: whether this process takes the lock (process 0 of a job). With n_processes > 1 the
    outcome is shared with every process (one collective), so the whole job fails together.
    Yields the lock's content on the primary process, None on the others.
    """
    info, error = None, None
    if primary:
        try:
            info = acquire(workdir)
        except WorkdirLockedError as e:
            error = e
    if n_processes > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            raise WorkdirLockedError(f"--workdir {workdir} is in use by another training job (see process 0)")
    if error is not None:
        raise error
    try:
        yield info
    finally:
        if info is not None:
            release(workdir, info)
