"""Training: `loop.train(config, workdir)` runs a job built by `setup.setup`.

config.py (what the job derives from its config, checks before compute), batches.py (pipeline and
per-host batches), setup.py (the Run: mesh, model, sharded state, resume), loop.py (the job),
steps.py (loss and the jitted train step), optim.py (the optax optimizer and schedule), finetune.py (init_from),
reporting.py (progress bar, metrics log), summary.py (summary.json).
"""
