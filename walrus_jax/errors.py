"""Errors a user can cause (bad config, paths, data): the command line prints them as one line.

`walrus_jax.main` catches `UserError` (and OS errors such as a full disk or a read-only directory)
and prints `error: <message>` with exit status 2, no traceback (`--verbose` or WALRUS_JAX_VERBOSE=1
shows it). Anything else is a bug and keeps its traceback. Each class also derives from the builtin
exception it refines, so `except ValueError` keeps working for library users.
"""
from __future__ import annotations


class UserError(Exception):
    """Base class: the message names the file, key, field, axis or shape and what was expected."""


class ConfigError(UserError, ValueError):
    """An invalid config value or key (the message names the key, e.g. `train.steps`)."""


class DataError(UserError, ValueError):
    """Input data that cannot be used (the message names the file, field and what is wrong)."""


class PathError(UserError, FileNotFoundError):
    """A path given by the user that does not exist or is of the wrong kind."""
