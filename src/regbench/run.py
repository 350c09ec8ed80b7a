"""One run's life: :func:`prepare_run` (its experiment, state — new or restored — logger and first summary.json)
and :class:`Run` (its epochs, each recorded; its end: finished, failed or interrupted, and the completion marker).

A single run calls :meth:`Run.run`. A stack (regbench.stacked.engine) prepares one Run per member and drives it
through the same public methods — :meth:`Run.join_stack`, :meth:`Run.record` after each shared epoch,
:meth:`Run.checkpoint_due`, :meth:`Run.finish`, :meth:`Run.fail`, :meth:`Run.complete` — so a member's records
are written by the code that writes a single run's. The training step itself is a :mod:`regbench.loop` step.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from regbench import conventions, lint, provenance, runtime, speed
from regbench.checkpoint import CheckpointEncoder, Checkpoints, fault_point, write_epoch
from regbench.config import evaluated
from regbench.errors import (
    RegbenchError,
    stopped_reason,
    stopped_status,
    unrecorded,
    with_write_fix,
)
from regbench.evaluation import evaluate, weight_norms
from regbench.experiment import Experiment, build_experiment
from regbench.io import BackgroundWriter, write_json
from regbench.logs import RunLogger, progress_bar
from regbench.loop import AutogradStep, DirectStep, TrainStep, train_one_epoch
from regbench.records import MARKER, EpochRow, EpochTiming, Summary
from regbench.state import RunState, last_row, restore_latest

log = logging.getLogger(__name__)


def prepare_run(cfg: DictConfig, run_dir: Path, resuming: bool, rt: runtime.Runtime, *,
                data_map: Optional[Callable] = None, at_most_epoch: Optional[int] = None, data: Any = None) -> "Run":
    """A run's experiment, state (restored from its newest checkpoint when resuming — with ``at_most_epoch``, the
    newest not after it), logger and first summary.json: everything before its first epoch. ``data_map`` replaces
    the experiment's data (a bagging member's bootstrap resample); ``data``: the data, loaded already (a stack's
    members share it). Also what a stacked member is made of."""
    exp = build_experiment(cfg, rt.device, data)
    loaded = exp.data
    if data_map is not None:
        exp.data = data_map(exp.data)
    state = RunState(exp.model, exp.optimizer, exp.scheduler, rt.scaler, exp.stack,
                     order=torch.Generator(device=rt.device).manual_seed(cfg.seed),  # data order, on the data's device
                     config=OmegaConf.to_container(cfg, resolve=True), monitor=cfg.trainer.monitor)
    ckpts = Checkpoints(run_dir / "checkpoints", cfg.trainer.keep_last)
    restore, load_warnings = (restore_latest(state, ckpts, run_dir, rt.device, at_most_epoch) if resuming
                              else (None, []))
    _log_start(cfg, exp, rt)
    logger = RunLogger(run_dir, cfg, resume_epoch=state.epoch if resuming else None, rows=restore)
    preview = None if resuming else exp.policy.preview(exp.data, cfg.augmentation.preview)
    if preview is not None:
        logger.log_images(*preview)
    summary = _start_summary(cfg, exp, rt, state, run_dir, resuming, exp.warnings + load_warnings)
    summary.write(run_dir / "summary.json")
    return Run(cfg, run_dir, exp, rt, state, ckpts, logger, summary, data_loaded=loaded)


def _log_start(cfg: DictConfig, exp: Experiment, rt: runtime.Runtime) -> None:
    params = exp.params
    log.info("model %s: %s trainable parameters, %s frozen, %s running-statistic values; optimizer %s; "
             "regularizers [%s]; device %s, %d threads", cfg.model.name, f"{params['trainable']:,}",
             f"{params['frozen']:,}", f"{params['buffers']:,}", cfg.optimizer.name, ",".join(exp.stack.names),
             rt.device, rt.threads)
    exp.stack.log_info(exp.model)


def _start_summary(cfg: DictConfig, exp: Experiment, rt: runtime.Runtime, state: RunState, run_dir: Path,
                   resuming: bool, warnings: list[str]) -> Summary:
    """summary.json as the run starts (status running; a resumed run's epochs and best epoch so far)."""
    t = cfg.trainer
    return Summary(
        status="running", epochs_completed=state.epoch, max_epochs=t.max_epochs, seed=cfg.seed,
        regularizers=exp.stack.names, params=exp.params, monitor=t.monitor, final=None, best=state.best_row,
        test=None, data=exp.data.meta, device=str(rt.device), amp=t.amp, num_threads=rt.threads,
        deterministic=t.deterministic, steps_per_epoch=exp.steps_per_epoch, warnings=warnings,
        **exp.speed,
        regularizer_info=exp.stack.info(), convention=conventions.effective(cfg, exp.model, exp.optimizer),
        augmentation=exp.policy.info(), versions=provenance.versions(),
        git=provenance.git_state(), command=provenance.command() or sys.argv,
        provenance=provenance.lineage(run_dir, resuming), run_dir=str(run_dir.resolve()),
        resumed_from_epoch=state.epoch if resuming else None, started=provenance.now(), finished=None,
        time_s=None, error=None)


@dataclass
class Run:
    """One run's epochs and end: trains, measures, logs and checkpoints each epoch, then tests and completes.

    ``data_loaded``: the data as loaded (before a bagging member's resample): what the next member of a stack can
    share."""

    cfg: DictConfig
    run_dir: Path
    exp: Experiment
    rt: runtime.Runtime
    state: RunState
    ckpts: Checkpoints
    logger: RunLogger
    summary: Summary
    data_loaded: Any = None
    # The progress bar while run() trains the epochs; a stack member's stays silent (the stack has one bar for all).
    bar: Any = field(default_factory=lambda: _SILENT, init=False)
    improved: bool = field(default=False, init=False)  # the last recorded epoch is the best so far
    # An epoch's checkpoint and summary.json are written while the next epoch trains (the order on disk stays).
    writer: BackgroundWriter = field(default_factory=BackgroundWriter, init=False)
    encoder: CheckpointEncoder = field(default_factory=CheckpointEncoder, init=False)  # regbench.speed's fast path
    timing: EpochTiming = field(default_factory=EpochTiming, init=False)  # summary.json "timing"
    trainer: Any = field(default=None, init=False)  # cfg.trainer as plain attributes (~8 us less per read)
    step: Optional[TrainStep] = field(default=None, init=False)  # its single-run step (none in a stack)

    def __post_init__(self) -> None:
        self.trainer = SimpleNamespace(**OmegaConf.to_container(self.cfg.trainer, resolve=True))

    def join_stack(self, group: str, index: int, members: int) -> None:
        """This run trains as member ``index`` of a stack of ``members`` (regbench.stacked.engine): the stack's own
        step trains it, not its single-run step; summary.json says so."""
        self.summary.update(stacked={"group": group, "index": index, "members": members}, step_impl="stacked")

    def run(self) -> float:
        """The epochs and the end; summary.json records how the run ended, however it ended. Returns the best
        value of trainer.monitor."""
        t = self.cfg.trainer
        started = time.perf_counter()
        log.info("training step: %s", self.exp.step_plan)
        self.step = single_step(self.exp, self.rt)
        self.bar, redirect = progress_bar(t, self.exp.steps_per_epoch, self.state.epoch)
        redirect.__enter__()
        try:
            stopped = self.exp.stack.stopped
            for epoch in range(self.state.epoch + 1, t.max_epochs + 1):
                if stopped:
                    break
                stopped = self.epoch(epoch)
            self.bar.close()
            self.finish(started)
        except BaseException as e:
            self.bar.close()
            self.fail(e, started)
            raise
        finally:
            redirect.__exit__(None, None, None)
            self.bar = _SILENT
            self.logger.close()
        return self.complete()

    def fail(self, e: BaseException, started: float) -> None:
        """summary.json says how the run ended when ``e`` ended it (the caller re-raises or reports it); where it
        cannot (a folder made read-only, a full disk), ``e``'s one line says so."""
        try:
            self.writer.close()  # the last epoch's files first: nothing may overwrite the failed summary
        except Exception as write_error:  # noqa: BLE001 — the original error is the one to report
            log.warning("warning: %s", str(write_error).splitlines()[0] if str(write_error) else write_error)
        with_write_fix(e)  # a file-size limit is named as such
        status = stopped_status(e)
        self.summary.update(status=status, error=stopped_reason(e), finished=provenance.now(),
                            time_s=round(time.perf_counter() - started, 2))
        try:
            self.summary.write(self.run_dir / "summary.json")
        except RegbenchError as write_error:  # the original error is the one to report; it says what is lost
            log.warning("warning: %s", unrecorded(e, status, write_error))

    def complete(self) -> float:
        """The completion marker, written last: sweeps skip a run folder that has it. Returns the best value."""
        write_json(self.run_dir / MARKER, self.summary.marker())
        return self.summary.best_value()

    def epoch(self, epoch: int) -> bool:
        """Train, measure, log and checkpoint one epoch; True when a member (early stopping) stops the run."""
        t, exp, state = self.trainer, self.exp, self.state
        epoch_start = time.perf_counter()
        self.bar.set_description(f"epoch {epoch}/{t.max_epochs}")
        # The run's schedule, or a member's from an epoch on (SWA's SWALR; it keeps that schedule's state).
        scheduler = exp.stack.lr_schedule(epoch, exp.optimizer, exp.steps_per_epoch, exp.scheduler)
        out = train_one_epoch(self.step, exp.train_batches(state.order),
                              schedule=scheduler.step if scheduler is not None else None, on_step=self.bar.update)
        return self.record(epoch, out, epoch_start)

    def record(self, epoch: int, out: dict, epoch_start: float, save: bool = True) -> bool:
        """Everything after an epoch's training (``out``: its :func:`train_one_epoch` sums): measure, log, the stack's epoch
        end, checkpoint (unless ``save`` is False: the caller saves, see :meth:`checkpoint_due`), summary.json.
        True when a member (early stopping) stops the run."""
        t, exp, state = self.trainer, self.exp, self.state
        state.step += exp.steps_per_epoch
        row, trained = self.measure(epoch, out, epoch_start)
        measured = time.perf_counter()
        self.writer.wait()  # the previous epoch's checkpoint and summary.json are on disk before this epoch's row
        self.logger.log_epoch(row)
        self.improved = state.end_epoch(row.to_dict())
        fault_point("after_metrics", epoch)
        self.bar.set_postfix(train_loss=f"{row.train_loss:.4f}", **(
            {} if row.val_loss is None else {"val_loss": f"{row.val_loss:.4f}", "val_acc": f"{row.val_acc:.4f}"}))
        log.info("epoch %d/%d  train loss %.4f acc %.4f%s | lr %.3g | %.2fs", epoch, t.max_epochs, row.train_loss,
                 row.train_acc, row.evaluation_text(), row.lr, row.epoch_time_s)
        stopped = exp.stack.on_epoch_end(epoch, state.history[-1], exp.model)
        # Encoded now (the tensors change with the next step), written by the background writer: the checkpoint,
        # its links and pruning, then summary.json — the order a synchronous write has.
        checkpoint = self.encoder(state.state_dict()) if save and self.checkpoint_due(epoch, stopped) else None
        timing = self.timing.add(trained - epoch_start, measured - trained, time.perf_counter() - measured)
        self.summary.update(epochs_completed=epoch, final=state.history[-1], best=state.best_row,
                            regularizer_info=exp.stack.info(), timing=timing)
        speed.record(self.summary, speed.paths_of(exp.direct, self.encoder, self.logger))
        write = partial(write_epoch, self.ckpts, epoch, checkpoint, self.improved, self.run_dir / "summary.json",
                        self.summary.encode(), self.logger.flush)
        self.writer.submit(write) if save else write()  # a stack member: written now, the stack saves after
        fault_point("after_summary", epoch, settle=self.writer.wait)
        if stopped:
            log.info("early stopping after epoch %d", epoch)
        return stopped

    def checkpoint_due(self, epoch: int, stopped: bool) -> bool:
        t = self.trainer
        return t.save_checkpoints and (epoch % t.checkpoint_every == 0 or epoch == t.max_epochs or stopped)

    def measure(self, epoch: int, out: dict, epoch_start: float) -> tuple[EpochRow, float]:
        """(the epoch's row from its training sums and the evaluations, when the sums were read back: the end of
        the epoch's training); a non-finite loss or weight is an error."""
        exp, step = self.exp, self.state.step
        seen = out["seen"]
        train_loss, train_acc = out["loss"].item() / seen, out["correct"].item() / seen  # the epoch's sync
        trained = time.perf_counter()
        penalty = out["penalty"].item() / seen if out["penalty"] is not None else 0.0
        if not (math.isfinite(train_loss) and math.isfinite(penalty)):
            raise self.divergence(f"non-finite training loss ({train_loss}, penalty {penalty})", epoch)
        val = clean = None
        if evaluated(self.trainer, epoch):
            bs, model = self.cfg.data.eval_batch_size, exp.stack.eval_model(exp.model, exp.data.train_x)  # (averaged)
            val = evaluate(model, exp.data.val_x, exp.data.val_y, bs, self.rt.autocast)
            clean = evaluate(model, exp.clean_x, exp.clean_y, bs, self.rt.autocast) if len(exp.clean_y) else None
        l1, l2 = weight_norms(exp.model)
        # The training loss can stay finite while the weights or the validation loss blow up (e.g. SGD
        # lr=10): checked here, from values this epoch reads back anyway (no extra host sync).
        if not (math.isfinite(l2) and (val is None or math.isfinite(val["loss"]))):
            raise self.divergence(f"non-finite {'weights' if not math.isfinite(l2) else 'validation loss'} "
                                  f"(weight_l2 {l2}, val loss {val['loss'] if val else 'not evaluated'})", epoch)
        return EpochRow.measured(epoch, step, exp.optimizer.param_groups[0]["lr"],
                                 {"loss": train_loss, "penalty": penalty, "acc": train_acc}, val, clean, (l1, l2),
                                 time.perf_counter() - epoch_start), trained

    def divergence(self, what: str, epoch: int) -> RegbenchError:
        """The one-line error of a diverged run; it says which checkpoint (if any) survives."""
        self.writer.wait()  # the previous epoch's checkpoint is on disk (a write error is raised instead)
        cfg, step, spe, saved = self.cfg, self.state.step, self.exp.steps_per_epoch, self.ckpts.epoch_files()
        kept = (f"its last good checkpoint (epoch {saved[0][0]}) is kept in {self.ckpts.folder}" if saved
                else "no checkpoint was written before it")
        return RegbenchError(
            f"training diverged: {what} in epoch {epoch} (steps {step - spe + 1}-{step}) with optimizer "
            f"{cfg.optimizer.name} lr={cfg.optimizer.lr}, regularizers [{','.join(self.exp.stack.names)}]; {kept}; "
            "fix: lower optimizer.lr, add a warmup (scheduler=warmup) or regularizer=[grad_clip]")

    def finish(self, started: float) -> None:
        """The end of training: the stack's end (e.g. best weights back), the test evaluations, completion."""
        cfg, exp, summary = self.cfg, self.exp, self.summary
        data, model, autocast = exp.data, exp.model, self.rt.autocast
        self.writer.close()  # the last epoch's checkpoint and summary.json are on disk before the test
        if summary.final is None:  # resumed after the last epoch had been checkpointed
            summary.final = last_row(self.run_dir)
        chance = lint.chance_warning(summary.final, data.info.num_classes, len(data.val_y))
        if chance:
            log.warning("warning: %s", chance)
            summary.warnings.append(chance)
        exp.stack.on_train_end(model)  # e.g. restore the best weights (early stopping)
        trained, model = model, exp.stack.eval_model(model, data.train_x)  # the test's model (an average)
        test = evaluate(model, data.test_x, data.test_y, cfg.data.eval_batch_size, autocast)
        extra = {}
        if model is not trained:  # the trained model's own test too, as the extra evaluations report one
            own = evaluate(trained, data.test_x, data.test_y, cfg.data.eval_batch_size, autocast)
            extra["trained"] = {"acc": own["acc"], "nll": own["loss"], "ece": own["ece"]}
        extra.update(exp.stack.final_evals(model, data.test_x, data.test_y, evaluate))
        tta = exp.policy.tta(model, data.test_x, data.test_y, cfg.data.eval_batch_size)
        if tta is not None:
            extra["tta"] = tta
        summary.update(test=test, test_extra=extra, regularizer_info=exp.stack.info())
        self.logger.log_hparams(test, extra)
        # The completion, one atomic step: summary.json says "completed" only once everything else is written.
        # The COMPLETED marker after it can be re-derived from it (sweeps do, if a kill fell in between).
        summary.update(status="completed", finished=provenance.now(), time_s=round(time.perf_counter() - started, 2))
        summary.write(self.run_dir / "summary.json")
        fault_point("before_marker", summary.epochs_completed)
        log.info("test loss %.4f acc %.4f ece %.4f; best epoch %d by %s", test["loss"], test["acc"], test["ece"],
                 summary.best["epoch"], cfg.trainer.monitor)
        for name, result in extra.items():
            log.info("test (%s): acc %.4f nll %.4f ece %.4f", name, result["acc"], result["nll"], result["ece"])




def single_step(exp: Experiment, rt: runtime.Runtime) -> TrainStep:
    """A single run's training step: the direct step where regbench.faststep planned one, else autograd's."""
    if exp.direct is not None:
        return DirectStep(exp.direct, exp.model, exp.optimizer, penalty_fn=exp.penalty_fn, before_step=exp.before_step,
                          after_step=exp.after_step)
    return AutogradStep(exp.model, exp.optimizer, loss_fn=exp.loss_fn, penalty_fn=exp.penalty_fn,
                        before_step=exp.before_step, autocast=rt.autocast, scaler=rt.scaler,
                        after_step=exp.after_step, second_pass=exp.second_pass)


class _SilentBar:
    """What a Run calls on its progress bar when it has none of its own (a stack member: the stack has one)."""

    def set_description(self, *a, **k) -> None:
        pass

    set_postfix = update = close = set_description


_SILENT = _SilentBar()
