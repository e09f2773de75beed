"""Fine-tuning from a pretrained checkpoint, the paper's recipe: half the base learning rate,
a fixed time stride, optional learnable RoPE frequencies and absolute position embedding, new
fields added to the vocabulary (walrus_jax/finetune.py).

    python -m walrus_jax.main --config configs/finetune.py --workdir runs/ft \
        --config.init_from=ckpt/ --config.data.root=/path/to/my_datasets

`init_from` is a converted release (tools.convert_torch_ckpt) or a walrus_jax workdir. The
architecture comes from the checkpoint. Variants: `:rope` (learnable per-axis RoPE),
`:ape` (absolute position embedding; set model.ape_grid to the data's token grid).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("walrus_jax_configs_common", os.path.join(os.path.dirname(__file__), "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(variant: str = ""):
    c = common.base_config()
    c.name = "finetune"
    c.finetune.enabled = True
    c.finetune.lr_factor = 0.5
    c.data.generate = ""
    c.data.min_dt_stride = 1
    c.data.max_dt_stride = 1  # fixed time stride
    c.data.n_steps_input = 6
    c.data.batch_size = 8
    c.data.allow_new_fields = True
    c.train.steps = 20_000
    c.train.lr = 2e-4  # the base lr; finetune.lr_factor halves it
    c.train.grad_accum = 1
    c.train.warmup_steps = 500
    c.train.cooldown_steps = 2_000
    c.checkpoint.every = 1_000
    c.eval.every = 2_000
    c.eval.windows = ((1, 10), (11, 30))
    for v in filter(None, variant.split(",")):
        if v == "rope":
            c.finetune.learned_rope = "per_axis"
        elif v == "ape":
            c.finetune.ape = True
        else:
            raise ValueError(f"configs/finetune.py: unknown variant {v!r} (known: 'rope', 'ape', comma-separated)")
    return c
