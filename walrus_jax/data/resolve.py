"""The dataset directories a job's config names, generating the miniwell when none is configured.

    paths = resolve_data(config)     # [dataset dir with data/<split>/*.hdf5, ...]

config.data.root set: the datasets found there (all, or those named in config.data.datasets), a
local path or a URL (walrus_jax.data.filesystem). Empty: the miniwell generated once into
config.data.cache_dir by process 0 (in a subprocess, written into a temporary directory that is
renamed into place, so an interrupted generation never leaves a half-written cache).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import jax

from walrus_jax.data import filesystem as fsys
from walrus_jax.errors import ConfigError, PathError

log = logging.getLogger(__name__)


def dataset_dirs(root: str) -> list[str]:
    """The dataset folders (holding data/) under `root`: a local path or a URL."""
    if not fsys.isdir(root):
        return []
    return [p for p, is_dir in fsys.listdir(root) if is_dir and fsys.isdir(fsys.join(p, "data"))]


def generated_data_dir(config) -> str:
    """Where the miniwell for this config is (or will be) generated."""
    d = config.data
    tag = ("quick" if d.generate_quick else "full") + (f"-{d.generate_systems.replace(',', '-')}"
                                                       if d.generate_systems else "")
    return os.path.join(os.path.expanduser(d.cache_dir), tag)


def _not_a_folder(given: str, root: str) -> str:
    """Why data.root is not a folder of datasets, in words."""
    if fsys.is_remote(root) and fsys.isfile(root):
        what = ("answers with a page that links to no entries" if root.startswith(("http://", "https://"))
                else "is a file")
        return (f"config data.root={given!r} {what}: expected a folder of dataset folders (over HTTP, a directory "
                "index linking to them, as `python -m walrus_jax.data.serve DIR` serves)")
    if not fsys.is_remote(root) and os.path.isfile(root):
        return f"config data.root={given!r} is a file: expected a folder holding dataset folders (each with data/)"
    return f"config data.root={given!r} does not exist"


def resolve_data(config) -> list[str]:
    """Dataset directories (each with data/<split>/*.hdf5) for this job (module docstring)."""
    d = config.data
    if d.root:
        root = d.root if fsys.is_remote(d.root) else os.path.expanduser(d.root)
        if not fsys.isdir(root):  # a URL's store errors (bucket, credentials) name it
            raise PathError(_not_a_folder(d.root, root))
    else:
        if d.generate != "miniwell":
            raise ConfigError("config data.root is empty and data.generate is not 'miniwell': no data to train on")
        root = generated_data_dir(config)
        if not dataset_dirs(root) and jax.process_index() == 0:
            generate_miniwell(root, d.generate_quick, d.generate_systems)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("walrus_jax_miniwell_generated")
    found = dataset_dirs(root)
    if d.datasets:
        names = {fsys.basename(p): p for p in found}
        missing = [n for n in d.datasets if n not in names]
        if missing:
            raise PathError(f"config data.datasets names {missing}, not found under {root} (found: {sorted(names)})")
        found = [names[n] for n in d.datasets]
    if not found:
        raise PathError(f"no Well datasets (directories with data/<split>/) under {root}")
    return found


def generate_miniwell(root: str, quick: bool, systems: str) -> None:
    """Runs the miniwell generator (`python -m walrus_jax.data.miniwell`: a fresh process, so its
    simulations never share this one's jax state) into a temporary directory, then renames it into place."""
    tmp = f"{root}.tmp-{os.getpid()}"
    cmd = [sys.executable, "-m", "walrus_jax.data.miniwell", "--out", tmp] + (["--quick"] if quick else []) \
        + (["--systems", systems] if systems else [])
    log.warning("no data configured: generating the miniwell into %s (%s)", root, " ".join(cmd[1:]))
    os.makedirs(os.path.dirname(root), exist_ok=True)
    subprocess.run(cmd, check=True)
    if os.path.isdir(root):  # another job generated it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, root)
