"""Weights on disk and in memory. load.py holds `load_model`, the one way from a path to a model
(also `walrus_jax.load_pretrained`), above the format modules that only read and write their files:
train_state.py (Orbax checkpoints of a training run), pretrained.py (converted release directories),
adapters.py (LoRA fine-tuning: what trains, adapter deltas beside a frozen base, merging). Beside
them: params.py (the parameter toolkit: abstract model, paths, parameters -> model), convert.py
(PyTorch state_dict <-> walrus_jax), hub.py (wj.from_pretrained: hub repositories, the converted cache)."""
