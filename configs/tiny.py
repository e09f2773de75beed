"""A tiny configuration for tests: ModelConfig.tiny() (hidden 32, 2 blocks) on 32x32 data,
a handful of steps, synchronous checkpoints. Data comes from data.root (tests point it at a
small generated dataset)."""
from configs import common


def get_config(variant: str = ""):
    from walrus_jax.models.config import ModelConfig

    c = common.base_config()
    c.name = "tiny"
    c.model = common.model_section(ModelConfig.tiny(drop_path=0.0))
    c.data.batch_size = 8
    c.data.n_steps_input = 3
    c.train.steps = 6
    c.train.lr = 1e-3
    c.train.warmup_epochs = 1
    c.train.cooldown_epochs = 1
    c.train.log_every = 1
    c.checkpoint.every = 2
    c.checkpoint.keep = 5
    c.checkpoint.async_save = False
    c.eval.n_trajectories = 2
    c.eval.rollout_steps = 10
    c.eval.plot = False
    if variant:
        raise ValueError(f"configs/tiny.py: unknown variant {variant!r}")
    return c
