"""Command-line tools of walrus_jax (converter, benchmarks); run from the repository root."""
