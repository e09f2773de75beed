"""The embedded default: trains a small Walrus on the miniwell on 2 CPU cores, bounded to ~13 minutes.

    python -m walrus_jax.main --config configs/demo.py --workdir runs/demo

With no data configured (data.root = '') the miniwell (real-physics trajectories in the Well's
HDF5 layout, 32x32) is generated once into ~/.cache/walrus_jax/miniwell. The model is
ModelConfig.small() (hidden 192, 4 blocks). `train.max_wall_seconds` stops training after 10.5
minutes whatever the machine (summary.json then says `stopped_early`), leaving time for the
final checkpoint and the rollout evaluation. Variant: `configs/demo.py:quick` (60 steps, a smoke run).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("walrus_jax_configs_common", os.path.join(os.path.dirname(__file__), "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(variant: str = ""):
    from walrus_jax.models.config import ModelConfig

    c = common.base_config()
    c.name = "demo"
    # Small model; no drop path (a 4-block model trained for minutes gains nothing from it).
    c.model = common.model_section(ModelConfig.small(drop_path=0.0))
    # The two periodic 2D systems (one compile each); 32x32 is one token per pixel (1024 per frame).
    c.data.datasets = ("ns2d_kolmogorov", "gray_scott")
    c.data.batch_size = 2
    c.data.n_steps_input = 4
    c.train.steps = 300
    c.train.lr = 5e-4  # 1e-3 diverged (loss 61 -> 163 in 40 steps)
    c.train.weight_decay = 1e-4
    c.train.warmup_steps = 20
    c.train.cooldown_steps = 60
    c.train.log_every = 10
    # Safety net for slow machines: stop (checkpoint, evaluate, summarise) after 10.5 minutes so
    # the whole job stays within 15; summary.json then says stopped_early.
    c.train.max_wall_seconds = 10.5 * 60.0
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.eval.n_trajectories = 2
    c.eval.batch_size = 2
    c.eval.rollout_steps = 10
    c.eval.windows = ((1, 10),)
    c.eval.every = 0
    if variant == "quick":
        c.train.steps = 60
        c.train.warmup_steps = 5
        c.train.cooldown_steps = 10
        c.checkpoint.every = 30
    elif variant:
        raise ValueError(f"configs/demo.py: unknown variant {variant!r} (known: 'quick')")
    return c
