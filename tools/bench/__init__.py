"""Benchmark scripts that print tables (python -m tools.bench.<name>); not tests."""
