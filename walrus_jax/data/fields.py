"""Field vocabulary and per-dataset field transforms (the released config's `data` section).

The model embeds every input channel through the encoder column of its *field index*: a row of
a vocabulary shared by all datasets. Names are the_well's flattened channel names
(`velocity_x`, `D_xy`, ...); a field transform renames its field to `<transform>_<name>`
(`density` under `zeros_like` becomes `zeros_like_density`), exactly as the original does.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

# The released `data.field_index_map_override`, in index order (tests/fixtures/walrus_extended_config.yaml).
# Rows 0-2 label the encoder's boundary-flag channels (walrus_jax.models.config.FLAG_LABELS).
RELEASED_FIELD_NAMES = (
    "closed_boundary", "open_boundary", "bias_correction", "pressure", "velocity_x", "velocity_y",
    "velocity_z", "zeros_like_density", "speed_of_sound", "concentration", "D_xx", "D_xy", "D_xz",
    "D_yx", "D_yy", "D_yz", "D_zx", "D_zy", "D_zz", "E_xx", "E_xy", "E_xz", "E_yx", "E_yy", "E_yz",
    "E_zx", "E_zy", "E_zz", "density", "energy", "velocity_r", "velocity_theta", "velocity_phi",
    "momentum_x", "momentum_y", "momentum_z", "pressure_re", "pressure_im", "mask",
    "magnetic_field_x", "magnetic_field_y", "magnetic_field_z", "A", "B", "height",
    "internal_energy", "temperature", "electron_fraction", "entropy", "magnetic_field_log_r",
    "magnetic_field_theta", "magnetic_field_phi", "velocity_log_r", "buoyancy", "tracer",
    "log10_density", "log10_temperature", "c_zz", "C_xx", "C_xy", "C_xz", "C_yx", "C_yy", "C_yz",
    "C_zx", "C_zy", "C_zz",
)
RELEASED_FIELD_INDEX_MAP = {name: i for i, name in enumerate(RELEASED_FIELD_NAMES)}
RESERVED_FIELD_NAMES = ("closed_boundary", "open_boundary", "bias_correction")

# Pointwise transforms a dataset may apply to a named field. The key is the name the original
# derives from the torch function (`torch.log10` -> "log10"): it prefixes the field's name.
FIELD_TRANSFORMS = {
    "log10": np.log10,
    "zeros_like": np.zeros_like,
}

# Per-dataset options of the released pretraining mixture (`data.module_parameters.well_dataset_info`).
_3D_HALF = {"step_downsample_factor": 0.5, "batch_downsample_factor": 0.5}
_LOG = {"field_transforms": {"density": "log10", "temperature": "log10"}}
_ZEROS = {"field_transforms": {"density": "zeros_like"}}
RELEASED_DATASET_OPTIONS: dict[str, dict] = {
    "active_matter": {}, "planetswe": {},
    "acoustic_scattering_maze": _ZEROS, "acoustic_scattering_inclusions": _ZEROS,
    "acoustic_scattering_discontinuous": _ZEROS,
    "euler_multi_quadrants_openBC": {}, "euler_multi_quadrants_periodicBC": {},
    "gray_scott_reaction_diffusion": {}, "rayleigh_benard": {}, "shear_flow": {},
    "turbulent_radiative_layer_2D": {}, "helmholtz_staircase": {}, "viscoelastic_instability": {},
    "supernova_explosion_128": {**_3D_HALF, **_LOG}, "turbulence_gravity_cooling": {**_3D_HALF, **_LOG},
    "turbulent_radiative_layer_3D": {**_3D_HALF, **_LOG},
    "MHD_64": dict(_3D_HALF), "rayleigh_taylor_instability": dict(_3D_HALF),
    "flowbench_FPO_NS_2D_512x128_harmonics": {},
}


def transform_key(spec: str) -> str:
    """'torch.log10' / 'np.log10' / 'log10' -> 'log10'; unknown names raise ValueError."""
    key = str(spec).rsplit(".", 1)[-1]
    if key not in FIELD_TRANSFORMS:
        raise ValueError(f"unknown field transform {spec!r}: expected one of {sorted(FIELD_TRANSFORMS)} "
                         "(optionally prefixed, e.g. 'torch.log10')")
    return key


def normalize_field_transforms(transforms: Mapping[str, str] | None) -> dict[str, str]:
    """{'density': 'torch.zeros_like'} -> {'density': 'zeros_like'} (validated)."""
    return {str(k): transform_key(v) for k, v in (transforms or {}).items()}


def flattened_names(core: str, order: int, dim_names: Sequence[str]) -> list[str]:
    """the_well's flattening: order 0 -> [core]; 1 -> core_x, core_y; 2 -> core_xx, core_xy, ...

    Components are row-major over `dim_names` (the file's spatial dimension names).
    """
    if order == 0:
        return [core]
    out = [""]
    for _ in range(order):
        out = [p + d for p in out for d in dim_names]
    return [f"{core}_{s}" for s in out]


class FieldVocabulary:
    """An immutable name -> index map (the encoder/decoder rows). Indices are unique, need not be dense."""

    def __init__(self, mapping: Mapping[str, int]):
        m = {str(k): int(v) for k, v in mapping.items()}
        inv: dict[int, str] = {}
        for k, v in m.items():
            if v < 0:
                raise ValueError(f"field vocabulary: index of {k!r} is {v}; indices must be >= 0")
            if v in inv:
                raise ValueError(f"field vocabulary: {k!r} and {inv[v]!r} share index {v}")
            inv[v] = k
        self._map = m

    @classmethod
    def released(cls) -> "FieldVocabulary":
        return cls(RELEASED_FIELD_INDEX_MAP)

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> "FieldVocabulary":
        return cls(d)

    def to_dict(self) -> dict[str, int]:
        return dict(sorted(self._map.items(), key=lambda kv: kv[1]))

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def __len__(self) -> int:
        return len(self._map)

    def __eq__(self, other) -> bool:
        return isinstance(other, FieldVocabulary) and self._map == other._map

    def __repr__(self) -> str:
        return f"FieldVocabulary({len(self)} fields, n_states={self.n_states})"

    @property
    def n_states(self) -> int:
        """Rows the model needs (ModelConfig.n_states): 1 + the largest index."""
        return 1 + max(self._map.values(), default=-1)

    def index(self, name: str, where: str = "") -> int:
        try:
            return self._map[name]
        except KeyError:
            raise KeyError(
                f"{where + ': ' if where else ''}field {name!r} is not in the field vocabulary "
                f"({len(self)} names, e.g. {list(self._map)[3:8]}); rename the field to a known name, or "
                "extend the vocabulary for fine-tuning (allow_new_fields=True / FieldVocabulary.extend)") from None

    def indices(self, names: Iterable[str], where: str = "") -> np.ndarray:
        return np.asarray([self.index(n, where) for n in names], np.int64)

    def extend(self, names: Iterable[str]) -> "FieldVocabulary":
        """New names get consecutive indices after the largest one, in the order given."""
        m = dict(self._map)
        nxt = self.n_states
        for n in names:
            if n not in m:
                m[n] = nxt
                nxt += 1
        return FieldVocabulary(m)
