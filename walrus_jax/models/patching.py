"""The static patching plan: stride table, boundary-condition checks, padding per axis and token
grid, and the padding / flagging of the input and its inverse on the decoder output (docs/original.md).

Everything that decides a *shape* (strides, paddings, token counts) is plain Python on static
shapes and boundary conditions; the only traced input is the patch roll of a `Jitter`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from walrus_jax.models.config import BC_NAMES, PERIODIC

# patch size -> (s1, s2) of the two encoder convolutions (the decoder uses them in reverse). 0 is
# used for singleton axes.
STRIDE_TABLE = {0: (1, 1), 1: (1, 1), 4: (2, 2), 8: (4, 2), 12: (6, 2), 16: (4, 4), 24: (6, 4), 32: (8, 4)}


def _target_tokens(n_non_singleton: int) -> int:
    return 16 if n_non_singleton == 3 else 32


def supported_sizes(n_non_singleton: int) -> list[int]:
    target = _target_tokens(n_non_singleton)
    return sorted(p * target for p in STRIDE_TABLE if p > 0)


def normalize_bcs(bcs, n_dims: int | None = None) -> tuple[tuple[int, int], ...]:
    """bcs (n_dims, 2) array / nested list -> tuple of (low, high) int pairs (static).

    Raises a clear error for traced values (bcs decide shapes, so they must be concrete) and for
    codes outside {WALL=0, OPEN=1, PERIODIC=2}.
    """
    if isinstance(bcs, jax.core.Tracer):
        raise TypeError("bcs must be concrete (numpy / nested lists): boundary conditions decide padding "
                        "shapes, so they cannot be traced; pass them as a static argument")
    arr = np.asarray(bcs)
    if arr.ndim == 3:  # (B, n_dims, 2) as datasets produce: the original uses only bcs[0]
        if arr.shape[0] > 1 and not (arr == arr[:1]).all():
            raise ValueError(f"bcs (B, n_dims, 2) = {arr.shape} differ across the batch; the model uses one "
                             "set of boundary conditions per batch (the original reads only bcs[0])")
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"bcs must have shape (n_spatial_dims, 2) = [low, high] per axis, got {arr.shape}")
    if n_dims is not None and arr.shape[0] != n_dims:
        raise ValueError(f"bcs has {arr.shape[0]} rows but the input has {n_dims} spatial axes; "
                         "expected shape ({n_dims}, 2)")
    if not np.isin(arr, list(BC_NAMES)).all():
        raise ValueError(f"bcs codes must be WALL=0, OPEN=1 or PERIODIC=2, got {arr.tolist()}")
    return tuple((int(lo), int(hi)) for lo, hi in arr)


def pad_bcs3(bcs: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Extends a BC list to 3 axes with PERIODIC (only ever used for singleton axes)."""
    return tuple(bcs) + ((PERIODIC, PERIODIC),) * (3 - len(bcs))


def choose_strides(spatial3: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(H, W, D) -> ((s1, s2),) * 3 from the deterministic stride table: the target is
    32 tokens per axis with one or two non-singleton axes, 16 with three; patch = size // target."""
    n_ns = sum(1 for n in spatial3 if n > 1)
    target = _target_tokens(n_ns)
    out = []
    for axis, n in enumerate(spatial3):
        if n == 1:
            out.append(STRIDE_TABLE[0])
            continue
        patch = n // target
        if n % target or patch not in STRIDE_TABLE or patch == 0:
            raise ValueError(
                f"spatial size {n} on axis {axis} of shape {tuple(spatial3)} is not supported by the stride "
                f"table: with {n_ns} non-singleton axes the supported sizes are {supported_sizes(n_ns)} (or 1)")
        out.append(STRIDE_TABLE[patch])
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """Static padding plan for one spatial axis."""

    size: int  # unpadded length
    s1: int
    s2: int
    periodic: bool
    const_pad: int  # zeros on each side (non-periodic axes)
    periodic_pad: int  # circular padding on each side (periodic axes)
    rolls: bool  # whether a jitter roll is drawn for this axis

    @property
    def padded(self) -> int:
        return self.size + 2 * self.const_pad + 2 * self.periodic_pad

    @property
    def stride(self) -> int:
        return self.s1 * self.s2


def plan_axes(spatial3: Sequence[int], bcs3, kernel_sizes=(8, 4), jitter: bool = False) -> tuple[AxisPlan, ...]:
    """Padding per axis: with effective patch P = k1 + s1 (k2 - 1) and stride S = s1 s2, extra =
    (P - S) // 2 circular (periodic axes) or zero (WALL/OPEN) samples per side. `jitter` adds S//2
    zeros on each side of non-periodic axes."""
    k1, k2 = kernel_sizes
    plans = []
    for n, (s1, s2), (lo, _hi) in zip(spatial3, choose_strides(spatial3), bcs3):
        if n == 1:
            plans.append(AxisPlan(1, 1, 1, lo == PERIODIC, 0, 0, False))
            continue
        patch, stride = k1 + s1 * (k2 - 1), s1 * s2
        extra = (patch - stride) // 2
        if lo == PERIODIC:
            plans.append(AxisPlan(n, s1, s2, True, 0, extra, jitter and stride > 1))
        else:
            plans.append(AxisPlan(n, s1, s2, False, extra + (stride // 2 if jitter else 0), 0, jitter and stride > 1))
    return tuple(plans)


def conv_out(n: int, k: int, s: int) -> int:
    return (n - k) // s + 1 if n > 1 else 1


def token_grid(plans: Sequence[AxisPlan], kernel_sizes=(8, 4)) -> tuple[int, ...]:
    k1, k2 = kernel_sizes
    return tuple(conv_out(conv_out(p.padded, k1, p.s1), k2, p.s2) if p.size > 1 else 1 for p in plans)


# ------------------------------------------------------------------------- padding and flags
def _widths(plans: Sequence[AxisPlan], ndim: int, axes: Sequence[int], width) -> list[tuple[int, int]]:
    out = [(0, 0)] * ndim
    for a, p in zip(axes, plans):
        out[a] = (width(p), width(p))
    return out


def flag_grid(plans: Sequence[AxisPlan], bcs3) -> np.ndarray:
    """The boundary flags [bias, wall, open] on the zero-padded grid, (H'', W'', D'', 3) float32 (before
    the roll and the circular padding): static, from shapes and BCs only."""
    shape = tuple(p.size + 2 * p.const_pad for p in plans)
    flags = np.zeros(shape + (3,), np.float32)
    flags[..., 0] = 1.0
    for a, (p, (lo, hi)) in enumerate(zip(plans, bcs3)):
        if p.periodic or p.size == 1:
            continue
        for code, side in ((lo, "low"), (hi, "high")):
            idx = [slice(None)] * 3
            # The original's quirk, reproduced: a high pad of 0 selects the whole axis via `[-0:]`.
            idx[a] = slice(0, p.const_pad) if side == "low" else slice(-p.const_pad, None)
            sl = tuple(idx)
            flags[sl + (1 + code,)] += 1.0
            flags[sl + (0,)] = 0.0
    return flags


def zero_pad(x: jax.Array, plans: Sequence[AxisPlan], axes: Sequence[int] = (1, 2, 3)) -> jax.Array:
    """Zero padding of the non-periodic axes (`axes`: where H, W, D are in x)."""
    return jnp.pad(x, _widths(plans, x.ndim, axes, lambda p: p.const_pad))


def roll_and_wrap(x: jax.Array, plans: Sequence[AxisPlan], patch_shift: jax.Array | None,
                  axes: Sequence[int] = (1, 2, 3)) -> jax.Array:
    """The jitter roll of the zero-padded grid, then the circular padding of the periodic axes."""
    if patch_shift is not None:
        for i, (a, p) in enumerate(zip(axes, plans)):
            if p.rolls:
                x = jnp.roll(x, patch_shift[i], axis=a)
    widths = _widths(plans, x.ndim, axes, lambda p: p.periodic_pad)
    if any(w != (0, 0) for w in widths):
        x = jnp.pad(x, widths, mode="wrap")
    return x


def pad_and_flag(x: jax.Array, plans: Sequence[AxisPlan], bcs3, patch_shift: jax.Array | None) -> jax.Array:
    """Zero padding of non-periodic axes, boundary flags on that grid, roll, then circular padding of
    periodic axes (the original's order, so the periodic wrap includes the rolled flags).

    x: (N, H, W, D, C) channels-last -> (N, H', W', D', C + 3) with flag channels
    [bias, wall, open] appended after the C fields.
    """
    x = zero_pad(x, plans)
    flags = jnp.asarray(flag_grid(plans, bcs3), x.dtype)
    x = jnp.concatenate([x, jnp.broadcast_to(flags, (x.shape[0],) + flags.shape)], axis=-1)
    return roll_and_wrap(x, plans, patch_shift)


def unjitter(y: jax.Array, plans: Sequence[AxisPlan], patch_shift: jax.Array | None,
             axes: Sequence[int] = (1, 2, 3)) -> jax.Array:
    """Inverse of the padding / roll on the decoder output: crop the periodic padding, roll back,
    crop the zero padding. y: (N, H', W', D', C), or H', W', D' at `axes`."""
    def crop(y, lo, length):
        sl = [slice(None)] * y.ndim
        for a, p in zip(axes, plans):
            sl[a] = slice(lo(p), lo(p) + length(p))
        return y[tuple(sl)]

    y = crop(y, lambda p: p.periodic_pad, lambda p: p.padded - 2 * p.periodic_pad)
    if patch_shift is not None:
        for i, (a, p) in enumerate(zip(axes, plans)):
            if p.rolls:
                y = jnp.roll(y, -patch_shift[i], axis=a)
    return crop(y, lambda p: p.const_pad, lambda p: p.size)
