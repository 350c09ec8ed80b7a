"""``fit_bagging``: a run with ``regularizer=[bagging]`` — its members trained as one stack, the ensemble recorded.

The run folder holds its members as ordinary run folders (``members/<j>/``: metrics.csv, summary.json,
checkpoints... each resumable and reportable like any run) and its own records of the ensemble: metrics.csv (per
epoch the members' mean of every usual column, plus ``ensemble_val_loss``, ``ensemble_val_acc``,
``ensemble_val_ece`` of the softmax averaged over the members, empty on epochs trainer.eval_every skips), TensorBoard (the same, ``ensemble/*`` tags),
summary.json (``test`` is the ensemble's, ``test_extra.members_mean`` the members' mean, ``bagging`` the members'
seeds and how much of the training split each saw) and checkpoints/ensemble.pt (every member's final weights).

Member j's seed: ``SeedSequence([run seed, j])`` (numpy's, first 63 bits) — independent streams, so a sweep over
the run's seed (0, 1, 2) gives independent ensembles rather than overlapping members. Its bootstrap resample: n
indices drawn with replacement by a generator seeded with the member's seed + 1 (the split itself stays
``data.split_seed``'s).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from regbench import provenance
from regbench.io import atomic_write, write_json
from regbench.records import METRIC_COLUMNS, Summary, monitor_sign

ENSEMBLE_COLUMNS = ("ensemble_val_loss", "ensemble_val_acc", "ensemble_val_ece")


def member_seed(seed: int, j: int) -> int:
    return int(np.random.SeedSequence([seed % 2 ** 63, j]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def member_configs(cfg: DictConfig) -> list[DictConfig]:
    """The members' configs: the run's without bagging, each with its own seed."""
    out = []
    for j in range(cfg.regularizer.bagging.members):
        c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(c):
            del c.regularizer["bagging"]
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
    from regbench.metrics import summarize_probs

    s = summarize_probs(probs.mean(0), y)
    return {"loss": s["nll"], "acc": s["acc"], "ece": s["ece"]}


class _Observer:
    """The bagging run's own records, after every epoch of the stack and at its end."""

    def __init__(self, cfg: DictConfig, run_dir: Path, resuming: bool):
        self.cfg, self.run_dir = cfg, run_dir
        self.rows: list[dict] = _read_rows(run_dir / "metrics.csv") if resuming else []
        self.writer = None
        self.runs: dict[int, object] = {}

    def on_epoch_end(self, epoch: int, stack) -> None:
        from torch.utils.tensorboard import SummaryWriter

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
        self.rows = [r for r in self.rows if int(r["epoch"]) < epoch] + [row]
        _write_rows(self.run_dir / "metrics.csv", self.rows)
        if self.writer is None:
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=rows[0]["step"])
        for m, v in ens.items():
            if v is not None:
                self.writer.add_scalar(f"ensemble/val_{m}", v, epoch)
        for c in ("train_loss", "val_loss", "val_acc", "val_ece"):
            if mean.get(c) is not None:
                self.writer.add_scalar(f"members_mean/{c}", mean[c], epoch)
        self.writer.flush()

    def on_end(self, stack) -> None:
        for k, run in enumerate(stack.runs):
            self.runs[stack.ids[k]] = run
        if self.writer is not None:
            self.writer.close()


def fit_bagging(cfg: DictConfig, run_dir: Path, resume: Optional[bool], default_threads: Optional[int]) -> float:
    """Train the ensemble of ``cfg`` (a config with regularizer bagging) into ``run_dir``; the best value of the
    ensemble's validation ``trainer.monitor``."""
    from regbench.rundir import prepare_run_dir
    from regbench.stacked.engine import fit_stack
    from regbench.validation import validate

    validate(cfg)
    started = time.perf_counter()
    resuming = prepare_run_dir(run_dir, cfg.trainer.resume if resume is None else resume)
    b = cfg.regularizer.bagging
    cfgs = member_configs(cfg)
    seeds = [int(c.seed) for c in cfgs]
    dirs = [run_dir / "members" / str(j) for j in range(b.members)]
    observer = _Observer(cfg, run_dir, resuming)
    summary = Summary(status="running", epochs_completed=0, max_epochs=cfg.trainer.max_epochs, seed=cfg.seed,
                      regularizers=list(cfg.regularizer), monitor=cfg.trainer.monitor, final=None, best=None,
                      test=None, started=provenance.now(), run_dir=str(run_dir.resolve()), warnings=[],
                      versions=provenance.versions(), git=provenance.git_state(), command=provenance.command())
    summary.write(run_dir / "summary.json")
    try:
        values = fit_stack(cfgs, dirs, resume=resuming, default_threads=default_threads, observer=observer,
                           member_data=[_resample(s) if b.bootstrap else None for s in seeds], group="bagging")
        return _finish(cfg, run_dir, observer, summary, seeds, dirs, values, started)
    except BaseException as e:
        summary.update(status="failed" if isinstance(e, Exception) else "interrupted",
                       error=(str(e).splitlines() or [type(e).__name__])[0], finished=provenance.now())
        summary.write(run_dir / "summary.json")
        raise


def _finish(cfg, run_dir, observer, summary, seeds, dirs, values, started) -> float:
    from regbench.errors import RegbenchError
    from regbench.evaluation import probabilities

    failed = [str(d) for d, v in zip(dirs, values) if math.isnan(v)]
    if failed:
        raise RegbenchError(f"{len(failed)} of {len(dirs)} bagging members failed (see their summary.json: "
                            f"{', '.join(failed)}); fix: lower optimizer.lr or add regularizer grad_clip")
    runs = [observer.runs[j] for j in range(len(dirs))]
    data, bs = runs[0].exp.data, cfg.data.eval_batch_size
    models = [r.exp.model.eval() for r in runs]
    probs = torch.stack([probabilities(m, data.test_x, bs) for m in models])
    test = ensemble_metrics(probs, data.test_y)
    member_tests = [r.summary.test for r in runs]
    mean_test = {m: sum(t[m] for t in member_tests) / len(member_tests) for m in ("loss", "acc", "ece")}
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    atomic_write(run_dir / "checkpoints" / "ensemble.pt", lambda f: torch.save(
        {"members": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models], "seeds": seeds}, f))
    rows = observer.rows
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
    write_json(run_dir / "COMPLETED", summary.marker())
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
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _write_rows(path: Path, rows: list[dict]) -> None:
    columns = list(METRIC_COLUMNS) + list(ENSEMBLE_COLUMNS) + ["members_training"]

    def write(f):
        import io

        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
        f.write(text.getvalue().encode())
    atomic_write(path, write)
