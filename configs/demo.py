"""The embedded default: trains a small Walrus on the miniwell on 2 CPU cores in well under 15 minutes.

    python -m walrus_jax.main --config configs/demo.py --workdir runs/demo

With no data configured (data.root = '') the miniwell's Kolmogorov flow (2D incompressible
Navier-Stokes, 32x32, the Well's HDF5 layout) is generated once into
~/.cache/walrus_jax/miniwell/quick-ns2d_kolmogorov (seconds). 32x32 is one token per pixel (1024
tokens per frame), so attention over a frame dominates the cost and the model is deliberately
small: hidden 64, 2 blocks, 2 heads, a 2-frame history, batch 2 (~0.6-0.8 s per step on 2 idle
cores, ~1.5 s on a loaded machine). 400 steps at lr 2e-3 halve the training loss and beat the
persistence baseline over rollout steps 1-10 (summary.json: initial_loss / final_loss,
eval.vrmse_1_10 vs eval.persistence_vrmse_1_10; timing gives the wall-time split).
`train.max_wall_seconds` stops training after 11 minutes whatever the machine (summary.json then
says `stopped_early`), leaving time for the final checkpoint and the rollout evaluation.
Variant: `configs/demo.py:quick` (60 steps, a smoke run).
"""
from configs import common


def get_config(variant: str = ""):
    from walrus_jax.models.config import ModelConfig

    c = common.base_config()
    c.name = "demo"
    # Tiny model: at 1024 tokens per frame the L^2 attention dominates, so few blocks / heads and a
    # narrow hidden size; the stride-1 encoder/decoder convolutions (11x11 receptive field) carry
    # the local stencils. No drop path (a 2-block model trained for minutes gains nothing from it).
    c.model = common.model_section(ModelConfig.small(hidden_dim=64, intermediate_dim=32, n_blocks=2, num_heads=2,
                                                     groups=4, drop_path=0.0))
    # One smooth, learnable periodic 2D system (one compile); generate only it (seconds, not minutes).
    c.data.generate_systems = "ns2d_kolmogorov"
    c.data.datasets = ("ns2d_kolmogorov",)
    c.data.batch_size = 2
    c.data.n_steps_input = 2  # the minimum: the delta normalization needs one in-window delta
    c.train.steps = 400
    c.train.lr = 2e-3  # stable for this size (the ModelConfig.small run diverged at 1e-3)
    c.train.weight_decay = 1e-4
    # The lr schedule is stepped every update here (steps_per_epoch 1); warmup and cooldown follow
    # the run length (5% each), so `--config.train.steps=N` alone works for any N.
    c.train.log_every = 10
    # Safety net for slow or loaded machines: stop (checkpoint, evaluate, summarise) after 11
    # minutes so the whole job stays within 15; summary.json then says stopped_early.
    c.train.max_wall_seconds = 11.0 * 60.0
    c.checkpoint.every = 200
    c.checkpoint.keep = 2
    c.eval.n_trajectories = 2
    c.eval.batch_size = 2
    c.eval.rollout_steps = 10
    c.eval.windows = ((1, 10),)
    c.eval.every = 0
    if variant == "quick":
        c.train.steps = 60
        c.checkpoint.every = 30
    elif variant:
        raise ValueError(f"configs/demo.py: unknown variant {variant!r} (known: 'quick')")
    return c
