"""The released recipe (the released extended_config.yaml and the original's trainer): the 1.3B
architecture, AdamW lr 2e-4 / wd 1e-4 / eps 1e-10, clip 10, 4 accumulated micro-batches, loss x100,
the InverseSqrtLinearWarmupSqrtCooldown schedule stepped per pseudo-epoch of 2000 micro-batches
(500 updates): warmup 10 and cooldown 10 of 200 pseudo-epochs = 100k updates; T_in 6 with time
strides 1-5, 2D inflated to 3D, rotations of the cube, HSDP with 4-device fsdp groups; validation
rollouts of up to 100 steps (windows 1-20, 21-60) with jitter.

    python -m walrus_jax.main --config configs/walrus_1p3b.py --workdir runs/w13 \
        --config.data.root=/path/to/the_well/datasets --config.mesh.fsdp=4

data.batch_size is the *global* micro-batch: 2 per device as released (set it to 2 x devices).
data.dataset_draws = mesh.data mixes one dataset draw per fsdp group, as the original does, when
the per-device batch allows it (see configs/common.py).
"""
from configs import common


def get_config(variant: str = ""):
    from walrus_jax.models.config import ModelConfig

    c = common.base_config()
    c.name = "walrus_1p3b"
    c.model = common.model_section(ModelConfig.walrus_1p3b(remat="dots_and_attention"))
    c.data.generate = ""  # the released recipe needs The Well: set data.root
    c.data.batch_size = 8  # 2 per device x 4 devices (one fsdp group)
    c.data.n_steps_input = 6
    c.data.n_steps_output = 1
    c.data.min_dt_stride = 1
    c.data.max_dt_stride = 5
    c.data.rotate = True
    c.data.inflate_to_3d = True
    c.data.worker_count = 8
    c.train.steps = 100_000
    c.train.grad_accum = 4
    c.train.lr = 2e-4
    c.train.weight_decay = 1e-4
    c.train.eps = 1e-10
    c.train.clip_norm = 10.0
    c.train.steps_per_epoch = 500  # a pseudo-epoch: 2000 micro-batches = 500 updates; the lr is stepped per epoch
    c.train.warmup_epochs = 10
    c.train.cooldown_epochs = 10
    c.train.warmup_factor = 0.1
    c.train.loss_multiplier = 100.0
    c.train.log_every = 50
    c.mesh.data = -1
    c.mesh.fsdp = 4
    c.checkpoint.every = 2_500
    c.checkpoint.keep = 3
    c.eval.every = 5_000
    c.eval.n_trajectories = 8
    c.eval.rollout_steps = 100  # the release validates rollouts of up to 100 steps
    c.eval.windows = ((1, 20), (21, 60))
    if variant == "medium":  # ModelConfig.medium() (hidden 768, 12 blocks) with the same recipe
        c.model = common.model_section(ModelConfig.medium())
    elif variant:
        raise ValueError(f"configs/walrus_1p3b.py: unknown variant {variant!r} (known: 'medium')")
    return c
