"""Hydra instantiates launchers only from the ``hydra_plugins`` package: regbench's SLURM launcher (the code is
in regbench/slurm.py) is registered from here, for ``hydra/launcher=slurm`` (configs/hydra/launcher/slurm.yaml)."""

from regbench.slurm import SlurmLauncher as _SlurmLauncher


class SlurmLauncher(_SlurmLauncher):
    """hydra-submitit-launcher's SlurmLauncher with regbench's checks and failure reporting."""
