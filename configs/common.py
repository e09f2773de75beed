"""Shared config skeleton: every key the trainer reads, with defaults. Config files call
`base_config()` and override; main.py locks the result, so a typo in a file or on the command line
(`--config.train.stpes=5`) is an error instead of a silently ignored setting.

configs/ is a package: the config files (executed by path by ml_collections) `from configs import common`,
which resolves from the repository root or from an installed walrus_jax (setup.py lists `configs`).
"""
from __future__ import annotations

import os

from ml_collections import config_dict

from walrus_jax.models.config import LORA_TARGETS, ModelConfig


def model_section(cfg: ModelConfig) -> config_dict.ConfigDict:
    d = cfg.to_dict()
    d["include_d"] = tuple(d["include_d"])
    d["kernel_sizes"] = tuple(d["kernel_sizes"])
    ape = d.pop("ape_grid")
    for k in [k for k in d if k.startswith("lora_")]:  # set through the `lora` section (fine-tuning)
        del d[k]
    m = config_dict.ConfigDict(d)
    # None is not a type: a placeholder keeps the key typed (a tuple of 3 ints) and overridable.
    m.ape_grid = config_dict.placeholder(tuple) if ape is None else tuple(ape)
    return m


def base_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.name = "walrus"
    c.seed = 0
    # Converted checkpoint (tools.convert_torch_ckpt output) to start from; '' = random init.
    c.init_from = ""
    c.mode = "train"  # train | eval | rollout (the --mode flag overrides)
    c.model = model_section(ModelConfig.small())

    c.data = config_dict.ConfigDict()
    c.data.root = ""  # directory holding Well-format datasets (<root>/<name>/data/<split>/*.hdf5)
    c.data.generate = "miniwell"  # generated into data.cache_dir when data.root is '' ('' = never)
    c.data.generate_quick = True
    c.data.generate_systems = ""  # comma-separated miniwell systems ('' = the generator's default)
    c.data.cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                    "walrus_jax", "miniwell")
    c.data.datasets = ()  # dataset names under root ('' / empty = every dataset found)
    c.data.batch_size = 8  # global micro-batch (all processes together)
    # Independent dataset draws per micro-batch. The original draws a dataset per micro-batch per
    # data-parallel group (a node of 4 GPUs), so one update mixes grad_accum × groups draws. One SPMD
    # program needs one shape per step, so walrus_jax spreads the draws over micro-steps: each of
    # grad_accum × dataset_draws micro-steps holds batch_size / dataset_draws samples of one dataset
    # (same samples per update; the per-device batch shrinks by dataset_draws). 1: one draw per
    # micro-batch for the whole mesh. Set it to mesh.data to mix datasets as the original does.
    c.data.dataset_draws = 1
    c.data.max_trajectories = 0  # train on each dataset's first N trajectories only (0 = all)
    c.data.max_samples = 0  # train on each dataset's first N windows only (0 = all)
    c.data.n_steps_input = 4
    c.data.n_steps_output = 1
    c.data.min_dt_stride = 1
    c.data.max_dt_stride = 1
    c.data.rotate = False
    c.data.inflate_to_3d = False
    c.data.worker_count = 0
    c.data.allow_new_fields = True
    # 'sample': divide by each sample's RMS (pretraining); 'global': by the dataset's rms / rms_delta
    # from <dataset>/stats.yaml (`python -m walrus_jax.data.stats DIR`), as the original fine-tunes
    c.data.normalization = "sample"

    c.train = config_dict.ConfigDict()
    c.train.steps = 1000  # optimizer updates (each = grad_accum micro-batches)
    c.train.grad_accum = 1  # micro-batches per update; each micro-batch's loss is divided by it
    c.train.lr = 2e-4  # base learning rate (the schedule's peak)
    # "release": the original's torch AdamW (weight_decay, eps, b1, b2 below); or any optax
    # optimizer by name ("adamw", "lion", "adafactor", ...) with its own arguments in optimizer_args
    # ("b1=0.95, weight_decay=0.1"); the schedule, clipping and accumulation apply to every choice
    # (walrus_jax/training/optim.py)
    c.train.optimizer = "release"
    c.train.optimizer_args = ""
    c.train.weight_decay = 1e-4
    c.train.eps = 1e-10
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.clip_norm = 10.0  # gradients scaled by min(1, clip_norm / (total norm + 1e-6)); 0 = off
    # The lr schedule (InverseSqrtLinearWarmupSqrtCooldown, walrus_jax/training/optim.py) counts pseudo-epochs
    # of steps_per_epoch updates: the lr is constant within one (a staircase), as the release steps it
    # (500 updates = 2000 micro-batches). lr_per_update: the same curve stepped every update.
    c.train.steps_per_epoch = 1  # -1: train.steps / train.schedule_epochs (the schedule keeps its shape)
    c.train.schedule_epochs = 0  # pseudo-epochs of the run when steps_per_epoch is -1
    c.train.lr_per_update = False
    c.train.warmup_epochs = -1  # linear warmup from warmup_factor × lr; -1: 5% of the run (the release's 10/200)
    c.train.cooldown_epochs = -1  # sqrt cooldown to 0 at the end; -1: 5% of the run
    c.train.warmup_fraction = 0.05  # what warmup_epochs = -1 means: this fraction of the run's pseudo-epochs
    c.train.cooldown_fraction = 0.05  # what cooldown_epochs = -1 means
    c.train.warmup_factor = 0.1
    c.train.lr_offset = 128.0  # decay lr / (1 + (epoch − warmup + offset)^exponent − offset^exponent)
    c.train.lr_exponent = 0.5
    c.train.minimum_context = 1  # the first causal prediction (from one frame) is not scored
    c.train.loss_multiplier = 100.0
    # Autoregressive steps in the training loss (walrus_jax/training/steps.py): 1 = the one-step loss;
    # k > 1 also scores k - 1 predictions made from the model's own predicted frames (the windows
    # then carry k output frames); the gradient stops at each predicted frame unless
    # rollout_stop_gradient is False (then it flows back through them to the first step).
    c.train.rollout_steps = 1
    c.train.rollout_stop_gradient = True
    c.train.normalization_eps = 1e-5
    c.train.jitter = True
    c.train.log_every = 10
    c.train.max_wall_seconds = 0.0  # > 0: stop early (and checkpoint) after this many seconds

    c.mesh = config_dict.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: every remaining device

    c.sharding = config_dict.ConfigDict()
    # Overrides of walrus_jax.sharding.DEFAULT_RULES ('embed' over 'fsdp', everything else replicated):
    # ((logical axis name, 'fsdp' or None), ...) for the names to map differently.
    c.sharding.rules = ()

    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.every = 200
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.eval = config_dict.ConfigDict()
    c.eval.every = 0  # optimizer steps between evaluations during training (0 = only at the end)
    c.eval.split = "valid"
    c.eval.n_trajectories = 4  # held-out trajectories per dataset
    c.eval.rollout_steps = 30
    c.eval.windows = ((1, 10), (11, 30))
    c.eval.plot = True
    c.eval.batch_size = 4
    c.eval.jitter = True  # validation rollouts with patch jitter, as the original (a model flag there)

    c.finetune = config_dict.ConfigDict()
    c.finetune.freeze = ()  # parameter path prefixes to freeze, e.g. ('encoder', 'blocks')
    c.finetune.new_field_init = "fresh"  # new vocabulary rows: 'fresh' initialization (as released), 'mean', 'zeros'
    c.finetune.learned_rope = "none"  # none | shared | per_axis
    c.finetune.ape = False  # absolute position embedding (anisotropic domains)
    # Low-rank adapters (walrus_jax/models/lora.py) when fine-tuning: rank 0 = full fine-tuning.
    # With rank > 0 only the adapters, new vocabulary rows, learnable RoPE / APE train.
    c.lora = config_dict.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = LORA_TARGETS  # any of them
    return c
