"""Which kernel computes each platform-sensitive operation of the model: the one place that decides.

The model's modules say what they compute (space attention, the q/k norm + RoPE, time attention,
convolutions, the loop over blocks) through `select`; the form is chosen by the platform the program
is compiled for, not by the host's default backend. Under `kernels="auto"`:

- where the program is built for known devices, the builder names their platform while tracing
  (`compile_target`): `wj.jit` from its arguments' devices (or the default device they go to),
  the train and eval steps from their mesh (`tools/aot` lowers them with TPU-placed arguments).
  Only that platform's form is traced;
- elsewhere (a user's own `jax.jit`), every form is traced and `jax.lax.platform_dependent` keeps the
  target platform's when the program is lowered. Differentiated, such a choice carries every form's
  saved residuals (zeros for the forms not taken) out of the forward pass, which XLA does not always
  remove from a scanned stack of blocks: to train, trace under `compile_target` (or use `wj.jit`).

`ModelConfig.kernels` overrides the choice:

- ``"auto"``: the target's forms: CPU kernels for CPU programs (`walrus_jax.cpu_kernels`: fused C++
  attention, q/k norm + RoPE and time attention, matrix-product convolutions, an unrolled block loop
  for short training processors); on TPU Pallas flash attention for space attention
  (`models/flash_attention.py`) and elementwise time attention; cuDNN flash attention for bf16/fp16 on CUDA (float32 there runs
  space attention block by block, `blocked_attention`, so the L x L logits are never all in memory);
  XLA's operations for everything else.
- ``"xla"``: the portable path on every platform: XLA's own operations, the logits of attention
  materialised, a scanned block loop. The reference the specialised forms are tested against.
- ``"cpu"``, ``"tpu"``, ``"gpu"``: that platform's forms whatever the target (tests and benchmarks;
  the TPU forms run on a CPU inside `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`).

Every form of an operation returns the same numbers to float32 rounding.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterable, Iterator

import jax

from walrus_jax.models.config import KERNEL_CHOICES


@functools.cache
def cuda_available() -> bool:
    """Whether this process has a CUDA backend. A CUDA form can only be traced (cuDNN's attention
    checks its library while tracing) and compiled where one is, so `auto` leaves it out elsewhere."""
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("walrus_jax_compile_target", default=None)
PLATFORMS = ("cpu", "tpu", "gpu")


def platform_of(devices: Iterable[jax.Device]) -> str:
    """"cpu", "tpu" or "gpu" (CUDA and ROCm) for a set of devices of one platform."""
    names = {"cuda": "gpu", "rocm": "gpu"}
    found = {names.get(d.platform, d.platform) for d in devices}
    if len(found) != 1:
        raise ValueError(f"devices of several platforms {sorted(found)}: one program runs on one")
    return found.pop()


@contextlib.contextmanager
def compile_target(platform: str | None) -> Iterator[None]:
    """Model code traced inside this context takes `platform`'s forms under kernels="auto" (one of
    PLATFORMS). None changes nothing (an enclosing context, or the choice when lowering, applies)."""
    if platform is None:
        yield
        return
    if platform not in PLATFORMS:
        raise ValueError(f"compile target {platform!r} not in {PLATFORMS}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def known_platform(kernels: str) -> str | None:
    """The platform whose forms `kernels` takes where that is known while tracing ("cpu", "tpu" or
    "gpu" forced, or the compile target under "auto"); None for "xla" and for "auto" without a target."""
    if kernels == "auto":
        return _TARGET.get()
    return kernels if kernels in PLATFORMS else None


def select(kernels: str, *args, xla: Callable, cpu: Callable | None = None, tpu: Callable | None = None,
           gpu: Callable | None = None):
    """`form(*args)` for the form `kernels` (a `KERNEL_CHOICES` entry) picks; a platform without a
    form of its own uses `xla`. Under "auto" the choice is the compile target's (module doc)."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r} not in {KERNEL_CHOICES}")
    forms = {"cpu": cpu, "tpu": tpu, "gpu": gpu}
    if kernels == "auto" and _TARGET.get() is not None:
        kernels = _TARGET.get()
    if kernels != "auto":
        return (forms.get(kernels) or xla)(*args)
    per_platform = {"cpu": cpu, "tpu": tpu, "cuda": gpu if cuda_available() else None}
    per_platform = {name: form for name, form in per_platform.items() if form is not None}
    if not per_platform:
        return xla(*args)
    return jax.lax.platform_dependent(*args, default=xla, **per_platform)
