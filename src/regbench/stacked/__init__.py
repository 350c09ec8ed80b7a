"""Stacked training (issue 14): K members of one architecture trained at once in one process.

Parameters carry a leading member dimension [K, ...]; one forward/backward/optimizer step serves every member.
What a member computes does not depend on its group-mates: each has its own data order, its own torch RNG
stream (augmentation draws, dropout masks: drawn exactly as its single run would draw them), its own optimizer
state and hyperparameters, its own regularizer strengths.

Modules (one owner each):
- ``model.py``     StackedModel: members' parameters stacked into leaves [K, ...]; on a CPU member by member over
                   views of them by each member's own kernels (bitwise its single run), on a GPU one
                   vmap(functional_call) for MLPs; per-member dropout rates and masks, per-member BatchNorm
                   statistics, export/import of a member.
- ``optim.py``     StackedOptimizer: each member's own torch optimizer stepping its rows (one shared optimizer over
                   all the members' rows while their hyperparameters agree).
- ``step.py``      per-member loss (label smoothing), penalties, regbench's weight decay, clipping: each member's
                   single-run formula on its own slice.
- ``grouping.py``  which sweep jobs may share a stack (what may differ inside one), the stack key.
- ``engine.py``    fit_stack: the epochs of a stack; every member writes the run folder an ordinary run writes.
- ``launcher.py``  hydra/launcher=stacked (registered from hydra_plugins.regbench_launcher).
- ``bagging.py``   regularizer=[bagging]: an ensemble trained as one stack, its members in <run>/members/<j>/.
- ``logs.py``      each member's own regbench.log; console lines prefixed by the member.
"""
