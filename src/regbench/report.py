"""``regbench report <sweep dir>``: one row per configuration (mean ± std over seeds) and the overfitting plots.

Reads every run's summary.json and metrics.csv below the sweep folder, groups the seeds of one configuration
(the folder above ``seed=N``), and writes report.md, report.csv and three PNGs into the sweep folder.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from regbench.errors import RegbenchError
from regbench.io import METRICS_LIMIT, FolderFileError, read_folder_text, read_json
from regbench.records import BAGGING_COLUMNS, METRIC_COLUMNS, Summary
from regbench.report_files import printable, split_overrides, write_csv, write_markdown
from regbench.report_plots import mean_std, plot

# column -> (label, higher is better)
METRICS = {
    "best_val_loss": ("best-epoch val loss", False),  # the values of the run's best epoch (by trainer.monitor)
    "best_val_acc": ("best-epoch val acc", True),
    "final_gap": ("final gap (val − clean train loss)", False),
    "min_val_loss_epoch": ("epoch of min val loss", True),
    "test_acc": ("test acc", True),
    "test_nll": ("test NLL", False),
    "test_ece": ("test ECE", False),
}
# Extra test evaluations (summary.json test_extra) get columns of their own when a sweep has them.
EXTRA = {"acc": ("acc", True), "nll": ("NLL", False), "ece": ("ECE", False)}
EXTRA_NAMES = {"members_mean": "bagging members' mean"}  # a bagging run's members, averaged (its row is the ensemble)


def find_jobs(sweep_dir: Path) -> tuple[list[Path], list[Path]]:
    """(job folders, symlinked folders not followed) below ``sweep_dir``.

    A job folder has a ``.hydra/`` folder (Hydra writes it before the job starts) or a summary.json. Symlinked
    folders are not followed: a link planted in a shared sweep could point anywhere, and a configuration reached
    twice would count its seeds twice; the report names each one instead of skipping it silently.
    """
    jobs, links = [], []
    for dirpath, dirnames, filenames in os.walk(sweep_dir, followlinks=False):
        here = Path(dirpath)
        if ".hydra" in dirnames or "summary.json" in filenames:
            jobs.append(here)
        for d in list(dirnames):
            if (here / d).is_symlink():
                links.append(here / d)
        # attempts/ holds archived failed attempts; the others are a run's own subfolders, no jobs below them
        # (members/ of a bagging run: its members are reported in its row, not as configurations of their own)
        own = (".hydra", "tb", "checkpoints", "attempts") + (("members",) if here in jobs else ())
        dirnames[:] = sorted(d for d in dirnames if d not in own and not (here / d).is_symlink())
    return sorted(jobs), sorted(links)


def _config_of(rel: Path) -> str:
    config = str(rel.parent) if rel.name.startswith("seed=") else str(rel)
    return config if config not in ("", ".") else "default"


def load_runs(sweep_dir: Path) -> tuple[list[dict], list[dict]]:
    """(completed runs, failed or unfinished jobs) below ``sweep_dir``.

    A job that failed before training (no summary.json: bad data, a crash at start) or that never ran is
    listed too, from its own ``sweep_job.json`` and the sweep's ``sweep_status.json``.
    """
    done, failed = [], []
    jobs, _ = find_jobs(sweep_dir)
    for run_dir in jobs:
        rel = run_dir.relative_to(sweep_dir)
        entry = {"run": str(rel), "config": _config_of(rel)}
        if not (run_dir / "summary.json").exists():
            outcome = _job_outcome(run_dir)
            failed.append({**entry, "status": outcome.get("outcome") or "not started",
                           "error": outcome.get("reason") or "no summary.json: the job failed or stopped before "
                                                               "training started (see its regbench.log)"})
            continue
        try:
            summary = Summary.load(run_dir / "summary.json")
        except (OSError, ValueError) as e:
            failed.append({**entry, "status": "unreadable", "error": f"summary.json: {e}"})
            continue
        entry.update(status=summary.status, error=summary.error)
        if summary.status != "completed":
            failed.append(entry)
            continue
        try:
            entry.update(_results(run_dir, summary))
        except _Unusable as e:
            failed.append({**entry, "status": "unusable", "error": str(e)})
            continue
        done.append(entry)
    failed += _missing_jobs(sweep_dir, {f["run"] for f in failed} | {d["run"] for d in done})
    return done, failed


class _Unusable(Exception):
    """A completed run whose files the report cannot use (a bad metrics row, no epoch rows, a missing key)."""


def _results(run_dir: Path, summary: Summary) -> dict:
    """The report's numbers of one completed run (summary.json + metrics.csv). A bagging run's validation and test
    numbers are its ensemble's (``ensemble_val_*``, summary.json ``test``), the gap and the curves its members'
    mean (an ensemble has no training loss); its members' mean test results are the ``members_mean`` columns."""
    bagging = "bagging" in (summary.regularizers or [])
    try:
        rows = read_rows(run_dir / "metrics.csv", bagging)
    except FolderFileError as e:
        raise _Unusable(str(e)) from None
    except (ValueError, TypeError, IndexError) as e:
        raise _Unusable(f"metrics.csv has a malformed row ({e})") from None
    if not rows:
        raise _Unusable("metrics.csv has no epoch rows")
    val = "ensemble_val_" if bagging else "val_"  # the columns of the run's validation results
    try:
        final, test, best = _need(summary.final, "final"), _need(summary.test, "test"), _need(summary.best, "best")
        gap = final.get("clean_gap_loss")
        result = dict(
            seed=summary.seed, regularizers=list(summary.regularizers or []), rows=rows,
            best_val_loss=best[val + "loss"], best_val_acc=best[val + "acc"],
            final_gap=gap if gap is not None else final["gap_loss"],
            min_val_loss_epoch=min(_evaluated(rows, val + "loss"), key=lambda r: r[val + "loss"])["epoch"],
            test_acc=test["acc"], test_nll=test["loss"], test_ece=test["ece"],
        )
        for name, extra in (summary.test_extra or {}).items():
            for k in EXTRA:
                value = extra.get(k, extra.get("loss") if k == "nll" else None)  # members_mean says "loss"
                if value is not None:
                    result[f"test_{name}_{k}"] = value
        for k, v in result.items():
            if k not in ("seed", "regularizers", "rows") and not isinstance(v, (int, float)):
                raise TypeError(f"{k} is {v!r}, expected a number")
        if not all(isinstance(m, str) for m in result["regularizers"]):
            raise TypeError(f"regularizers is {result['regularizers']!r}, expected a list of names")
    except (KeyError, TypeError, AttributeError) as e:
        what = f"key {e}" if isinstance(e, KeyError) else str(e)
        raise _Unusable(f"summary.json: missing or malformed {what}") from None
    return result


def _need(value: Any, key: str) -> Any:
    if value is None:
        raise KeyError(key)
    return value


def _evaluated(rows: list[dict], column: str = "val_loss") -> list[dict]:
    """The rows with validation metrics (trainer.eval_every may skip epochs; the last one always has them)."""
    evaluated = [r for r in rows if r[column] is not None]
    if not evaluated:
        raise _Unusable(f"metrics.csv has no evaluated epoch ({column} is empty in every row)")
    return evaluated


def read_rows(path: Path, bagging: bool = False) -> list[dict]:
    """A run's metrics.csv rows (values as floats, empty as None; a line cut short by a crash is dropped), read as
    regbench reads any file of a folder it is given (a regular file, no link, bounded: regbench.io); a bagging
    run's rows have its ensemble columns too. Raises ValueError (FolderFileError: the file itself is refused)."""
    columns = BAGGING_COLUMNS if bagging else METRIC_COLUMNS
    try:
        text = read_folder_text(path, METRICS_LIMIT, "metrics.csv")
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # the last element is "" after a final newline, or a cut-off line
    if bagging and lines and lines[0].rstrip("\r").split(",") != list(columns):
        raise ValueError("its header is not a bagging run's")
    rows = []
    for line in [ln for ln in lines if ln.count(",") == len(columns) - 1][1:]:
        values = next(csv.reader([line]))
        rows.append({k: (float(v) if v != "" else None) for k, v in zip(columns, values)})
        rows[-1]["epoch"] = int(rows[-1]["epoch"])
    return rows


def _job_outcome(run_dir: Path) -> dict:
    """The sweep's record of one job (sweep_job.json), if it left one."""
    try:
        outcome = read_json(run_dir / "sweep_job.json")
    except (OSError, ValueError):
        return {}
    return {k: outcome.get(k) for k in ("outcome", "reason")
            if isinstance(outcome, dict) and isinstance(outcome.get(k), str)}


def _missing_jobs(sweep_dir: Path, known: set[str]) -> list[dict]:
    """Jobs sweep_status.json lists as failed or not run whose folder the walk did not find."""
    try:
        status = read_json(sweep_dir / "sweep_status.json")
    except (OSError, ValueError):
        return []
    missing = []
    for job in status if isinstance(status, list) else []:
        if not (isinstance(job, dict) and isinstance(job.get("run"), str)) or job["run"] in known:
            continue
        outcome = job.get("outcome") if isinstance(job.get("outcome"), str) else "unknown"
        if outcome in ("ok", "resumed", "skipped"):
            outcome = f"{outcome} in sweep_status.json, folder missing"
        missing.append({"run": job["run"], "config": _config_of(Path(job["run"])), "status": outcome,
                        "error": job.get("reason") if isinstance(job.get("reason"), str) else ""})
    return missing


def short_labels(configs: list[str]) -> dict[str, str]:
    """Configuration names without the overrides every configuration shares (what differs is what matters)."""
    split = {c: split_overrides(c) for c in configs}
    common = set.intersection(*(set(p) for p in split.values())) if len(configs) > 1 else set()
    return {c: ",".join(p for p in parts if p not in common) or c for c, parts in split.items()}


def _missing(v: Optional[float]) -> bool:
    return v is None or math.isnan(v)


def metric_columns(runs: list[dict]) -> dict[str, tuple[str, bool]]:
    """METRICS plus a column per extra test evaluation (MC dropout, ensemble, TTA) found in the runs."""
    cols = dict(METRICS)
    for key in sorted({k for r in runs for k in r if k.startswith("test_") and k not in METRICS}):
        name, _, metric = key[len("test_"):].rpartition("_")
        cols[key] = (f"test {EXTRA[metric][0]} ({EXTRA_NAMES.get(name, name)})", EXTRA[metric][1])
    return cols


def aggregate(runs: list[dict], sort: str = "best_val_loss") -> list[dict]:
    """One row per configuration: n, mean and std of each metric, and the difference from the baseline."""
    columns = metric_columns(runs)
    if sort not in columns:
        raise RegbenchError(f"--sort {sort!r}: expected one of {', '.join(columns)}")
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["config"], []).append(r)
    table = []
    for config, members in groups.items():
        row: dict[str, Any] = {"config": config, "n": len(members),
                               "regularizers": "[" + ",".join(members[0]["regularizers"]) + "]",
                               "seeds": sorted((m["seed"] for m in members), key=str)}
        for m in columns:
            values = [x[m] for x in members if m in x]
            row[m], row[f"{m}_std"] = mean_std([float(v) for v in values]) if len(values) == len(members) \
                else (None, None)
        table.append(row)
    # The baseline is the one configuration without regularizers, when there is exactly one.
    empty = [row for row in table if row["regularizers"] == "[]"]
    baseline = empty[0] if len(empty) == 1 and len(table) > 1 else None
    for row in table:
        for m in columns:
            both = baseline is not None and row[m] is not None and baseline[m] is not None
            row[f"{m}_delta"] = row[m] - baseline[m] if both else None
        row["baseline"] = row is baseline
        row["_columns"] = columns
    labels = short_labels([row["config"] for row in table])
    for row in table:
        row["label"] = labels[row["config"]]
    higher = columns[sort][1]
    # Missing and NaN values sort last (NaN compares false with everything and would scramble the order).
    table.sort(key=lambda row: (_missing(row[sort]), 0 if _missing(row[sort]) else
                                (-row[sort] if higher else row[sort])))
    return table


def report(sweep_dir: Path, sort: str = "best_val_loss", out: Optional[Path] = None) -> dict:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise RegbenchError(f"{printable(sweep_dir)}: no such folder; fix: give the sweep folder printed at the end "
                            "of a sweep")
    out = Path(out) if out else sweep_dir
    runs, failed = load_runs(sweep_dir)
    _, links = find_jobs(sweep_dir)
    if not runs and not failed:
        raise RegbenchError(f"{printable(sweep_dir)}: no completed run below it (and no failed or unfinished job "
                            "either); "
                            "fix: give the sweep folder printed at the end of a sweep, or run the sweep first")
    table = aggregate(runs, sort) if runs else []
    if not runs and sort not in METRICS:
        raise RegbenchError(f"--sort {sort!r}: expected one of {', '.join(METRICS)}")
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot(runs, table, out) if runs else []
    write_csv(table, out / "report.csv", table[0]["_columns"] if table else METRICS)
    write_markdown(table, failed, links, sweep_dir, sort, out / "report.md", [p.name for p in pngs])
    return {"table": table, "failed": failed, "links": links,
            "files": [out / "report.md", out / "report.csv", *pngs]}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="regbench report", description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--sort", default="best_val_loss",
                   help="metric to sort configurations by: " + ", ".join(METRICS) + ", or an extra test column")
    p.add_argument("--out", type=Path, default=None, help="folder for the report (default: the sweep folder)")
    args = p.parse_args(argv)
    result = report(args.sweep_dir, args.sort, args.out)
    for f in result["files"]:  # folder names may hold control characters: shown escaped, never sent raw
        print(printable(f))
    for link in result["links"]:
        print(f"regbench: warning: {printable(link)}: a symbolic link, not followed (listed in report.md)",
              file=sys.stderr)
    if result["failed"]:
        print(f"regbench: warning: {len(result['failed'])} failed or unfinished jobs (listed apart in report.md)"
              + ("; no completed run, so no table or plots" if not result["table"] else ""), file=sys.stderr)
    if not all(math.isfinite(r[m]) for r in result["table"] for m in ("best_val_loss", "test_acc")
               if r[m] is not None):
        print("note: some runs have non-finite metrics")
