"""Analytic forward FLOPs of Walrus (multiply-adds x 2), used by the benchmarks.

XLA's cost analysis is not usable for this: on GPU it counts a `while` (scan) body once and
custom calls (cuDNN attention) as zero."""
from __future__ import annotations

import numpy as np

from walrus_jax.models import patching
from walrus_jax.models.config import PERIODIC, ModelConfig


def forward_flops(cfg: ModelConfig, spatial, T: int, C: int, B: int = 1, bcs=None, jitter: bool = False) -> float:
    spatial3 = tuple(spatial) + (1,) * (3 - len(spatial))
    bcs = bcs if bcs is not None else ((PERIODIC, PERIODIC),) * len(spatial)
    plans = patching.plan_axes(spatial3, patching.pad_bcs3(bcs), cfg.kernel_sizes, jitter)
    k1, k2 = cfg.kernel_sizes
    H, I, N = cfg.hidden_dim, cfg.intermediate_dim, B * T
    taps1 = np.prod([k1 if p.size > 1 else 1 for p in plans])
    taps2 = np.prod([k2 if p.size > 1 else 1 for p in plans])
    mid = [patching.conv_out(p.padded, k1, p.s1) if p.size > 1 else 1 for p in plans]
    tokens = patching.token_grid(plans, cfg.kernel_sizes)
    L = int(np.prod(tokens))
    enc = 2 * np.prod(mid) * taps1 * (C + 3) * I + 2 * L * taps2 * I * H
    dec = 2 * L * taps2 * H * I + 2 * np.prod(mid) * taps1 * I * C
    block = 2 * L * H * H * (3 + 1 + 7 + 2 + 1) + 4 * L * L * H + 4 * L * T * H
    return float(N * (enc + dec + cfg.n_blocks * block))
