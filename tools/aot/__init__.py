"""Ahead-of-time compilation of walrus_jax's programs for TPU slices on a CPU host (`python -m tools.aot`)."""
