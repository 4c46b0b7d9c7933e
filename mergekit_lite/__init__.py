"""mergekit_lite: merge, patch and edit model checkpoints by streaming their tensors."""

__version__ = "0.1.0"
