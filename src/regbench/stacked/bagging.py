"""``fit_bagging``: a run with ``regularizer=[bagging]`` — its members trained as one stack, the ensemble recorded.

The run folder holds its members as run folders (``members/<j>/``: metrics.csv, summary.json, checkpoints...,
no .hydra/ of their own: a member is resumed or re-run with its bagging run, never alone) and its own records of
the ensemble: metrics.csv (per epoch the members' mean of every usual column, plus ``ensemble_val_loss``,
``ensemble_val_acc``, ``ensemble_val_ece`` of the softmax averaged over the members still training, empty on epochs
trainer.eval_every skips; written before the members' checkpoints of the epoch), TensorBoard (the same,
``ensemble/*`` tags), summary.json (``test`` is the ensemble's, ``test_extra.members_mean`` the members' mean,
``bagging`` the members' seeds and how much of the training split each saw) and checkpoints/ensemble.pt (every
member's final weights). ``regbench report`` shows a bagging run as one row (its members are not rows).

Member j's seed: ``SeedSequence([run seed, j])`` (numpy's, first 63 bits) — independent streams, so a sweep over
the run's seed (0, 1, 2) gives independent ensembles rather than overlapping members. Its bootstrap resample: n
indices drawn with replacement by a generator seeded with the member's seed + 1 (the split itself stays
``data.split_seed``'s).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from regbench import provenance, runtime
from regbench.checkpoint import Checkpoints, fault_point
from regbench.errors import RegbenchError, stopped_reason, stopped_status, unrecorded
from regbench.evaluation import probabilities
from regbench.experiment import build_experiment
from regbench.io import METRICS_LIMIT, atomic_write, read_folder_text, write_json
from regbench.logs import summary_writer
from regbench.metrics import summarize_probs
from regbench.records import (
    BAGGING_COLUMNS,
    MARKER,
    METRIC_COLUMNS,
    Summary,
    monitor_sign,
)
from regbench.regularizers.bagging import Bagging
from regbench.rundir import prepare_run_dir
from regbench.stacked.engine import common_epoch, fit_stack
from regbench.state import RunState, restore_latest
from regbench.validation import validate

log = logging.getLogger(__name__)



def is_bagging(cfg: DictConfig) -> bool:
    """A config this engine trains: one whose stack has the bagging member."""
    return Bagging.name in cfg.regularizer


def member_seed(seed: int, j: int) -> int:
    # shifted as a Python int: numpy 1.x refuses uint64 >> int64 (no safe cast), numpy 2 gives the same value
    return int(np.random.SeedSequence([seed % 2 ** 63, j]).generate_state(2, np.uint32).view(np.uint64)[0]) >> 1


def member_configs(cfg: DictConfig) -> list[DictConfig]:
    """The members' configs: the run's without bagging, each with its own seed."""
    out = []
    for j in range(cfg.regularizer.bagging.members):
        c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(c):
            del c.regularizer[Bagging.name]
            c.seed = member_seed(cfg.seed, j)
        out.append(c)
    return out


def bootstrap_indices(n: int, seed: int) -> torch.Tensor:
    """n indices drawn uniformly with replacement (a bootstrap resample), seeded."""
    return torch.randint(0, n, (n,), generator=torch.Generator().manual_seed(seed + 1))


def _resample(seed: int):
    def data_map(data):
        idx = bootstrap_indices(len(data.train_y), seed).to(data.train_y.device)
        raw = {"train_raw": data.train_raw[idx]} if getattr(data, "train_raw", None) is not None else {}
        return dataclasses.replace(data, train_x=data.train_x[idx], train_y=data.train_y[idx], **raw)
    return data_map


def ensemble_metrics(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """loss (NLL), acc, ece of the members' averaged probabilities ``probs`` [K, N, C] (float64)."""

    s = summarize_probs(probs.mean(0), y)
    return {"loss": s["nll"], "acc": s["acc"], "ece": s["ece"]}


class _Observer:
    """The bagging run's own records, after every epoch of the stack and at its end. An epoch's ensemble row is
    written before any member's checkpoint of that epoch (regbench.stacked.engine), so a resume from a checkpoint
    never lacks its row: a kill before the checkpoints redoes the epoch and replaces the row."""

    def __init__(self, cfg: DictConfig, run_dir: Path, resuming: bool, ids: list[int]):
        self.cfg, self.run_dir, self.ids = cfg, run_dir, ids  # ids: member j of each of fit_stack's runs
        self.rows: list[dict] = _read_rows(run_dir / "metrics.csv") if resuming else []
        self.writer = None
        self.runs: dict[int, object] = {}

    def on_start(self, epoch: int) -> None:
        """The members continue after epoch ``epoch`` (a resume): its row and the earlier ones must be there (refused
        before anything is written otherwise); later ones are redone."""
        self.rows = _earlier_rows(self.rows, epoch + 1, self.run_dir)

    def on_epoch_end(self, epoch: int, stack) -> None:
        data, bs = stack.exps[0].data, self.cfg.data.eval_batch_size
        rows = [stack.runs[k].state.history[-1] for k in stack.members]
        ens = {m: None for m in ("loss", "acc", "ece")}  # an epoch trainer.eval_every skips: no ensemble metrics
        if rows[0]["val_loss"] is not None:
            logits = stack.model.evaluate(data.val_x, bs)  # [K_active, N, C]: the members still training
            ens = ensemble_metrics(torch.softmax(logits.double(), -1), data.val_y)
        mean = {c: (sum(r[c] for r in rows) / len(rows) if all(r.get(c) is not None for r in rows) else None)
                for c in METRIC_COLUMNS if c not in ("epoch", "step")}
        row = {"epoch": epoch, "step": rows[0]["step"], **mean, **{f"ensemble_val_{m}": ens[m] for m in ens},
               "members_training": len(rows)}
        self.rows = _earlier_rows(self.rows, epoch, self.run_dir) + [row]
        _write_rows(self.run_dir / "metrics.csv", self.rows)
        if self.writer is None:  # events of this epoch on (a resume redoes them) are dropped: TensorBoard's x is epochs
            self.writer = summary_writer(self.run_dir / "tb", purge_step=epoch)
        for m, v in ens.items():
            if v is not None:
                self.writer.add_scalar(f"ensemble/val_{m}", v, epoch)
        for c in ("train_loss", "val_loss", "val_acc", "val_ece"):
            if mean.get(c) is not None:
                self.writer.add_scalar(f"members_mean/{c}", mean[c], epoch)
        self.writer.flush()
        fault_point("after_ensemble_row", epoch)
        if ens["loss"] is not None:
            log.info("epoch %d/%d  ensemble of %d: val loss %.4f acc %.4f ece %.4f (members' mean: val loss %.4f "
                     "acc %.4f)", epoch, self.cfg.trainer.max_epochs, len(rows), ens["loss"], ens["acc"], ens["ece"],
                     mean["val_loss"], mean["val_acc"])

    def on_end(self, stack) -> None:
        for k, run in enumerate(stack.runs):
            self.runs[self.ids[stack.ids[k]]] = run
        if self.writer is not None:
            self.writer.close()


def _earlier_rows(rows: list[dict], epoch: int, run_dir: Path) -> list[dict]:
    """The rows of epochs 1..epoch-1 (later ones are redone); a gap (a run killed by a regbench before the ensemble
    row was written ahead of the checkpoints lost rows for good) is refused rather than carried on."""
    kept = [r for r in rows if int(r["epoch"]) < epoch]
    missing = sorted(set(range(1, epoch)) - {int(r["epoch"]) for r in kept})
    if missing:
        raise RegbenchError(f"cannot resume {run_dir}: its metrics.csv lacks the ensemble rows of epochs "
                            f"{', '.join(map(str, missing))} (they cannot be recomputed from the members' "
                            "checkpoints); fix: start the bagging run again in a new folder")
    return kept


def fit_bagging(cfg: DictConfig, run_dir: Path, resume: Optional[bool], default_threads: Optional[int]) -> float:
    """Train the ensemble of ``cfg`` (a config with regularizer bagging) into ``run_dir``; the best value of the
    ensemble's validation ``trainer.monitor``. A resume continues the members that had not completed; those that
    had (an early stop, or a kill after their end) are read back from their checkpoints, never written to."""

    validate(cfg)
    started = time.perf_counter()
    resuming = prepare_run_dir(run_dir, cfg.trainer.resume if resume is None else resume)
    b = cfg.regularizer.bagging
    cfgs = member_configs(cfg)
    seeds = [int(c.seed) for c in cfgs]
    dirs = [run_dir / "members" / str(j) for j in range(b.members)]
    _refuse_member_links(run_dir, dirs)
    data_maps = [_resample(s) if b.bootstrap else None for s in seeds]
    todo = [j for j in range(len(dirs)) if not (resuming and _completed(dirs[j]))]
    observer = _Observer(cfg, run_dir, resuming, todo)
    if resuming:  # the ensemble rows up to where the members continue (or ended) must be there: else refused now
        done = [Summary.load(dirs[j] / "summary.json").epochs_completed or 0 for j in range(len(dirs)) if j not in todo]
        observer.on_start(max([*done, common_epoch([cfgs[j] for j in todo], [dirs[j] for j in todo],
                                                    [True] * len(todo)) or 0]))
    summary = Summary(status="running", epochs_completed=0, max_epochs=cfg.trainer.max_epochs, seed=cfg.seed,
                      regularizers=list(cfg.regularizer), monitor=cfg.trainer.monitor, final=None, best=None,
                      test=None, started=provenance.now(), run_dir=str(run_dir.resolve()), warnings=[],
                      versions=provenance.versions(), git=provenance.git_state(), command=provenance.command())
    summary.write(run_dir / "summary.json")
    try:
        values = fit_stack([cfgs[j] for j in todo], [dirs[j] for j in todo], resume=resuming,
                           default_threads=default_threads, observer=observer,
                           member_data=[data_maps[j] for j in todo], group=Bagging.name) if todo else []
        failed = [str(dirs[j]) for j, v in zip(todo, values) if math.isnan(v)]
        if failed:
            raise RegbenchError(f"{len(failed)} of {len(dirs)} bagging members failed (see their summary.json: "
                                f"{', '.join(failed)}); fix: lower optimizer.lr or add regularizer grad_clip")
        runs = [observer.runs.get(j) for j in range(len(dirs))]
        if None in runs:  # members that completed before this resume

            rt = runtime.set_up(cfg.trainer, default_threads)
            shared = next((r.data_loaded for r in runs if r is not None), None)
            for j, r in enumerate(runs):
                if r is None:
                    runs[j] = _completed_member(cfgs[j], dirs[j], rt.device, data_maps[j], shared)
                    shared = runs[j].data_loaded
        return _finish(cfg, run_dir, observer.rows, summary, seeds, dirs, runs, started)
    except BaseException as e:
        # The statuses its members record: preempted / timed-out (SLURM requeues and resumes it), interrupted, failed
        status = stopped_status(e)
        summary.update(status=status, error=stopped_reason(e), finished=provenance.now(),
                       time_s=round(time.perf_counter() - started, 2))
        try:
            summary.write(run_dir / "summary.json")
        except RegbenchError as write_error:  # the original error is the one to report; it says what is lost
            log.warning("warning: %s", unrecorded(e, status, write_error))
        raise


def _refuse_member_links(run_dir: Path, dirs: list[Path]) -> None:
    """Nothing is written through a link: ``members/`` and each ``members/<j>`` must be real folders (or absent)."""
    for p in [run_dir / "members", *dirs]:
        if p.is_symlink():
            raise RegbenchError(f"{p} is a symbolic link; regbench never writes through links in a run folder; "
                                "fix: replace it with the real folder (or choose another run folder)")


def _completed(run_dir: Path) -> bool:
    """A member folder whose summary.json says completed (its COMPLETED marker may not be written yet)."""
    try:
        return Summary.load(run_dir / "summary.json").status == "completed"
    except (OSError, ValueError):
        return False


def _completed_member(cfg: DictConfig, run_dir: Path, device: torch.device, data_map, data) -> SimpleNamespace:
    """A member that completed earlier, read back without writing to it: its model as its end left it (its last
    checkpoint, then its regularizers' end, e.g. the best weights restored), its summary, the data as loaded."""

    summary = Summary.load(run_dir / "summary.json")
    exp = build_experiment(cfg, device, data)
    loaded = exp.data
    if data_map is not None:
        exp.data = data_map(exp.data)
    state = RunState(exp.model, exp.optimizer, exp.scheduler, None, exp.stack,
                     order=torch.Generator(device=device), config=OmegaConf.to_container(cfg, resolve=True),
                     monitor=cfg.trainer.monitor)
    restore_latest(state, Checkpoints(run_dir / "checkpoints", cfg.trainer.keep_last), run_dir, device)
    if state.epoch != summary.epochs_completed:
        raise RegbenchError(f"cannot finish the bagging run: member {run_dir} completed {summary.epochs_completed} "
                            f"epochs but its newest usable checkpoint is of epoch {state.epoch}, and the ensemble "
                            "needs its final weights; fix: start the bagging run again in a new folder")
    exp.stack.on_train_end(exp.model)
    return SimpleNamespace(exp=exp, summary=summary, data_loaded=loaded)


def _finish(cfg, run_dir, rows, summary, seeds, dirs, runs, started) -> float:

    rows = _earlier_rows(rows, int(rows[-1]["epoch"]) + 1 if rows else 1, run_dir)
    data, bs = runs[0].exp.data, cfg.data.eval_batch_size
    models = [r.exp.model.eval() for r in runs]
    probs = torch.stack([probabilities(m, data.test_x, bs) for m in models])
    test = ensemble_metrics(probs, data.test_y)
    member_tests = [r.summary.test for r in runs]
    mean_test = {m: sum(t[m] for t in member_tests) / len(member_tests) for m in ("loss", "acc", "ece")}
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    atomic_write(run_dir / "checkpoints" / "ensemble.pt", lambda f: torch.save(
        {"members": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models], "seeds": seeds}, f))
    fault_point("after_ensemble_weights", len(rows))
    sign = monitor_sign(cfg.trainer.monitor)
    key = "ensemble_" + cfg.trainer.monitor
    scored = [r for r in rows if r[key] not in ("", None)]  # the epochs trainer.eval_every evaluated
    best = min(scored, key=lambda r: sign * float(r[key])) if scored else None
    n = len(runs[0].data_loaded.train_y)
    unique = [round(len(set(bootstrap_indices(n, s).tolist())) / n, 4) if cfg.regularizer.bagging.bootstrap else 1.0
              for s in seeds]
    params = dict(runs[0].exp.params)
    summary.update(status="completed", epochs_completed=int(rows[-1]["epoch"]) if rows else 0,
                   final=_floats(rows[-1]) if rows else None, best=_floats(best) if best else None, test=test,
                   test_extra={"members_mean": mean_test}, params={**params, "ensemble_trainable":
                                                                     params["trainable"] * len(runs)},
                   bagging={"members": len(runs), "bootstrap": bool(cfg.regularizer.bagging.bootstrap),
                            "seeds": seeds, "unique_fraction": unique, "member_dirs": [str(d) for d in dirs]},
                   finished=provenance.now(), time_s=round(time.perf_counter() - started, 2))
    summary.write(run_dir / "summary.json")
    fault_point("before_ensemble_marker", len(rows))
    write_json(run_dir / MARKER, summary.marker())
    log.info("ensemble of %d members: test loss %.4f acc %.4f ece %.4f (members' mean: loss %.4f acc %.4f ece "
             "%.4f)%s", len(runs), test["loss"], test["acc"], test["ece"], mean_test["loss"], mean_test["acc"],
             mean_test["ece"], f"; best epoch {best['epoch']} by {key}" if best else "")
    return float(best[key]) if best else math.nan


def _floats(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        try:
            out[k] = int(v) if k in ("epoch", "step", "members_training") else (None if v in ("", None) else float(v))
        except (TypeError, ValueError):
            out[k] = None
    return out


def _read_rows(path: Path) -> list[dict]:
    """The rows a resumed bagging run keeps, as written (text); a row regbench did not write is refused."""

    try:  # a regular file, no link, bounded (a FolderFileError otherwise: one line)
        rows = list(csv.DictReader(io.StringIO(read_folder_text(path, METRICS_LIMIT, "metrics.csv"), newline="")))
    except FileNotFoundError:  # killed before its first epoch's row
        return []
    except (OSError, csv.Error) as e:
        raise RegbenchError(f"cannot resume: {path} cannot be read ({e}); fix: start the bagging run again in a "
                            "new folder") from None
    for i, r in enumerate(rows, start=2):
        try:
            int(r["epoch"])
            [float(v) for c, v in r.items() if c != "epoch" and v not in ("", None)]
        except (KeyError, TypeError, ValueError):
            raise RegbenchError(f"cannot resume: line {i} of {path} is not a row regbench wrote; fix: start the "
                                "bagging run again in a new folder") from None
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    columns = list(BAGGING_COLUMNS)

    def write(f):
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
        f.write(text.getvalue().encode())
    atomic_write(path, write)
