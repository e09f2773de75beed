"""Fine-tuning from a pretrained checkpoint as the original's released fine-tuning example does:
lr 1e-4 without accumulation, drop path 0, a schedule of 51 pseudo-epochs (warmup 20 from 0.01×
lr, cooldown 10), a fixed time stride of 1, per-axis learnable RoPE frequencies, 2D data inflated to
3D, and new fields added to the vocabulary (walrus_jax/training/finetune.py).

    python -m walrus_jax.main --config configs/finetune.py --workdir runs/ft \
        --config.init_from=polymathic-ai/walrus --config.data.root=/path/to/my_datasets

`init_from` is a hub repository (`polymathic-ai/walrus`, `hf://ORG/NAME@REVISION`: downloaded and
converted once, walrus_jax/checkpoints/hub.py), a folder in the released layout, a converted release
(tools.convert_torch_ckpt) or a walrus_jax workdir. The architecture comes from the checkpoint. The
schedule is the release's 51 pseudo-epochs (warmup 20, cooldown 10) whatever `train.steps`: a
pseudo-epoch is train.steps / 51 updates (500 at the release's 25,500), so `--config.train.steps=N`
alone shortens the run in proportion. Variants: `:ape` (absolute
position embedding; set model.ape_grid to the data's token grid), `:fixed_rope` (the base model's
fixed RoPE frequencies), `:lora` (low-rank adapters of rank 16 on the time qkv and space fused projections with the
base frozen: only adapters, new vocabulary rows and the learnable RoPE frequencies train;
`--config.lora.rank/alpha/dropout/targets`; walrus_jax/checkpoints/adapters.py).
"""
from configs import common


def get_config(variant: str = ""):
    c = common.base_config()
    c.name = "finetune"
    c.finetune.learned_rope = "per_axis"
    c.model.drop_path = 0.0
    c.data.generate = ""
    c.data.min_dt_stride = 1
    c.data.max_dt_stride = 1  # fixed time stride
    c.data.n_steps_input = 6
    c.data.batch_size = 8
    c.data.inflate_to_3d = True
    c.data.allow_new_fields = True
    c.data.normalization = "global"  # the dataset's stats.yaml (python -m walrus_jax.data.stats DIR)
    c.train.lr = 1e-4
    c.train.grad_accum = 1
    # The release: 51 pseudo-epochs of 500 updates, warmup 20, cooldown 10. Given as proportions so
    # that train.steps alone rescales them (steps_per_epoch -1: train.steps / schedule_epochs).
    c.train.steps = 51 * 500
    c.train.schedule_epochs = 51
    c.train.steps_per_epoch = -1
    c.train.warmup_epochs = -1
    c.train.cooldown_epochs = -1
    c.train.warmup_fraction = 20 / 51
    c.train.cooldown_fraction = 10 / 51
    c.train.warmup_factor = 0.01
    c.checkpoint.every = 1_000
    c.eval.every = 2_000
    c.eval.windows = ((1, 10), (11, 30))
    for v in filter(None, variant.split(",")):
        if v == "fixed_rope":
            c.finetune.learned_rope = "none"
        elif v == "ape":
            c.finetune.ape = True
        elif v == "lora":
            c.lora.rank = 16
            c.lora.alpha = 16.0
            c.lora.dropout = 0.0
            # The input projections of both attentions (time qkv; space qkv + MLP input): 0.83% of
            # the 1.3B model at rank 16 (all five projections: 1.31%).
            c.lora.targets = ("time.qkv", "space.fused")
            c.train.lr = 1e-3  # adapters start at zero and train from scratch: the usual LoRA rate
        else:
            raise ValueError(f"configs/finetune.py: unknown variant {v!r} (known: 'ape', 'fixed_rope', 'lora', comma-separated)")
    return c
