"""Model configuration: a frozen dataclass the model sees, with presets and a reader for the
released `extended_config.yaml` model section."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

# Boundary-condition codes of the_well.
WALL, OPEN, PERIODIC = 0, 1, 2
BC_NAMES = {WALL: "WALL", OPEN: "OPEN", PERIODIC: "PERIODIC"}

# RMSGroupNorm's eps: the original calls rms_norm without eps, so torch uses float32 machine eps.
RMS_NORM_EPS = float(np.finfo(np.float32).eps)
LAYER_NORM_EPS = 1e-5

# The three flag channels appended by the jitterer are labelled with these vocabulary rows
# (bias_correction, closed_boundary, open_boundary) of the released field vocabulary.
FLAG_LABELS = (2, 0, 1)

LEARNED_ROPE_CHOICES = ("none", "shared", "per_axis")
KERNEL_CHOICES = ("auto", "xla", "cpu", "tpu", "gpu")  # models/kernels.py
REMAT_CHOICES = ("none", "full", "offload", "dots_saveable", "dots_with_no_batch_dims_saveable", "dots_and_attention")
# Projections of each block that may carry a low-rank adapter (walrus_jax/models/lora.py).
LORA_TARGETS = ("time.qkv", "time.out", "space.fused", "space.attn_out", "space.ff_out")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Walrus model (hashable, so it can be a static jit argument).

    Field names follow the released YAML where one exists (`hidden_dim`, `intermediate_dim`,
    `groups`, `n_states`, ...); `n_blocks` is the YAML's `processor_blocks`.
    """

    hidden_dim: int = 1408
    intermediate_dim: int = 352
    n_blocks: int = 40
    num_heads: int = 16
    groups: int = 16  # RMSGroupNorm groups: numerically irrelevant (it normalizes per channel)
    n_states: int = 67  # size of the field vocabulary (rows of the encoder / decoder kernels)
    include_d: tuple[int, ...] = (2, 3)  # one encoder/decoder pair per number of non-singleton axes
    kernel_sizes: tuple[int, int] = (8, 4)  # (k1, k2) of the two encoder convolutions, every axis
    causal_in_time: bool = True
    jitter_patches: bool = True  # what sample_jitter draws by default (the release: True)
    drop_path: float = 0.05  # block i gets linspace(0, drop_path, n_blocks)[i]
    input_field_drop: float = 0.0
    projection_dim: int = 48  # unused by the computation; kept for round-tripping configs
    rope_max_freq: float = 256.0  # lucidrains "pixel" RoPE: freqs = pi * linspace(1, max/2, n_f)
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 32
    # Fine-tuning variants (a fine-tune's `finetuning_mods`; walrus_jax/training/finetune.py):
    learned_rope: str = "none"  # "none" (buffer), "shared" (one learnable vector), "per_axis"
    ape_grid: tuple[int, int, int] | None = None  # absolute position embedding token grid
    # The original resizes the post_neutron_star_merger dataset's last axis 66 -> 64 before the model
    # and back after; a checkpoint trained on it carries this flag (set by the converter from its
    # YAML's training datasets), and the model then resizes every input whose last axis is 66.
    resize_66_to_64: bool = False
    # Numerics and memory:
    dtype: str = "float32"  # compute dtype of matmuls / convolutions
    param_dtype: str = "float32"  # storage dtype of parameters
    # Remat policy of each scanned block, one of REMAT_CHOICES (only the backward pass sees it).
    # "dots_and_attention" keeps the projections' and the fused attention's outputs and recomputes
    # the elementwise work: at hidden 768 (batch 2, 128^2, T=6) that cuts the train step's buffers
    # from ~20 GB to ~7 GB and its time by ~30% on a 2-core CPU (less memory to fault in and
    # stream); at hidden 192 keeping everything ("none") is ~4% faster. "offload" is "full" with the
    # blocks' inputs in host memory (TPU/GPU; on CPU the same as "full").
    remat: str = "none"
    scan_layers: bool = True  # nnx.scan over blocks (False: Python loop; CPU training of <= 4 blocks loops, see processor)
    # Which kernels compute attention, the q/k norm + RoPE, convolutions and the block loop, one of
    # KERNEL_CHOICES (models/kernels.py): "auto" follows the platform the program is compiled for,
    # "xla" is the portable path everywhere, "cpu" / "tpu" / "gpu" force that platform's forms.
    kernels: str = "auto"
    # Low-rank adapters on the block projections (models/lora.py); rank 0: none.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        problems = []
        if self.hidden_dim % self.num_heads:
            problems.append(f"hidden_dim={self.hidden_dim} is not divisible by num_heads={self.num_heads}")
        if self.n_states < 3:
            problems.append(f"n_states={self.n_states} must be >= 3 (rows 0-2 are the boundary flags)")
        if not set(self.include_d) <= {1, 2, 3}:
            problems.append(f"include_d={self.include_d} must be a subset of (1, 2, 3)")
        if self.learned_rope not in LEARNED_ROPE_CHOICES:
            problems.append(f"learned_rope={self.learned_rope!r} not in {LEARNED_ROPE_CHOICES}")
        if self.kernels not in KERNEL_CHOICES:
            problems.append(f"kernels={self.kernels!r} not in {KERNEL_CHOICES}")
        if self.remat not in REMAT_CHOICES:
            problems.append(f"remat={self.remat!r} not in {REMAT_CHOICES}")
        if self.ape_grid is not None and len(self.ape_grid) != 3:
            problems.append(f"ape_grid={self.ape_grid} must have 3 entries (h, w, d)")
        if self.head_dim // 4 < 2:
            problems.append(f"head_dim={self.head_dim} too small for axial RoPE (needs >= 8)")
        if self.lora_rank < 0 or not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_rank={self.lora_rank} must be >= 0 and lora_dropout={self.lora_dropout} in [0, 1)")
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown or (self.lora_rank and not self.lora_targets):
            problems.append(f"lora_targets={tuple(self.lora_targets)}: choose a non-empty subset of {LORA_TARGETS}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    # ----------------------------------------------------------------- derived quantities
    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def rope_dim(self) -> int:
        """Channels of each head rotated per spatial axis (lucidrains dim = head_dim // 4)."""
        return self.head_dim // 4

    @property
    def n_rope_freqs(self) -> int:
        return self.rope_dim // 2

    def drop_path_rates(self) -> np.ndarray:
        return np.linspace(0.0, self.drop_path, self.n_blocks).astype(np.float32)

    def replace(self, **kwargs) -> "ModelConfig":
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known keys: {sorted(names)}")
        kw = dict(d)
        for key in ("include_d", "kernel_sizes", "ape_grid"):
            if kw.get(key) is not None:
                kw[key] = tuple(int(v) for v in kw[key])
        if kw.get("lora_targets") is not None:
            kw["lora_targets"] = tuple(str(v) for v in kw["lora_targets"])
        return cls(**kw)

    # ----------------------------------------------------------------- presets
    @classmethod
    def walrus_1p3b(cls, **overrides) -> "ModelConfig":
        """The released 1.3B architecture (the defaults of this class)."""
        return cls(**overrides)

    @classmethod
    def medium(cls, **overrides) -> "ModelConfig":
        """hidden 768, 12 blocks: the benchmark's medium configuration (remat "dots_and_attention")."""
        base = dict(hidden_dim=768, intermediate_dim=192, n_blocks=12, num_heads=12, groups=12,
                    remat="dots_and_attention")
        return cls(**{**base, **overrides})

    @classmethod
    def small(cls, **overrides) -> "ModelConfig":
        """hidden 192, 4 blocks: trains on a laptop CPU."""
        base = dict(hidden_dim=192, intermediate_dim=48, n_blocks=4, num_heads=4, groups=4)
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """The smallest useful model, for tests."""
        base = dict(hidden_dim=32, intermediate_dim=16, n_blocks=2, num_heads=4, groups=4)
        return cls(**{**base, **overrides})

    # ----------------------------------------------------------------- released YAML
    @classmethod
    def from_torch_config(cls, model_section: Mapping[str, Any], n_states: int, **overrides) -> "ModelConfig":
        """Reads the `model:` section of the released extended_config.yaml as it is.

        Hydra `_target_` / `_partial_` keys are accepted and ignored. The model-level `groups`
        overrides the encoder/decoder `groups` entries, as in the original (they are passed to the
        norm layers by the model, not read from the sub-configs).
        """
        m = dict(model_section)
        where = "model section of the torch config"

        def need(key):
            if key not in m:
                raise KeyError(f"{where}: missing key '{key}'")
            return m[key]

        proc = dict(need("processor"))
        space = dict(proc.get("space_mixing", {}))
        time = dict(proc.get("time_mixing", {}))
        heads = space.get("num_heads", time.get("num_heads"))
        if heads is None:
            raise KeyError(f"{where}: missing processor.space_mixing.num_heads")
        if time.get("num_heads", heads) != heads:
            raise ValueError(f"{where}: time and space num_heads differ ({time['num_heads']} vs {heads})")
        if time.get("bias_type", "rel") != "rel":
            raise ValueError(f"{where}: processor.time_mixing.bias_type={time['bias_type']!r}; only 'rel' is supported")
        if space.get("mlp_dim") not in (None,):
            raise ValueError(f"{where}: processor.space_mixing.mlp_dim={space['mlp_dim']!r}; only null (4*hidden) is supported")
        for part in ("encoder", "decoder"):
            sub = dict(m.get(part, {}))
            if sub.get("learned_pad", True) is not True:
                raise ValueError(f"{where}: {part}.learned_pad must be true (the only variant with released weights)")
        enc = dict(m.get("encoder", {}))
        kernels = set()
        for key in ("base_kernel_size2d", "base_kernel_size3d"):
            for pair in enc.get(key, [[8, 4]]):
                kernels.add(tuple(int(v) for v in pair))
        if len(kernels) != 1:
            raise ValueError(f"{where}: encoder base kernels differ between axes {sorted(kernels)}; "
                             "walrus_jax supports one (k1, k2) for every axis")
        if not m.get("use_periodic_fixed_jitter", True):
            raise ValueError(f"{where}: use_periodic_fixed_jitter=false is not supported (the release uses true)")
        if int(m.get("max_d", 3)) != 3:
            raise ValueError(f"{where}: max_d={m['max_d']}; only 3 is supported")
        act = m.get("encoder", {}).get("activation", {})
        act_name = act.get("_target_", "SiLU") if isinstance(act, Mapping) else str(act)
        if not act_name.endswith("SiLU"):
            raise ValueError(f"{where}: encoder.activation={act_name!r}; only SiLU is supported")
        kw = dict(
            hidden_dim=int(need("hidden_dim")),
            intermediate_dim=int(need("intermediate_dim")),
            n_blocks=int(need("processor_blocks")),
            num_heads=int(heads),
            groups=int(m.get("groups", 16)),
            n_states=int(n_states),
            include_d=tuple(int(v) for v in m.get("include_d", (2, 3))),
            kernel_sizes=kernels.pop(),
            causal_in_time=bool(m.get("causal_in_time", True)),
            jitter_patches=bool(m.get("jitter_patches", True)),
            drop_path=float(m.get("drop_path", 0.0)),
            input_field_drop=float(m.get("input_field_drop", 0.0)),
            projection_dim=int(m.get("projection_dim", 48)),
        )
        kw.update(overrides)
        return cls(**kw)
