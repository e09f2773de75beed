"""Weights on disk and in memory: params.py (the parameter toolkit: abstract model, paths,
parameters -> model), train_state.py (Orbax checkpoints of a training run), pretrained.py
(converted release directories), convert.py (PyTorch state_dict <-> walrus_jax), load.py
(weights from either kind of checkpoint), adapters.py (LoRA fine-tuning: what trains, adapter
deltas beside a frozen base, merging)."""
