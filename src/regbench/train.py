"""The training loop: config -> data on the device -> model -> optimizer/schedule -> epochs -> logs, checkpoints.

Plain PyTorch, one code path for CPU and CUDA (``nullcontext`` vs ``torch.autocast``). The hot loop has no
host synchronisation: per-step loss and accuracy are summed on the device and read once per epoch.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from regbench import accel, provenance
from regbench.validation import validate
from regbench.data import load_data, num_batches
from regbench.errors import ConfigError, RegbenchError
from regbench.augment import build_policy
from regbench.checkpoint import Checkpoints, capture_rng, config_differences, fault_point, restore_rng
from regbench.io import write_json
from regbench.logs import RunLogger
from regbench.evaluation import evaluate, weight_norms
from regbench.regularizers import Context, build_stack
from regbench import conventions, lint
from regbench.models import build_model, count_parameters
from regbench.optim import build_optimizer, build_scheduler
from regbench.rundir import RESUME_MAY_DIFFER, last_row, prepare_run_dir, resumed_rows
from regbench.runtime import autocast_for, default_num_threads, resolve_device, seed_everything, set_determinism

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- loop


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    batch_iter: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                    penalty_fn: Optional[Callable[[nn.Module], Optional[torch.Tensor]]] = None,
                    before_step: Optional[Callable] = None, scheduler=None,
                    autocast: Callable[[], ContextManager] = nullcontext,
                    scaler: Optional[torch.amp.GradScaler] = None, on_step: Optional[Callable[[], None]] = None,
                    ) -> dict[str, Any]:
    """One pass over ``batch_iter``; returns summed data loss, summed penalty (or None), number correct (device
    tensors) and the number of samples seen.

    The optimised objective is loss_fn(logits, y) + penalty_fn(model); the two parts are reported apart.
    ``batch_iter`` yields the batches as trained on (augmented and mixed by ``Policy.train_batches``); with soft
    (mixed) targets, accuracy is counted against each sample's dominant label.
    Nothing here reads a value back to the host, so CUDA steps queue up without stalls.
    """
    model.train()
    # Per-step values are kept as device tensors and reduced once at the end: two cheap ops per step
    # (detach, argmax) instead of a running sum, and no host sync.
    losses, penalties, sizes, preds, targets = [], [], [], [], []
    for xb, yb in batch_iter:
        with autocast():
            logits = model(xb)
            loss = loss_fn(logits, yb)
        objective = loss
        if penalty_fn is not None:
            penalty = penalty_fn(model)  # outside autocast: summed in the parameters' own precision
            if penalty is not None:
                objective = loss + penalty
                penalties.append(penalty.detach())
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            objective.backward()
            if before_step is not None:
                before_step(model, optimizer, None)
            optimizer.step()
        else:
            scaler.scale(objective).backward()
            if before_step is not None:
                before_step(model, optimizer, scaler)
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach())
        preds.append(logits.detach().argmax(1))
        targets.append(yb.argmax(1) if yb.ndim == 2 else yb)
        sizes.append(yb.shape[0])
        if on_step is not None:
            on_step()
    device = next(model.parameters()).device
    if not losses:
        zero = torch.zeros((), device=device)
        return {"loss": zero, "penalty": None, "correct": zero.long(), "seen": 0}
    # Batch sizes as weights, made on the device by fills (at most the last batch is short): a tensor built
    # from the Python list would be a host -> device copy.
    weights = torch.full((len(sizes),), float(sizes[0]), device=device)
    for i, size in enumerate(sizes):
        if size != sizes[0]:
            weights[i] = size
    return {
        "loss": (torch.stack(losses).float() * weights).sum(),
        "penalty": (torch.stack(penalties).float() * weights).sum() if penalties else None,
        "correct": (torch.cat(preds) == torch.cat(targets)).sum(),
        "seen": sum(sizes),
    }


# -------------------------------------------------------------------------------------------- fit


def fit(cfg: DictConfig, run_dir: Path, resume: Optional[bool] = None, default_threads: Optional[int] = None) -> float:
    """Train the composed experiment ``cfg`` and write its results into ``run_dir``.

    With ``trainer.resume=true`` (or ``resume=True``, what sweeps pass) and an unfinished run in ``run_dir``,
    continue it from its newest checkpoint; on CPU the result is bitwise identical to an uninterrupted run.
    ``default_threads`` replaces the all-cores default of ``trainer.num_threads=null`` (parallel sweep jobs).
    Returns the best value of ``trainer.monitor`` (what Hydra sweepers optimise).
    The folder is locked while the run lives (the command line has claimed it already; a sweep job, or a call
    from Python, locks it here), so no other run or resume writes into it meanwhile.
    """
    from regbench.rundir import claim

    run_dir = Path(run_dir)
    held = claim(run_dir, fresh=False).lock  # None when this process holds it already (the command line)
    try:
        return _fit(cfg, run_dir, resume, default_threads)
    finally:
        if held is not None:
            held.release()


def _fit(cfg: DictConfig, run_dir: Path, resume: Optional[bool], default_threads: Optional[int]) -> float:
    validate(cfg)
    t = cfg.trainer
    resuming = prepare_run_dir(run_dir, t.resume if resume is None else resume)
    set_determinism(t.deterministic)
    device = resolve_device(t.device)
    threads = t.num_threads or default_threads or default_num_threads()
    torch.set_num_threads(threads)
    autocast, scaler = autocast_for(device, t.amp)

    seed_everything(cfg.seed)
    data = load_data(cfg.data, device, keep_raw=bool(cfg.augmentation.ops))
    policy = build_policy(cfg.augmentation, data.info, data.pixel_mean)

    # The regularizer stack shapes the model (dropout, norms), its weights (transfer), the optimizer's
    # parameter groups (weight decay), the loss (penalties, smoothing) and the end of training.
    ctx = Context(cfg, num_classes=data.info.num_classes, device=device)
    stack = build_stack(cfg, ctx)
    torch.manual_seed(cfg.seed)  # model init does not depend on how much randomness data loading used
    model = build_model(cfg.model, data.input_shape, data.info.num_classes, **stack.model_hooks()).to(device)
    stack.setup(model)
    params = count_parameters(model)
    optimizer = build_optimizer(cfg.optimizer, stack.param_groups(model, cfg.optimizer), fused=t.fused)
    speed, speed_warning = accel.accelerate(t.compile, model, optimizer, device)
    loss_fn = partial(F.cross_entropy, **stack.loss_options()) if stack.loss_options() else F.cross_entropy
    penalty_fn, before_step = stack.penalty_fn(), stack.before_step_fn()
    warnings = lint.run_warnings(cfg, model, stack, policy, data.info)
    for w in warnings:
        log.warning("warning: %s", w)
    warnings += [speed_warning] if speed_warning else []  # logged where it arose

    bs, drop_last = cfg.data.batch_size, cfg.data.drop_last
    if drop_last and bs > len(data.train_y):
        raise ConfigError("data.batch_size", bs, f"at most the {len(data.train_y)} training images when "
                          "data.drop_last=true (else every batch is dropped)")
    note = lint.batch_of_one(len(data.train_y), bs, drop_last, model)
    if note:
        # Batch norm cannot normalise a training batch of one sample (torch raises): drop that last sample of
        # the epoch's permutation, as data.drop_last=true (Keras/torch users' drop_last) would.
        drop_last = True
        log.warning("note: %s", note)
        warnings = warnings + [note]
    steps_per_epoch = num_batches(len(data.train_y), bs, drop_last)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch, t.max_epochs)
    order = torch.Generator(device=device).manual_seed(cfg.seed)  # data order, on the data's device
    # A fixed subset of the training split, evaluated like validation (eval mode, plain CE): the training
    # loss under dropout / smoothing / penalties is not comparable with the validation loss, this one is.
    n_clean = min(t.clean_subset, len(data.train_y))
    clean_idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(cfg.data.split_seed))
    clean_idx = clean_idx[:n_clean].sort().values.to(device)
    clean_x, clean_y = data.train_x[clean_idx], data.train_y[clean_idx]

    resolved = OmegaConf.to_container(cfg, resolve=True)
    ckpts = Checkpoints(run_dir / "checkpoints", t.keep_last)
    sign = 1.0 if t.monitor == "val_loss" else -1.0  # minimise val_loss, maximise val_acc
    best_score, best_row, start_epoch, step = math.inf, None, 0, 0
    history: list[dict] = []  # every epoch's metrics row, also kept in the checkpoints (restores metrics.csv)
    restore: Optional[list[dict]] = None  # the rows metrics.csv gets back on a resume (None: keep its own)
    if resuming:
        state, load_warnings = ckpts.load_latest(device)
        for w in load_warnings:
            log.warning("warning: %s", w)
        warnings = warnings + load_warnings
        if state is not None:
            differ = config_differences(state["config"], resolved, RESUME_MAY_DIFFER)
            if differ:
                raise RegbenchError(f"cannot resume {run_dir}: its checkpoint was written with another config; keys "
                                    f"that differ: {'; '.join(differ)}; fix: resume with the run's own config "
                                    f"(`regbench resume {run_dir}`) or start a new run folder")
            history, restore = resumed_rows(run_dir, state)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state["scaler"] is not None:
                scaler.load_state_dict(state["scaler"])
            stack.load_state_dict(state["regularizers"])
            restore_rng(state["rng"], order)
            start_epoch, step = state["epoch"], state["step"]
            best_score, best_row = state["best_score"], state["best_row"]
            log.info("resuming %s from epoch %d", run_dir, start_epoch)
        else:
            log.warning("warning: %s has no usable checkpoint; starting it from epoch 1", run_dir)
        ckpts.clean_temporaries()  # only now: a refused resume leaves the folder as it was

    log.info("model %s: %s trainable parameters, %s frozen, %s running-statistic values; optimizer %s; "
             "regularizers [%s]; device %s, %d threads", cfg.model.name, f"{params['trainable']:,}",
             f"{params['frozen']:,}", f"{params['buffers']:,}", cfg.optimizer.name, ",".join(stack.names), device,
             threads)
    stack.log_info(model)

    logger = RunLogger(run_dir, cfg, resume_epoch=start_epoch if resuming else None, rows=restore)
    preview = None if resuming else policy.preview(data, cfg.augmentation.preview)
    if preview is not None:
        logger.log_images(*preview)
    summary = {
        "status": "running", "epochs_completed": start_epoch, "max_epochs": t.max_epochs, "seed": cfg.seed,
        "regularizers": stack.names, "params": params, "monitor": t.monitor, "final": None, "best": best_row,
        "test": None, "data": data.meta, "device": str(device), "amp": t.amp, "num_threads": threads,
        "deterministic": t.deterministic, "steps_per_epoch": steps_per_epoch, "warnings": warnings,
        **speed,
        "regularizer_info": stack.info(), "convention": conventions.effective(cfg, model, optimizer),
        "augmentation": policy.info(), "versions": provenance.versions(), "git": provenance.git_state(), "command": provenance.command() or sys.argv,
        "provenance": provenance.lineage(run_dir, resuming),
        "run_dir": str(run_dir.resolve()), "resumed_from_epoch": start_epoch if resuming else None,
        "started": provenance.now(), "finished": None, "time_s": None, "error": None,
    }
    write_json(run_dir / "summary.json", summary)

    started = time.perf_counter()
    show_bar = sys.stdout.isatty() if t.progress_bar is None else t.progress_bar
    from tqdm.auto import tqdm

    bar = tqdm(total=steps_per_epoch * t.max_epochs, initial=steps_per_epoch * start_epoch, disable=not show_bar,
               unit="step", dynamic_ncols=True, file=sys.stderr, leave=False)
    # While the bar is shown, console log lines go through tqdm.write (the bar is cleared, the line printed,
    # the bar redrawn below it) instead of landing in the middle of the bar's line.
    redirect = _log_through_bar(tqdm) if show_bar else nullcontext()
    redirect.__enter__()
    try:
        stopped = stack.stopped
        for epoch in range(start_epoch + 1, t.max_epochs + 1):
            if stopped:
                break
            epoch_start = time.perf_counter()
            bar.set_description(f"epoch {epoch}/{t.max_epochs}")
            out = train_one_epoch(
                model, optimizer, policy.train_batches(data, bs, order, drop_last), loss_fn=loss_fn,
                penalty_fn=penalty_fn, before_step=before_step, scheduler=scheduler, autocast=autocast,
                scaler=scaler, on_step=bar.update)
            step += steps_per_epoch
            seen = out["seen"]
            train_loss, train_acc = out["loss"].item() / seen, out["correct"].item() / seen  # the epoch's sync
            penalty = out["penalty"].item() / seen if out["penalty"] is not None else 0.0
            if not (math.isfinite(train_loss) and math.isfinite(penalty)):
                raise _divergence(f"non-finite training loss ({train_loss}, penalty {penalty})", epoch, step,
                                  steps_per_epoch, cfg, stack.names, ckpts)
            val = evaluate(model, data.val_x, data.val_y, cfg.data.eval_batch_size, autocast)
            clean = evaluate(model, clean_x, clean_y, cfg.data.eval_batch_size, autocast) if n_clean else None
            l1, l2 = weight_norms(model)
            # The training loss can stay finite while the weights or the validation loss blow up (e.g. SGD
            # lr=10): checked here, from values this epoch reads back anyway (no extra host sync).
            if not (math.isfinite(val["loss"]) and math.isfinite(l2)):
                raise _divergence(f"non-finite {'weights' if not math.isfinite(l2) else 'validation loss'} "
                                  f"(weight_l2 {l2}, val loss {val['loss']})", epoch, step, steps_per_epoch, cfg,
                                  stack.names, ckpts)
            row = {
                "epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                "train_loss": train_loss, "train_penalty": penalty, "train_acc": train_acc,
                "clean_train_loss": clean["loss"] if clean else None,
                "clean_train_acc": clean["acc"] if clean else None,
                "val_loss": val["loss"], "val_acc": val["acc"], "val_ece": val["ece"],
                "gap_loss": val["loss"] - train_loss, "gap_acc": train_acc - val["acc"],
                "clean_gap_loss": val["loss"] - clean["loss"] if clean else None,
                "clean_gap_acc": clean["acc"] - val["acc"] if clean else None,
                "weight_l1": l1, "weight_l2": l2,
                "epoch_time_s": round(time.perf_counter() - epoch_start, 4),
            }
            logger.log_epoch(row)
            history.append(row)
            fault_point("after_metrics", epoch)
            bar.set_postfix(train_loss=f"{train_loss:.4f}", val_loss=f"{val['loss']:.4f}", val_acc=f"{val['acc']:.4f}")
            log.info("epoch %d/%d  train loss %.4f acc %.4f%s | val loss %.4f acc %.4f | gap %.4f | lr %.3g | %.2fs",
                     epoch, t.max_epochs, train_loss, train_acc,
                     f" (clean {clean['loss']:.4f} / {clean['acc']:.4f})" if clean else "", val["loss"], val["acc"],
                     row["clean_gap_loss"] if clean else row["gap_loss"], row["lr"], row["epoch_time_s"])

            improved = sign * row[t.monitor] < best_score
            if improved:
                best_score, best_row = sign * row[t.monitor], dict(row)
            stopped = stack.on_epoch_end(epoch, row, model)
            if t.save_checkpoints and (epoch % t.checkpoint_every == 0 or epoch == t.max_epochs or stopped):
                ckpts.save(epoch, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "regularizers": stack.state_dict(), "rng": capture_rng(order),
                    "epoch": epoch, "step": step, "metrics": row, "best_score": best_score, "best_row": best_row,
                    "config": resolved, "history": list(history),
                }, best=improved)
            summary.update(epochs_completed=epoch, final=row, best=best_row, regularizer_info=stack.info())
            write_json(run_dir / "summary.json", summary)
            fault_point("after_summary", epoch)
            if stopped:
                log.info("early stopping after epoch %d", epoch)

        bar.close()
        if summary["final"] is None:  # resumed after the last epoch had been checkpointed
            summary["final"] = last_row(run_dir)
        chance = lint.chance_warning(summary["final"], data.info.num_classes, len(data.val_y))
        if chance:
            log.warning("warning: %s", chance)
            summary["warnings"].append(chance)
        stack.on_train_end(model)  # e.g. restore the best weights (early stopping)
        test = evaluate(model, data.test_x, data.test_y, cfg.data.eval_batch_size, autocast)
        extra = stack.final_evals(model, data.test_x, data.test_y, evaluate)
        tta = policy.tta(model, data.test_x, data.test_y, cfg.data.eval_batch_size)
        if tta is not None:
            extra["tta"] = tta
        summary.update(test=test, test_extra=extra, regularizer_info=stack.info())
        logger.log_hparams(test, extra)
        # The completion, one atomic step: summary.json says "completed" only once everything else is written.
        # The COMPLETED marker after it can be re-derived from it (sweeps do, if a kill fell in between).
        summary.update(status="completed", finished=provenance.now(), time_s=round(time.perf_counter() - started, 2))
        write_json(run_dir / "summary.json", summary)
        fault_point("before_marker", summary["epochs_completed"])
        log.info("test loss %.4f acc %.4f ece %.4f; best epoch %d by %s", test["loss"], test["acc"], test["ece"],
                 summary["best"]["epoch"], t.monitor)
        for name, result in extra.items():
            log.info("test (%s): acc %.4f nll %.4f ece %.4f", name, result["acc"], result["nll"], result["ece"])
    except BaseException as e:
        bar.close()
        summary.update(status=_stopped_status(e), error=getattr(e, "regbench_reason", None)
                       or (str(e).splitlines()[0] if str(e) else type(e).__name__), finished=provenance.now(),
                       time_s=round(time.perf_counter() - started, 2))
        try:
            write_json(run_dir / "summary.json", summary)
        except RegbenchError:
            pass  # the original error is the one to report
        raise
    finally:
        redirect.__exit__(None, None, None)
        logger.close()
    # The completion marker, written last: sweeps skip a run folder that has it.
    write_json(run_dir / "COMPLETED", {"finished": summary["finished"], "best": summary["best"][t.monitor]})
    return summary["best"][t.monitor]


def _divergence(what: str, epoch: int, step: int, steps_per_epoch: int, cfg: DictConfig, names: list[str],
                ckpts: Checkpoints) -> RegbenchError:
    """The one-line error of a diverged run; it says which checkpoint (if any) survives."""
    saved = ckpts.epoch_files()
    kept = (f"its last good checkpoint (epoch {saved[0][0]}) is kept in {ckpts.folder}" if saved
            else "no checkpoint was written before it")
    return RegbenchError(
        f"training diverged: {what} in epoch {epoch} (steps {step - steps_per_epoch + 1}-{step}) with optimizer "
        f"{cfg.optimizer.name} lr={cfg.optimizer.lr}, regularizers [{','.join(names)}]; {kept}; fix: lower "
        "optimizer.lr, add a warmup (scheduler=warmup) or regularizer=[grad_clip]")




def _log_through_bar(tqdm_class) -> ContextManager:
    """tqdm's redirect of the root logger's console handler; nothing when there is none (tqdm would add one)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    root = logging.getLogger()
    if not any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr) for h in root.handlers):
        return nullcontext()
    return logging_redirect_tqdm(loggers=[root], tqdm_class=tqdm_class)




def _stopped_status(e: BaseException) -> str:
    """summary.json's status when fit ends by ``e``: "preempted" / "timed-out" when SLURM's signal stopped it
    (set by regbench.sweep's watch on submitit's requeue handler; the requeued job resumes), "interrupted" for
    Ctrl-C or another deliberate exit, else "failed" (a sweep runs a failed job again from scratch)."""
    status = getattr(e, "regbench_status", None)
    if status is not None:
        return status
    return "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
