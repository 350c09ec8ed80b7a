"""Hydra instantiates launchers only from the ``hydra_plugins`` package: regbench's SLURM launcher (the code is
in regbench/slurm.py) is registered from here, for ``hydra/launcher=slurm`` (configs/hydra/launcher/slurm.yaml).
Importing regbench first also points torch.compile's cache at the user's own folder before anything imports
torch (regbench/compile_cache.py), in the submitting process and in each job."""

from regbench.slurm import SlurmLauncher as _SlurmLauncher


class SlurmLauncher(_SlurmLauncher):
    """hydra-submitit-launcher's SlurmLauncher with regbench's checks and failure reporting."""
