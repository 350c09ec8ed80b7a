"""regbench: regularization experiments in plain PyTorch, composed from Hydra configs.

Importing regbench points torch.compile's cache at a folder of the user's own before torch is imported
(regbench/compile_cache.py): every entry point (the command, sweep jobs, Hydra's launcher plugins) imports it first.
"""

from regbench.compile_cache import set_env as _set_compile_cache_env

__version__ = "0.1.0"

_set_compile_cache_env()
