"""Job configs for `python -m walrus_jax.main --config configs/<name>.py` (shared skeleton: common.py)."""
