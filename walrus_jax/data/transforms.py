"""Sample transforms: field transforms, 2D -> 3D inflation and the proper rotations of the cube.

All functions are pure: they take a sample dict (see `walrus_jax.data`) and return a new one,
using nothing beyond the sample itself (`field_tensor_orders` says how channels group into
tensors: an order-k channel starts a block of n^k components, row-major over the spatial axes).

Rotations follow the_well's `RandomRotation90`: a signed permutation matrix R (R[i, perm[i]] =
s[i] = +-1) maps a point x to R x, so a field becomes f'(x) = f(R^T x): new axis i is old axis
perm[i], reversed where s[i] = -1; vector components become R u (u'_i = s_i u_perm[i]); rank-2
tensors R T R^T; boundary-condition rows follow their axes and swap [low, high] where an axis is
reversed. Space grids transform as the vector field of coordinates (the_well only moves their
axes; rotating them as vectors keeps grid and data consistent). Non-cartesian samples are returned
unchanged, as in the original.
"""
from __future__ import annotations

import itertools
from typing import Mapping

import numpy as np

from walrus_jax.data.fields import FIELD_TRANSFORMS, FieldVocabulary, normalize_field_transforms
from walrus_jax.models.config import PERIODIC

CARTESIAN_DIMS = ("x", "y", "z")
# Keys holding fields with a channel axis, and the number of leading (time) axes before space.
FIELD_KEYS = {"input_fields": 1, "output_fields": 1, "fields": 1, "constant_fields": 0}


# --------------------------------------------------------------------------- helpers
def _n_var(sample) -> int:
    for key in ("input_fields", "fields"):
        if key in sample:
            return int(sample[key].shape[-1])
    raise KeyError("sample has neither 'input_fields' nor 'fields'")


def _n_spatial(sample) -> int:
    return int(np.asarray(sample["boundary_conditions"]).shape[0])


def channel_groups(orders, n: int) -> list[tuple[int, int]]:
    """(start, order) of every tensor block of a channel list. orders (C,) int; n spatial dims."""
    orders = [int(o) for o in np.asarray(orders).reshape(-1)]
    groups, c = [], 0
    while c < len(orders):
        k = orders[c]
        size = n ** k
        if orders[c:c + size] != [k] * size:
            raise ValueError(f"field_tensor_orders {orders}: channel {c} starts an order-{k} block of {size} "
                             f"components for {n} spatial dims, but the block is {orders[c:c + size]}")
        groups.append((c, k))
        c += size
    return groups


def _is_cartesian(sample) -> bool:
    return str(np.asarray(sample.get("grid_type", "cartesian"))) == "cartesian"


# --------------------------------------------------------------------------- rotations
def proper_rotations(n: int, include_reflections: bool = False) -> np.ndarray:
    """All signed permutation matrices of det +1 (or all of them): int64 (4|24, n, n), identity first.

    n=2: 4 rotations (8 with reflections); n=3: the 24 rotations of the cube (48 with reflections).
    """
    if n not in (1, 2, 3):
        raise ValueError(f"proper_rotations: n must be 1, 2 or 3, got {n}")
    mats = []
    for perm in itertools.permutations(range(n)):
        for signs in itertools.product((1, -1), repeat=n):
            R = np.zeros((n, n), np.int64)
            R[np.arange(n), perm] = signs
            if include_reflections or round(np.linalg.det(R)) == 1:
                mats.append(R)
    return np.stack(mats)


def _decompose(R, n: int) -> tuple[np.ndarray, np.ndarray]:
    R = np.asarray(R)
    if R.shape != (n, n):
        raise ValueError(f"rotation matrix has shape {R.shape}; the sample has {n} spatial dims, expected ({n}, {n})")
    Ri = np.rint(R).astype(np.int64)
    if not np.array_equal(Ri, R) or not (np.abs(Ri).sum(0) == 1).all() or not (np.abs(Ri).sum(1) == 1).all():
        raise ValueError(f"rotation matrix must be a signed permutation matrix (entries 0/+-1, one per row "
                         f"and column), got {R.tolist()}")
    perm = np.abs(Ri).argmax(1)
    signs = Ri[np.arange(n), perm]
    return perm, signs


def _channel_map(orders, perm, signs, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather index and sign per channel so that new[..., c] = sign[c] * old[..., src[c]]."""
    orders = np.asarray(orders).reshape(-1)
    src = np.arange(len(orders))
    sign = np.ones(len(orders), np.float32)
    for start, k in channel_groups(orders, n):
        for comp in itertools.product(range(n), repeat=k):
            new = start + sum(c * n ** (k - 1 - j) for j, c in enumerate(comp))
            src[new] = start + sum(int(perm[c]) * n ** (k - 1 - j) for j, c in enumerate(comp))
            sign[new] = np.prod([signs[c] for c in comp]) if k else 1.0
    return src, sign


def _move_space(arr: np.ndarray, lead: int, perm, signs) -> np.ndarray:
    n = len(perm)
    axes = list(range(lead)) + [lead + int(p) for p in perm] + list(range(lead + n, arr.ndim))
    out = np.transpose(arr, axes)
    flip = tuple(lead + i for i in range(n) if signs[i] < 0)
    return np.flip(out, flip) if flip else out


def rotate(sample: Mapping, R) -> dict:
    """Applies the signed permutation R (n, n) to every field, constant, grid and the BCs (module doc)."""
    out = dict(sample)
    if not _is_cartesian(sample):
        return out
    n = _n_spatial(sample)
    perm, signs = _decompose(R, n)
    orders = np.asarray(sample["field_tensor_orders"])
    c_var = _n_var(sample)
    src, sign = _channel_map(orders, perm, signs, n)
    # Constant channels are numbered after the variable ones in `field_tensor_orders`.
    maps = {"var": (src[:c_var], sign[:c_var]), "con": (src[c_var:] - c_var, sign[c_var:])}
    for key, lead in FIELD_KEYS.items():
        if key not in sample:
            continue
        arr = np.asarray(sample[key])
        s, g = maps["con" if key == "constant_fields" else "var"]
        if arr.ndim != lead + n + 1:
            raise ValueError(f"rotate: {key} has shape {arr.shape}; expected {lead} leading axes, {n} spatial "
                             "axes and a channel axis")
        moved = _move_space(arr, lead, perm, signs)
        out[key] = np.ascontiguousarray(moved[..., s] * g.astype(arr.dtype)) if arr.shape[-1] else \
            np.ascontiguousarray(moved)
    if "padded_field_mask" in sample:
        out["padded_field_mask"] = np.asarray(sample["padded_field_mask"])[src[:c_var]]
    if "space_grid" in sample:
        g = _move_space(np.asarray(sample["space_grid"]), 0, perm, signs)
        out["space_grid"] = np.ascontiguousarray(g[..., perm] * signs.astype(g.dtype))
    bcs = np.asarray(sample["boundary_conditions"])[perm].copy()
    bcs[signs < 0] = bcs[signs < 0][:, ::-1]
    out["boundary_conditions"] = bcs
    return out


# --------------------------------------------------------------------------- inflation
def inflate_to_3d(sample: Mapping, vocab: FieldVocabulary | None = None, n_out: int = 3) -> dict:
    """Embeds an n-D cartesian sample (n < n_out) into n_out dims (walrus' InflatedWellDataset).

    Spatial (H, W) -> (H, W, 1); a vector gets a zero z-component, a rank-2 tensor zero rows and
    columns (names follow x, y, z: velocity_z, D_xz, ...); new BC rows are PERIODIC (a singleton
    axis); the grid gains a zero coordinate; padded_field_mask is False on every variable component
    touching a new axis. field_indices are recomputed from `vocab` (required when present).
    Non-cartesian samples, and samples already n_out-D, are returned unchanged.
    """
    out = dict(sample)
    n = _n_spatial(sample)
    if not _is_cartesian(sample) or n >= n_out:
        return out
    add = n_out - n
    orders = np.asarray(sample["field_tensor_orders"]).reshape(-1)
    names = [str(s) for s in np.asarray(sample["field_names"]).reshape(-1)]
    c_var = _n_var(sample)
    new_names, new_orders, src, real = [], [], [], []
    for start, k in channel_groups(orders, n):
        core = names[start] if k == 0 else names[start].rsplit("_", 1)[0]
        for comp in itertools.product(range(n_out), repeat=k):
            inside = all(c < n for c in comp)
            src.append(start + sum(c * n ** (k - 1 - j) for j, c in enumerate(comp)) if inside else -1)
            real.append(inside)
            new_orders.append(k)
            new_names.append(core if k == 0 else f"{core}_{''.join(CARTESIAN_DIMS[c] for c in comp)}")
    src, real = np.asarray(src), np.asarray(real)
    # Which new channels are variable: blocks keep their position, so the variable blocks come first.
    n_var_new = 0
    for start, k in channel_groups(orders, n):
        if start < c_var:
            n_var_new += n_out ** k
    for key, lead in FIELD_KEYS.items():
        if key not in sample:
            continue
        arr = np.asarray(sample[key])
        arr = arr.reshape(arr.shape[:-1] + (1,) * add + arr.shape[-1:])
        sel = slice(0, n_var_new) if key != "constant_fields" else slice(n_var_new, None)
        s, r = src[sel], real[sel]
        offset = 0 if key != "constant_fields" else c_var
        res = np.zeros(arr.shape[:-1] + (len(s),), arr.dtype)
        if r.any():
            res[..., r] = arr[..., s[r] - offset]
        out[key] = res
    out["field_names"] = np.asarray(new_names)
    out["field_tensor_orders"] = np.asarray(new_orders, np.int64)
    old_mask = np.asarray(sample.get("padded_field_mask", np.ones(c_var, bool)))
    mask = real[:n_var_new].copy()
    mask[mask] = old_mask[src[:n_var_new][mask]]
    out["padded_field_mask"] = mask
    bcs = np.asarray(sample["boundary_conditions"])
    out["boundary_conditions"] = np.concatenate([bcs, np.full((add, 2), PERIODIC, bcs.dtype)])
    if "space_grid" in sample:
        g = np.asarray(sample["space_grid"])
        g = g.reshape(g.shape[:-1] + (1,) * add + g.shape[-1:])
        out["space_grid"] = np.concatenate([g, np.zeros(g.shape[:-1] + (add,), g.dtype)], -1)
    if "field_indices" in sample:
        if vocab is None:
            raise ValueError("inflate_to_3d: the sample has field_indices; pass the FieldVocabulary to recompute "
                             "them for the new component names")
        out["field_indices"] = vocab.indices(new_names, "inflate_to_3d")
    return out


# --------------------------------------------------------------------------- field transforms
def apply_field_transforms(sample: Mapping, transforms: Mapping[str, str], vocab: FieldVocabulary | None = None
                           ) -> dict:
    """Applies {core field name: 'log10' | 'zeros_like'} pointwise and renames to '<transform>_<name>'.

    A tensor field's transform applies to all its components (each renamed). field_indices are
    recomputed from `vocab` when the sample has them. log10 of a non-positive value is an error
    naming the field.
    """
    transforms = normalize_field_transforms(transforms)
    if not transforms:
        return dict(sample)
    out = dict(sample)
    names = [str(s) for s in np.asarray(sample["field_names"]).reshape(-1)]
    orders = np.asarray(sample["field_tensor_orders"]).reshape(-1)
    c_var = _n_var(sample)
    n = _n_spatial(sample)
    plan: dict[int, str] = {}
    for start, k in channel_groups(orders, n):
        core = names[start] if k == 0 else names[start].rsplit("_", 1)[0]
        if core in transforms:
            for c in range(start, start + n ** k):
                plan[c] = transforms[core]
    if not plan:
        return out
    for key in FIELD_KEYS:
        if key not in sample:
            continue
        arr = np.array(sample[key], copy=True)
        offset = c_var if key == "constant_fields" else 0
        for c, t in plan.items():
            local = c - offset
            if not 0 <= local < arr.shape[-1] or (key == "constant_fields") != (c >= c_var):
                continue
            if t == "log10" and not (arr[..., local] > 0).all():
                bad = arr[..., local][~(arr[..., local] > 0)]
                raise ValueError(f"field transform log10 on field {names[c]!r} ({key}): {bad.size} values are "
                                 f"not positive (e.g. {bad.flat[0]!r}); log10 needs positive data")
            arr[..., local] = FIELD_TRANSFORMS[t](arr[..., local])
        out[key] = arr
    new_names = [f"{plan[c]}_{nm}" if c in plan else nm for c, nm in enumerate(names)]
    out["field_names"] = np.asarray(new_names)
    if "field_indices" in sample:
        if vocab is None:
            raise ValueError("apply_field_transforms: pass the FieldVocabulary to recompute field_indices")
        out["field_indices"] = vocab.indices(new_names, "apply_field_transforms")
    return out
