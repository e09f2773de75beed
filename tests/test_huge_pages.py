"""walrus_jax.huge_pages: the command-line entry points re-execute once under glibc's huge-page
tunable, only where it helps, keeping their command line and the user's own tunables."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from walrus_jax import huge_pages
from walrus_jax.huge_pages import huge_page_environment

GLIBC, LINUX = (2, 36), "linux"


def test_adds_the_tunable_where_it_helps():
    env = huge_page_environment({"PATH": "/bin"}, LINUX, GLIBC, "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # the user's other tunables are kept, in order
    env = huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, LINUX, GLIBC, "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ,platform,glibc,mode", [
    ({}, LINUX, GLIBC, "always"),                     # every large mapping gets huge pages already
    ({}, LINUX, GLIBC, "never"),                      # none can
    ({}, LINUX, GLIBC, None),                         # no transparent huge pages in this kernel
    ({}, LINUX, (2, 34), "madvise"),                  # glibc before the tunable
    ({}, LINUX, None, "madvise"),                     # another C library (musl)
    ({}, "darwin", None, None),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, LINUX, GLIBC, "madvise"),   # our own re-execution
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, LINUX, GLIBC, "madvise"),   # the user said no
    ({"WALRUS_JAX_HUGE_PAGES": "0"}, LINUX, GLIBC, "madvise"),
    ({"WALRUS_JAX_HUGE_PAGES": "off"}, LINUX, GLIBC, "madvise"),
])
def test_leaves_the_process_alone_otherwise(environ, platform, glibc, mode):
    assert huge_page_environment(environ, platform, glibc, mode) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert huge_pages.thp_mode(str(f)) == "madvise"
    assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


def test_reexecution_keeps_the_command_line_and_happens_once():
    """A real re-execution on this machine (when it qualifies): the interpreter's options and the
    arguments survive, and the second process does not re-execute again."""
    code = ("import os, sys; from walrus_jax.huge_pages import reexec_with_huge_pages; "
            "print('start', flush=True); reexec_with_huge_pages(); "
            "print(bool(sys.flags.dont_write_bytecode), sys.argv[1:], os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "WALRUS_JAX_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-B", "-c", code, "a", "--b=1"], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split("\n")
    expected = huge_page_environment(env, sys.platform, huge_pages.glibc_version(), huge_pages.thp_mode())
    tunables = expected["GLIBC_TUNABLES"] if expected else None
    starts = 2 if expected else 1
    assert out[:starts] == ["start"] * starts
    assert out[starts] == f"True ['a', '--b=1'] {tunables}"


def test_huge_pages_only_for_cpu_jobs():
    assert huge_pages.cpu_job({"JAX_PLATFORMS": "cpu"}, accelerator_files=True)
    assert not huge_pages.cpu_job({"JAX_PLATFORMS": "tpu,cpu"}, accelerator_files=False)
    assert not huge_pages.cpu_job({}, accelerator_files=True)
    assert huge_pages.cpu_job({}, accelerator_files=False)
    env = {"PATH": os.environ.get("PATH", "")}
    assert huge_pages.huge_page_environment(env, "linux", (2, 39), "madvise", on_cpu=False) is None
    assert huge_pages.huge_page_environment(env, "linux", (2, 39), "madvise", on_cpu=True) is not None
