"""Hydra instantiates launchers only from the ``hydra_plugins`` package: regbench's stacked launcher (the code is
in regbench/stacked/launcher.py) is registered from here, for ``hydra/launcher=stacked``
(configs/hydra/launcher/stacked.yaml)."""

from regbench.stacked.launcher import StackedLauncher as _StackedLauncher


class StackedLauncher(_StackedLauncher):
    """Trains a sweep's jobs in stacks (regbench.stacked)."""
