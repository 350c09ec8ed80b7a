"""regbench: regularization experiments in plain PyTorch, composed from Hydra configs."""

__version__ = "0.1.0"
