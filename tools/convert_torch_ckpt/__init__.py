"""PyTorch Walrus checkpoint -> walrus_jax converted directory (see cli.py; run with
`python -m tools.convert_torch_ckpt --checkpoint walrus.pt --config extended_config.yaml --output DIR`)."""
from tools.convert_torch_ckpt.cli import CheckpointReadError, convert, main, open_checkpoint, read_config

__all__ = ["convert", "main", "open_checkpoint", "read_config", "CheckpointReadError"]
