"""The package's import graph (module-level and function-level imports, tools/import_cycles.py) has no cycle."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_import_cycle_in_walrus_jax():
    r = subprocess.run([sys.executable, "-m", "tools.import_cycles", "walrus_jax"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and " 0 cycle(s)" in r.stdout, r.stdout + r.stderr
