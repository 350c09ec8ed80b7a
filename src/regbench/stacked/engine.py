"""``fit_stack``: the epochs of K runs trained as one stack, each member writing the run folder an ordinary run
writes (.hydra/ comes from the launcher; tb/, metrics.csv, summary.json, checkpoints/ from here).

Every member is an ordinary run prepared by :func:`regbench.run.prepare_run` (its experiment, state, logger,
summary; a resume restores its own checkpoint). Only the training steps are shared: the members' models become
one :class:`StackedModel`, their torch optimizers (driven by their own schedulers) one
:class:`StackedOptimizer`; :class:`StackedStep` is the stack's :mod:`regbench.loop` step, trained by the same
``train_one_epoch`` as a single run. After every epoch each member's weights go back into its own model and its own
``Run.record`` does the rest (evaluation, logs, early stopping, summary.json); checkpoints are written in the
ordinary format, for every member of the epoch before any is pruned, so a killed stack resumes every member
from one common epoch; an observer's records of the epoch (a bagging run's ensemble row) are written before
them, so no checkpoint is ever ahead of them (a kill in between redoes the epoch). A member that stops early or
fails (divergence) leaves the stack; the others go on.

Random draws: each member owns a torch RNG state, swapped in around its batch (augmentation) and its dropout
masks, in the order its single run draws them; its data order has its own generator (RunState.order).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from regbench import runtime
from regbench.checkpoint import Checkpoints, fault_point
from regbench.errors import RegbenchError
from regbench.logs import progress_bar
from regbench.loop import train_one_epoch
from regbench.regularizers.stacking import stack_refusals
from regbench.run import prepare_run
from regbench.rundir import claim, prepare_run_dir
from regbench.stacked.logs import member_logs
from regbench.stacked.model import StackedModel
from regbench.stacked.optim import StackedOptimizer
from regbench.stacked.step import StepRules
from regbench.validation import validate

log = logging.getLogger(__name__)


def fit_stack(cfgs: Sequence[DictConfig], run_dirs: Sequence[Path], resume: bool | Sequence[bool] = False,
              default_threads: Optional[int] = None, *, observer: Any = None,
              member_data: Optional[Sequence[Optional[Callable]]] = None, group: Optional[str] = None) -> list[float]:
    """Train the runs ``cfgs`` (one architecture, see regbench.stacked.grouping) as one stack into ``run_dirs``.

    Returns each member's best value of trainer.monitor (NaN for a failed member: its summary.json says why);
    one member's failure never stops the others. A config error of the stack as a whole raises RegbenchError
    before anything is trained.
    """
    run_dirs = [Path(d) for d in run_dirs]
    resume = [resume] * len(cfgs) if isinstance(resume, bool) else list(resume)
    group = group or f"{zlib.crc32('|'.join(str(d.resolve()) for d in run_dirs).encode()):08x}"
    held = [claim(d, fresh=False).lock for d in run_dirs]
    try:
        return _fit_stack(list(cfgs), run_dirs, resume, default_threads, observer,
                          list(member_data) if member_data else [None] * len(cfgs), group)
    finally:
        for lock in held:
            if lock is not None:
                lock.release()


def _fit_stack(cfgs, run_dirs, resume, default_threads, observer, member_data, group) -> list[float]:
    for cfg in cfgs:
        validate(cfg)
        refusals = stack_refusals(cfg)  # what the members and the trainer say cannot be stacked (one place)
        if refusals:
            r = refusals[0]
            raise RegbenchError(f"{r.key}={r.value}: {r.why}; fix: {r.fix}, or the basic launcher")
    _check_same(cfgs)
    resuming = [prepare_run_dir(d, r) for d, r in zip(run_dirs, resume)]
    rt = runtime.set_up(cfgs[0].trainer, default_threads)
    common = common_epoch(cfgs, run_dirs, resuming)
    runs, rngs, values, shared = [], [], [math.nan] * len(cfgs), None
    with member_logs(run_dirs) as logs:
        for k, cfg in enumerate(cfgs):
            with logs.member(k):
                runs.append(prepare_run(cfg, run_dirs[k], resuming[k], rt, data_map=member_data[k],
                                        at_most_epoch=common if resuming[k] else None, data=shared))
            shared = runs[0].data_loaded
            rngs.append(_capture(rt.device))  # the member's own draws continue from here, as its single run's
            runs[k].join_stack(group, k, len(cfgs))
        # Members that resumed from different epochs (a checkpoint missing) cannot share steps: one stack each epoch.
        by_epoch: dict[int, list[int]] = {}
        for k, run in enumerate(runs):
            by_epoch.setdefault(run.state.epoch, []).append(k)
        for ks in by_epoch.values():
            stack = Stack([runs[k] for k in ks], [rngs[k] for k in ks], rt, logs, ks, observer)
            for k, value in zip(ks, stack.train()):
                values[k] = value
            if observer is not None:
                observer.on_end(stack)
    return values


# What every member of one stack must share: they take their steps together (regbench.stacked.grouping keeps the
# jobs of a sweep that differ in these apart).
_SHARED = ("trainer.max_epochs", "data", "model", "optimizer.name", "augmentation.ops", "trainer.device",
           "trainer.amp", "trainer.deterministic")


def _check_same(cfgs) -> None:
    for key in _SHARED:
        values = [OmegaConf.select(c, key) for c in cfgs]
        values = [OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for v in values]
        if any(v != values[0] for v in values[1:]):
            raise RegbenchError(f"the members of one stack differ in {key} ({values[0]!r} vs "
                                f"{next(v for v in values if v != values[0])!r}); fix: train them in separate stacks "
                                "(hydra/launcher=stacked groups a sweep's jobs by what they share)")


def common_epoch(cfgs, run_dirs, resuming) -> Optional[int]:
    """The newest epoch every resuming member has a checkpoint of (a stack killed while it wrote one epoch's
    checkpoints resumes all members from the previous one, which is pruned only after every member wrote)."""
    newest = [max((e for e, _ in Checkpoints(d / "checkpoints", c.trainer.keep_last).epoch_files()), default=0)
              for c, d, r in zip(cfgs, run_dirs, resuming) if r]
    return min(newest) if newest else None


def _capture(device: torch.device) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _restore(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _Gathered:
    """Batches of one shared training set gathered for every member at once (no augmentation)."""

    def __init__(self, x, y, perms, batch_size, stop):
        self.x, self.y, self.perms, self.bs, self.stop, self.i = x, y, perms, batch_size, stop, 0

    def next_batch(self, stack):
        if self.i >= self.stop:
            return None
        idx = self.perms[:, self.i:self.i + self.bs]
        self.i += self.bs
        noise = []
        if stack.model.shapes:
            for slot, k in enumerate(stack.members):
                with stack.member_rng(k):
                    noise.append(stack.model.dropout_noise(slot, idx.shape[1]))
        return self.x[idx], self.y[idx], noise


_SCHEDULER_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


class StackedStep:
    """The stack's training step (a :mod:`regbench.loop` step): the training members' forward at once (StackedModel,
    each with its own dropout noise), each member's own loss and penalty (StepRules: its single-run formulas on its
    slice), one backward of their sum (the members' gradients do not mix), each member's gradient hooks, one
    optimizer step (StackedOptimizer). Logits [K, B, C], loss and penalty [K]."""

    fresh_logits = False

    def __init__(self, stack: "Stack"):
        self.stack, self.device = stack, stack.rt.device

    @property
    def members(self) -> int:
        return len(self.stack.members)

    def train(self) -> None:
        self.stack.model.train()

    def step(self, x: torch.Tensor, y: torch.Tensor, noise: list):
        model, rules, optimizer = self.stack.model, self.stack.rules, self.stack.optimizer
        logits = model(x, noise)
        loss = rules.loss(logits, y)
        penalty = rules.penalty(model.params)
        objective = (loss if penalty is None else loss + penalty).sum()
        optimizer.zero_grad()
        objective.backward()
        rules.before_step(model.params, optimizer)
        optimizer.step()
        return logits, loss, penalty


class Stack:
    """Members (prepared runs, all at the same epoch) trained together until each has finished."""

    def __init__(self, runs: list, rngs: list[tuple], rt, logs, ids: list[int], observer: Any = None):
        self.runs, self.rngs, self.rt, self.logs, self.ids, self.observer = runs, rngs, rt, logs, ids, observer
        self.exps = [r.exp for r in runs]
        self.members = list(range(len(runs)))  # runs still training, in slot order
        self.model = StackedModel([r.exp.model for r in runs], input_shape=tuple(runs[0].exp.data.input_shape))
        self.optimizer = StackedOptimizer(self.model.params, [self.model.member_params(k) for k in self.members],
                                          [r.exp.optimizer for r in runs])
        self.rules = StepRules([r.exp.stack for r in runs], [self.model.member_params(k) for k in self.members],
                               rt.device)
        self.step = StackedStep(self)
        # Each member's scheduler steps after its optimizer did, through the stack: torch's check of that order looks
        # for its own wrapper of the member's optimizer.step() (never called here), so it would warn at the first
        # step. One filter for that one message, installed once per process (torch's private flag is not touched).
        warnings.filterwarnings("ignore", _SCHEDULER_ORDER_WARNING, UserWarning)

    @contextlib.contextmanager
    def member_rng(self, k: int):
        """Member k's torch RNG state as the global one while its draws happen."""
        _restore(self.rngs[k], self.rt.device)
        try:
            yield
        finally:
            self.rngs[k] = _capture(self.rt.device)

    # ------------------------------------------------------------------------------------ epochs
    def train(self) -> list[float]:
        """Every epoch until each member has finished; each member's best monitored value (NaN: failed)."""
        values = [math.nan] * len(self.runs)
        t = self.runs[0].cfg.trainer
        started = time.perf_counter()
        self.bar, redirect = progress_bar(t, self.exps[0].steps_per_epoch, self.runs[0].state.epoch)
        try:
            with redirect:
                self._epochs(values, started)
        except BaseException as e:  # Ctrl-C, a SLURM preemption, a bug: every member still training says so
            for k in self.members:
                self.runs[k].fail(e, started)
                self.runs[k].logger.close()
            raise
        finally:
            self.bar.close()
        return values

    def _epochs(self, values: list[float], started: float) -> None:
        t = self.runs[0].cfg.trainer
        for k in list(self.members):
            if self.runs[k].exp.stack.stopped:  # resumed after its early stop: only its end is left
                values[k] = self._finish(k, started)
        self._select([k for k in self.members if not self.runs[k].exp.stack.stopped])
        epoch = self.runs[0].state.epoch
        while self.members and epoch < t.max_epochs:
            epoch += 1
            self.bar.set_description(f"stack of {len(self.members)}: epoch {epoch}/{t.max_epochs}")
            done = self.epoch(epoch, started)
            if epoch == t.max_epochs:
                done = list(self.members)
            for k in done:
                if self.runs[k].summary.status == "running":
                    values[k] = self._finish(k, started)
            self._select([k for k in self.members if k not in done])
        for k in self.members:  # resumed after the last epoch had been checkpointed: only the end is left
            if self.runs[k].summary.status == "running":
                values[k] = self._finish(k, started)
        self.members = []

    def epoch(self, epoch: int, started: float) -> list[int]:
        """Train one epoch, then each member's own epoch end; the members that finished (stopped or failed)."""
        epoch_start = time.perf_counter()
        outs = self.train_epoch()
        self.export()
        done, saving = [], []
        for slot, k in enumerate(self.members):
            run = self.runs[k]
            with self.logs.member(self.ids[k]):
                try:
                    stopped = run.record(epoch, outs[slot], epoch_start, save=False)
                except Exception as e:  # noqa: BLE001 - one member's failure (divergence) must not end the others
                    self._failed(k, e, started)
                    done.append(k)
                    continue
            fault_point(f"after_member_record_{self.ids[k]}", epoch)
            if run.checkpoint_due(epoch, stopped):
                saving.append((slot, k))
            if stopped:
                done.append(k)
        if self.observer is not None:  # its records of the epoch before any checkpoint of it (redone on resume)
            self.observer.on_epoch_end(epoch, self)
        for slot, k in saving:  # every member's checkpoint of this epoch first, then the pruning
            self.optimizer.export_member(slot)
            with self.member_rng(k):
                self.runs[k].ckpts.save(epoch, self.runs[k].state.state_dict(), best=self.runs[k].improved,
                                        prune=False)
            fault_point(f"after_member_checkpoint_{self.ids[k]}", epoch)
        for _, k in saving:
            self.runs[k].ckpts.prune()
        return done

    def train_epoch(self) -> list[dict]:
        """One pass of every member over its own batches (regbench.loop.train_one_epoch with the stack's step); per
        member the sums a single run's epoch returns."""
        outs = train_one_epoch(self.step, self._batches(), schedule=self._schedule, on_step=self.bar.update)
        for slot, out in enumerate(outs):
            if not self.rules.has_penalty[slot]:  # a member without a penalty member has none (not zeros)
                out["penalty"] = None
        return outs

    def _schedule(self) -> None:
        """Every training member's own lr schedule, after the shared optimizer step."""
        for k in self.members:
            if self.runs[k].exp.scheduler is not None:
                self.runs[k].exp.scheduler.step()

    def _batches(self):
        """(x [K, B, ...], y [K, B, ...], each member's dropout noise) per step, until the epoch's end."""
        iters = self._batch_source()
        while True:
            batch = self._next_batch(iters)
            if batch is None:
                return
            yield batch

    def _batch_source(self):
        """Every member's batches of this epoch: from one shared training set without augmentation, one gather
        [K, B] per step from the members' own permutations (drawn as regbench.data.batches draws them); else each
        member's own policy iterator."""
        exps = [self.runs[k].exp for k in self.members]
        data = exps[0].data
        if not all(e.policy.identity and e.data.train_x is data.train_x for e in exps):
            return [e.train_batches(self.runs[k].state.order) for e, k in zip(exps, self.members)]
        n, bs, drop_last = len(data.train_y), exps[0].cfg.data.batch_size, exps[0].drop_last
        perms = torch.stack([torch.randperm(n, generator=self.runs[k].state.order, device=data.train_x.device)
                             for k in self.members])
        stop = n - n % bs if drop_last else n
        return _Gathered(data.train_x, data.train_y, perms, bs, stop)

    def _next_batch(self, iters):
        """The next batch of every member, drawn under its own RNG (augmentation, then its dropout masks), or None
        at the end of the epoch."""
        if isinstance(iters, _Gathered):
            return iters.next_batch(self)
        xs, ys, noise = [], [], []
        for slot, (k, it) in enumerate(zip(self.members, iters)):
            with self.member_rng(k):
                try:
                    xb, yb = next(it)
                except StopIteration:
                    return None
                noise.append(self.model.dropout_noise(slot, yb.shape[0]))
            xs.append(xb)
            ys.append(yb)
        return torch.stack(xs), torch.stack(ys), noise

    # ------------------------------------------------------------------------------------ members
    def export(self) -> None:
        """Every training member's weights and statistics into its own model."""
        for slot in range(len(self.members)):
            self.model.export_member(slot)

    def _select(self, keep: list[int]) -> None:
        if keep == self.members:
            return
        slots = [self.members.index(k) for k in keep]
        if keep:
            self.model.select(slots)
            self.optimizer.select(slots, self.model.params)
            self.rules.select(slots)
        self.members = keep

    def _finish(self, k: int, started: float) -> float:
        """Member k's end (the stack's end, test evaluations, completion), as its single run's."""
        run = self.runs[k]
        with self.logs.member(self.ids[k]):
            try:
                run.finish(started)
                value = run.complete()
            except Exception as e:  # noqa: BLE001
                self._failed(k, e, started)
                return math.nan
            finally:
                run.logger.close()
        fault_point(f"after_member_complete_{self.ids[k]}", run.summary.epochs_completed)
        return value

    def _failed(self, k: int, e: BaseException, started: float) -> None:
        run = self.runs[k]
        run.fail(e, started)
        run.logger.close()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        with self.logs.member(self.ids[k]):
            log.error("member %d of the stack failed: %s", self.ids[k], first)
        if not isinstance(e, RegbenchError):
            log.exception("member %d: unexpected error", self.ids[k])
