"""Errors a user can cause (bad config, paths, data): the command line prints them as one line.

`walrus_jax.main` catches `UserError` (and OS errors such as a full disk or a read-only directory)
and prints `error: <message>` with exit status 2, no traceback (`--verbose` or WALRUS_JAX_VERBOSE=1
shows it). Anything else is a bug and keeps its traceback. Each class also derives from the builtin
exception it refines, so `except ValueError` keeps working for library users.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import threading
import traceback
from typing import Callable, Iterator


class UserError(Exception):
    """Base class: the message names the file, key, field, axis or shape and what was expected."""


class ConfigError(UserError, ValueError):
    """An invalid config value or key (the message names the key, e.g. `train.steps`)."""


class DataError(UserError, ValueError):
    """Input data that cannot be used (the message names the file, field and what is wrong)."""


class PathError(UserError, FileNotFoundError):
    """A path given by the user that does not exist or is of the wrong kind."""


class HubError(PathError):
    """A model repository, revision or file of the hub that cannot be had: unknown, refused
    credentials, or unreachable with no cached copy (walrus_jax/checkpoints/hub.py)."""


# ------------------------------------------------------------------------------ command lines
VERBOSE_ENV = "WALRUS_JAX_VERBOSE"

# OS errors that mean "the environment refused" (full disk, read-only or forbidden directory) when
# they surface wrapped inside a library's own exception (Orbax re-raises write failures).
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


def verbose_requested(argv=()) -> bool:
    """True when `--verbose` is on the command line or WALRUS_JAX_VERBOSE is 1/true/yes."""
    env = os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return env or any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv)


def _os_error_in_text(exc: BaseException) -> OSError | None:
    """TensorStore (under Orbax) reports a failed write as ValueError("... Failed writing: "path"
    ... [os_error_code='28']"): the OS error it stands for, if it is one of the environment's."""
    m = re.search(r"os_error_code='(\d+)'", str(exc))
    if not m or int(m.group(1)) not in _ENVIRONMENT_ERRNOS:
        return None
    code = int(m.group(1))
    path = re.search(r'(?:Failed writing|local file|Error writing file|file): "([^"]+)"', str(exc))
    return OSError(code, os.strerror(code), path.group(1) if path else None)


def user_facing(exc: BaseException) -> BaseException | None:
    """The exception to print as one line: `exc` itself when it is a UserError or an OSError, else
    an OS error of the environment (full disk, read-only directory, ...) found in its chain of
    causes or in a storage library's message; None when `exc` is a bug (keep the traceback)."""
    if isinstance(exc, (UserError, OSError)):
        return exc
    seen = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
            return e
        found = _os_error_in_text(e)
        if found is not None:
            return found
        e = e.__cause__ or e.__context__
    return None


class _DropBackgroundEcho(logging.Filter):
    """Orbax logs every failure of its writer threads ("_SignalingThread.run() raised an
    exception: ...") before re-raising it in the caller, which reports it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "raised an exception" not in record.getMessage()


class _HoldAsyncioErrors(logging.Filter):
    """asyncio logs its tasks' unretrieved exceptions ("Task exception was never retrieved",
    "Event loop is closed" after a failed write) with a traceback each: held like thread errors."""

    def __init__(self, held: list):
        super().__init__()
        self.held = held

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.exc_info and record.exc_info[0] is not None:
            self.held.append(record.exc_info)
        else:
            self.held.append((RuntimeError, RuntimeError(record.getMessage()[:200]), None))
        return False


@contextlib.contextmanager
def _held_background_errors(held: list) -> Iterator[None]:
    """While a command runs without --verbose, exceptions printed from library threads and
    callbacks (asyncio "Event loop is closed" after a failed write or restore, ...) are held in
    `held` instead of going to stderr (a full disk would otherwise print hundreds of lines): the
    caller prints them in full when the command fails with a bug, counts them in one line when it
    succeeds, and drops them when it ends in a user-facing error, which they only echo."""
    old_hook, old_thread_hook, old_unraisable = sys.excepthook, threading.excepthook, sys.unraisablehook
    sys.excepthook = lambda t, v, tb: held.append((t, v, tb))
    threading.excepthook = lambda a: held.append((a.exc_type, a.exc_value, a.exc_traceback))
    # TensorStore reports exceptions of its completion callbacks as "unraisable".
    sys.unraisablehook = lambda u: held.append((u.exc_type, u.exc_value, u.exc_traceback))
    echo, hold_asyncio = _DropBackgroundEcho(), _HoldAsyncioErrors(held)
    absl_log, asyncio_log = logging.getLogger("absl"), logging.getLogger("asyncio")
    absl_log.addFilter(echo)
    asyncio_log.addFilter(hold_asyncio)
    try:
        yield
    finally:
        sys.excepthook, threading.excepthook, sys.unraisablehook = old_hook, old_thread_hook, old_unraisable
        absl_log.removeFilter(echo)
        asyncio_log.removeFilter(hold_asyncio)


def quiet_after_command(verbose: bool) -> None:
    """For a command line's `__main__`, after the command returned (its last line is printed):
    without --verbose, what library threads and callbacks still report while the interpreter shuts
    down (asyncio tasks that failed with the command: "Event loop is closed", TensorStore callbacks,
    Orbax writer threads) is dropped, as `run_command` held it while the command ran; the command's
    own outcome is already on stderr."""
    if verbose:
        return
    sys.unraisablehook = lambda u: None
    threading.excepthook = lambda a: None
    logging.getLogger("asyncio").addFilter(lambda r: r.levelno < logging.ERROR)
    logging.getLogger("absl").addFilter(_DropBackgroundEcho())


def describe(exc: BaseException) -> str:
    """The message of a user-facing exception (an OSError as "reason: path")."""
    if isinstance(exc, OSError) and exc.strerror:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        hint = {errno.ENOSPC: " (the disk is full)", errno.EDQUOT: " (disk quota exceeded)",
                errno.EROFS: " (read-only file system)", errno.EFBIG: " (file size limit reached)"}.get(exc.errno, "")
        return f"{exc.strerror}{hint}" + (f": {where}" if where else "")
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


def _environment_error_in(held: list) -> OSError | None:
    """The first environment OS error (full disk, read-only directory, ...) among held errors."""
    for _, v, _ in held:
        found = user_facing(v) if isinstance(v, BaseException) else None
        if isinstance(found, OSError) and found.errno in _ENVIRONMENT_ERRNOS:
            return found
    return None


def run_command(fn: Callable[[], int | None], verbose: bool = False) -> int:
    """Runs a command-line body: 0 (or its return value) on success; for a user's mistake or an
    environment error prints `error: <message>` to stderr (the traceback too when `verbose`) and
    returns 2. Any other exception propagates with its traceback (a bug)."""
    held: list = []
    try:
        with contextlib.nullcontext() if verbose else _held_background_errors(held):
            rc = fn()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except BaseException as e:  # noqa: BLE001 - sorted below: user-facing or re-raised
        shown = user_facing(e) if not isinstance(e, SystemExit) else None
        if shown is None and not isinstance(e, SystemExit):
            # A write that failed in a library's thread or event loop (a full disk) can surface in the
            # caller only as its aftermath ("Event loop is closed"): the held cause is the message.
            shown = _environment_error_in(held)
        if shown is None:
            for t, v, tb in held:
                print("error in a background thread or callback:", file=sys.stderr)
                traceback.print_exception(t, v, tb, file=sys.stderr)
            raise
        if verbose:
            traceback.print_exception(e)
        sys.stdout.flush()
        print(f"error: {describe(shown)}", file=sys.stderr, flush=True)
        return 2
    if held:
        kinds = sorted({f"{t.__name__}: {str(v)[:80]}" for t, v, _ in held})
        print(f"note: {len(held)} error(s) in library threads or callbacks did not stop the command "
              f"({'; '.join(kinds[:3])}); --verbose shows them", file=sys.stderr, flush=True)
    return 0 if rc is None else int(rc)
