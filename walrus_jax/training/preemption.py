"""Stopping a training run on request: SIGTERM (how spot/preemptible machines, Kubernetes and SLURM
end a job) or SIGINT (Ctrl-C) finishes the current optimizer update, saves a checkpoint and ends.

    with StopRequest() as stop:
        while ...:
            if stop.now(step):   # step: optimizer updates done so far
                break

Single process: the handlers only set a flag (no I/O inside a signal handler), read between
updates. A second signal of either kind acts at once (the previous handlers are back after the
first one: Ctrl-C twice interrupts the save, a second SIGTERM kills).

Multi-process (jax.distributed): JAX's preemption service owns SIGTERM. Any process that receives
it tells the others through the coordinator and all of them agree on the same update to stop at
(`multihost_utils.reached_preemption_sync_point`, called once per update by every process), so the
checkpoint they write together is consistent. SIGINT keeps its default there (KeyboardInterrupt):
a flag seen by one process only could not be agreed on without a collective every update.

The process then exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the shell's
convention for "ended by this signal": a scheduler must not mistake a stopped run for a finished
one (a Kubernetes Job whose pod exits 0 counts as complete and is never rerun; SLURM's requeue and
Kubernetes' podFailurePolicy can match the code). The checkpoint is complete by then: rerunning
the same command resumes bitwise.
"""
from __future__ import annotations

import signal
import threading

import jax

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The stop flag and its signal handlers (module docstring); a context manager."""

    def __init__(self):
        self.signal: signal.Signals | None = None  # the signal that asked to stop
        self._previous: dict = {}
        self._multi = jax.process_count() > 1

    def __enter__(self) -> "StopRequest":
        # signal.signal works only in the main thread; a run started elsewhere keeps the defaults.
        if not self._multi and threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum)
        self._restore()

    def now(self, steps_done: int) -> bool:
        """True when the run must stop after `steps_done` updates (called once per update)."""
        if self._multi:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(steps_done):
                self.signal = signal.SIGTERM
                return True
            return False
        return self.signal is not None

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signal) if self.signal is not None else 0
