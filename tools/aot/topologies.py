"""TPU slices by their Cloud TPU names, as compile-only devices on any host with libtpu.

Cloud TPU names a v4 or v5p slice by its TensorCores (two per chip: `v5p-64` is 32 chips) and a
v5e or v6e slice by its chips (`v5e-256` is 256 chips). `jax.experimental.topologies` takes the chip
grid instead ("v5p:2x4x4"); either spelling is accepted here.
"""
from __future__ import annotations

import dataclasses
import math

GIB = 2**30
# HBM per chip.
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
# Cloud TPU name -> chip grid.
KNOWN = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4", "v4-128": "v4:4x4x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4",
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8",
    "v5e-64": "v5e:8x8", "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
    "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-64": "v6e:8x8",
    "v6e-256": "v6e:16x16",
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as asked for
    grid: str  # "v5p:2x4x4"
    generation: str  # "v5p"
    chips: int
    hbm_bytes: int


class UnknownTopology(ValueError):
    pass


def resolve(name: str) -> Topology:
    """A Cloud TPU name ("v5p-64") or a chip grid ("v5p:2x4x4") -> Topology; UnknownTopology otherwise."""
    grid = KNOWN.get(name, name)
    generation, _, dims = grid.partition(":")
    try:
        chips = math.prod(int(d) for d in dims.split("x"))
    except ValueError:
        chips = 0
    if generation not in HBM_BYTES or chips <= 0:
        raise UnknownTopology(f"unknown topology {name!r}; known: {', '.join(KNOWN)} "
                              f"(or a chip grid such as v5p:2x4x4, generations {', '.join(HBM_BYTES)})")
    return Topology(name, grid, generation, chips, HBM_BYTES[generation])


def devices(topology: Topology):
    """The slice's compile-only devices, one per chip as JAX sees a real slice (needs libtpu: `pip install
    -e ".[tpu]"`). A v4 chip's two TensorCores run as one device ("megacore", JAX's default on v4); the
    compiler's own default for v4 would be one device per TensorCore."""
    from jax.experimental import topologies

    options = {"chip_config_name": "megacore"} if topology.generation == "v4" else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology.grid, **options).devices)


def hbm_per_device(topology: Topology, n_devices: int) -> int:
    """HBM bytes of one device: the chip's, split between the devices of a chip."""
    return topology.hbm_bytes * topology.chips // n_devices
