"""Builds the project's C++ CPU kernels on first use and registers them with XLA (FFI).

The kernels are compiled for the host CPU (`-march=native`) by the system's C++ compiler the first
time a process needs them, then cached. The cache key covers the source and the shared headers
(`*.h` here), the compiler, the flags,
jaxlib (whose FFI headers the source includes) and the CPU's instruction-set flags, so a home
directory shared by different machines gets one build per kind of CPU. A build is written to a
temporary file and renamed into place: concurrent first uses cannot see half a library.

Settings (environment):
  WALRUS_JAX_CPU_KERNELS=0     never build or use them (XLA's own operations are used instead)
  WALRUS_JAX_KERNEL_CACHE=DIR  where builds are kept (default: ~/.cache/walrus_jax/kernels)
  CXX                          the compiler (default: c++)

Without a working compiler, or when the build fails, a warning names the reason once and the
callers fall back to XLA's operations: the numbers are the same to float32 rounding, only slower.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import subprocess
import tempfile
import warnings

import jax
import jaxlib

SOURCE_DIR = pathlib.Path(__file__).resolve().parent
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared")
BUILD_TIMEOUT_S = 600


def enabled() -> bool:
    """False when WALRUS_JAX_CPU_KERNELS=0 (or false/no/off)."""
    return os.environ.get("WALRUS_JAX_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("WALRUS_JAX_KERNEL_CACHE")
                        or pathlib.Path.home() / ".cache" / "walrus_jax" / "kernels")


def _cpu_flags() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "c++"))


def _build_key(source: bytes, compiler: list[str]) -> str:
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C++ compiler ({' '.join(compiler)}: {e})") from e
    h = hashlib.sha256()
    headers = b"".join(p.read_bytes() for p in sorted(SOURCE_DIR.glob("*.h")))  # the kernels' shared code
    for part in (source, headers, version.encode(), " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                 _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _build(name: str) -> pathlib.Path:
    """Path of the shared library for walrus_jax/cpu_kernels/<name>.cc, compiling it if needed."""
    src = SOURCE_DIR / f"{name}.cc"
    compiler = _compiler()
    out = cache_dir() / f"{name}-{_build_key(src.read_bytes(), compiler)}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [*compiler, *FLAGS, f"-I{SOURCE_DIR}", f"-I{jax.ffi.include_dir()}", str(src), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"`{' '.join(cmd)}` failed: " + " | ".join(tail))
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"`{' '.join(cmd)}` could not run: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def load(name: str, symbols: tuple[str, ...]) -> bool:
    """Builds (or finds) kernel `name`, registers each handler symbol as the XLA:CPU FFI target of the
    same name, and says whether that worked. Cached per process; warns once on failure."""
    if not enabled():
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(name)))
        for symbol in symbols:
            jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (RuntimeError, OSError, AttributeError) as e:
        warnings.warn(f"walrus_jax: CPU kernel '{name}' unavailable, using XLA's operations instead "
                      f"(slower, same numbers): {e}", RuntimeWarning, stacklevel=2)
        return False
    return True
