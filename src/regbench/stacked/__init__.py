"""Stacked training (issue 14): K members of one architecture trained at once in one process.

Parameters carry a leading member dimension [K, ...]; one forward/backward/optimizer step serves every member.
What a member computes does not depend on its group-mates: each has its own data order, its own torch RNG
stream (augmentation draws, dropout masks: drawn exactly as its single run would draw them), its own optimizer
state and hyperparameters, its own regularizer strengths.

Modules (one owner each):
- ``model.py``     StackedModel: members' models stacked (torch.func.stack_module_state + vmap(functional_call)),
                   per-member dropout rates and masks, per-member BatchNorm statistics, export/import of a member.
- ``optim.py``     StackedOptimizer: the vectorised update rules of every regbench optimizer with per-member
                   hyperparameters (read from the members' own torch optimizers, which their schedulers drive);
                   per-member gradient clipping.
- ``grouping.py``  which sweep jobs may share a stack (what may differ inside one), the stack key.
- ``engine.py``    fit_stack: the epochs of a stack; every member writes the run folder an ordinary run writes.
- ``launcher.py``  hydra/launcher=stacked (registered from hydra_plugins.regbench_launcher).
"""
