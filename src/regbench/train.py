"""``fit``: the one entry point that trains a composed config into a run folder — the dispatcher above the engines.

It chooses how the run trains: a bagging run (``regularizer=[bagging]``) is a stack of its members
(:func:`regbench.stacked.bagging.fit_bagging`); any other run is one :class:`regbench.run.Run`. The command line,
the sweep launchers and Python callers all come through here (a stacked launcher's stacks through
:func:`fit_stack`, re-exported from :mod:`regbench.stacked.engine`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from regbench import runtime
from regbench.run import prepare_run
from regbench.rundir import claim, prepare_run_dir
from regbench.stacked.bagging import fit_bagging, is_bagging
from regbench.stacked.engine import fit_stack
from regbench.validation import validate

__all__ = ["fit", "fit_stack"]


def fit(cfg: DictConfig, run_dir: Path, resume: Optional[bool] = None, default_threads: Optional[int] = None) -> float:
    """Train the composed experiment ``cfg`` and write its results into ``run_dir``.

    With ``trainer.resume=true`` (or ``resume=True``, what sweeps pass) and an unfinished run in ``run_dir``,
    continue it from its newest checkpoint; on CPU the result is bitwise identical to an uninterrupted run.
    ``default_threads`` replaces the all-cores default of ``trainer.num_threads=null`` (parallel sweep jobs).
    Returns the best value of ``trainer.monitor`` (what Hydra sweepers optimise).
    The folder is locked while the run lives (the command line has claimed it already; a sweep job, or a call
    from Python, locks it here), so no other run or resume writes into it meanwhile.
    """
    run_dir = Path(run_dir)
    held = claim(run_dir, fresh=False).lock  # None when this process holds it already (the command line)
    try:
        if is_bagging(cfg):  # an ensemble trained as one stack, its members in run_dir/members/
            return fit_bagging(cfg, run_dir, resume, default_threads)
        validate(cfg)
        t = cfg.trainer
        resuming = prepare_run_dir(run_dir, t.resume if resume is None else resume)
        rt = runtime.set_up(t, default_threads)
        return prepare_run(cfg, run_dir, resuming, rt).run()
    finally:
        if held is not None:
            held.release()
