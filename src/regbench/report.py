"""``regbench report <sweep dir>``: per configuration each metric's mean and CI over seeds; each configuration
against the baseline (paired by seed where the runs share their initial weights, else Welch; regbench.stats).

Reads every run's summary.json, metrics.csv and .hydra/config.yaml below the sweep folder (as data), groups the
seeds of one configuration (the folder above ``seed=N``), and writes report.md, report.csv, report.tex and figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from regbench import report_plots
from regbench.report_figures import plot_forest, plot_small_multiples
from regbench.errors import RegbenchError
from regbench.io import FolderFileError, load_folder_yaml
from regbench.records import Summary
from regbench.report_files import (config_of, job_outcome, missing_jobs, printable, read_rows, short_labels,
                                   write_csv, write_markdown, write_tex)
from regbench.stats import compare, mean_sd, t_interval, with_holm

# column -> (label, higher is better; None: a diagnostic, no better direction). The values of a run's best epoch
# are those of the epoch it chose by trainer.monitor; final: its last epoch (always evaluated); the gaps: final val
# loss − the training loss, clean (eval mode, plain CE: clean_train_loss) or as trained (train_loss: dropout on...).
Column = tuple[str, Optional[bool]]
METRICS = {
    "best_val_loss": ("best-epoch val loss", False),
    "best_val_acc": ("best-epoch val acc", True),
    "final_val_loss": ("final-epoch val loss", False),
    "final_val_acc": ("final-epoch val acc", True),
    "final_gap": ("final gap: val − clean train loss", None),
    "final_gap_trained": ("final gap: val − train loss as trained", None),
    "min_val_loss_epoch": ("epoch of min val loss", None),  # a diagnostic, like the gaps: no better direction
    "test_acc": ("test acc", True),
    "test_nll": ("test NLL", False),
    "test_ece": ("test ECE", False),
}
# Extra test evaluations (summary.json test_extra) get columns of their own when a sweep has them.
EXTRA = {"acc": ("acc", True), "nll": ("NLL", False), "ece": ("ECE", False)}
# bagging: its members, averaged (its row is the ensemble); weight averaging: the model it trained (its row: the average)
EXTRA_NAMES = {"members_mean": "bagging members' mean", "trained": "the trained model"}


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


def load_runs(sweep_dir: Path) -> tuple[list[dict], list[dict]]:
    """(completed runs, failed or unfinished jobs) below ``sweep_dir``.

    A job that failed before training (no summary.json: bad data, a crash at start) or that never ran is
    listed too, from its own ``sweep_job.json`` and the sweep's ``sweep_status.json``.
    """
    done, failed = [], []
    jobs, _ = find_jobs(sweep_dir)
    for run_dir in jobs:
        rel = run_dir.relative_to(sweep_dir)
        entry = {"run": str(rel), "config": config_of(rel)}
        if not (run_dir / "summary.json").exists():
            outcome = job_outcome(run_dir)
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
    failed += missing_jobs(sweep_dir, {f["run"] for f in failed} | {d["run"] for d in done})
    _trained_is_tested(done)
    return done, failed


def _trained_is_tested(runs: list[dict]) -> None:
    """Where some runs evaluated another model than the one they trained (weight averaging: their trained model's
    own test is test_extra.trained), a run that evaluated its trained model has that test as its "trained" one, so
    the trained columns compare every configuration (not only those with an average)."""
    keys = [f"test_trained_{k}" for k in EXTRA]
    if any(k in r for r in runs for k in keys):
        for r in runs:
            if not any(k in r for k in keys):
                r.update({f"test_trained_{k}": r[f"test_{k}"] for k in EXTRA if f"test_{k}" in r})


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
        last = _evaluated(rows, val + "loss")[-1]  # the final epoch (trainer.eval_every: the last one is evaluated)
        result = dict(
            seed=summary.seed, regularizers=list(summary.regularizers or []), rows=rows,
            best_val_loss=best[val + "loss"], best_val_acc=best[val + "acc"],
            final_val_loss=last[val + "loss"], final_val_acc=last[val + "acc"],
            final_gap=final.get("clean_gap_loss"),  # None: no clean training loss (trainer.clean_subset=0)
            final_gap_trained=final["gap_loss"],
            min_val_loss_epoch=min(_evaluated(rows, val + "loss"), key=lambda r: r[val + "loss"])["epoch"],
            test_acc=test["acc"], test_nll=test["loss"], test_ece=test["ece"],
            **_pairing_facts(run_dir, summary),
        )
        for name, extra in (summary.test_extra or {}).items():
            for k in EXTRA:
                value = extra.get(k, extra.get("loss") if k == "nll" else None)  # members_mean says "loss"
                if value is not None:
                    result[f"test_{name}_{k}"] = value
        for k, v in result.items():
            optional = k == "final_gap" and v is None
            if k not in ("seed", "regularizers", "rows", "arch", "data_id") and not optional \
                    and not isinstance(v, (int, float)):
                raise TypeError(f"{k} is {v!r}, expected a number")
        if not all(isinstance(m, str) for m in result["regularizers"]):
            raise TypeError(f"regularizers is {result['regularizers']!r}, expected a list of names")
    except (KeyError, TypeError, AttributeError) as e:
        what = f"key {e}" if isinstance(e, KeyError) else str(e)
        raise _Unusable(f"summary.json: missing or malformed {what}") from None
    return result


def _pairing_facts(run_dir: Path, summary: Summary) -> dict:
    """What decides whether two runs of one seed are a pair (:func:`pairing`): ``arch``, the model config (from
    .hydra/config.yaml, read as data; null without one) and the parameter counts; ``data_id``, the training data."""
    try:
        config = load_folder_yaml(run_dir / ".hydra" / "config.yaml", "config.yaml")
        model = config.get("model") if isinstance(config, dict) else None
    except (OSError, ValueError):  # missing, or not YAML regbench writes (FolderFileError is a ValueError)
        model = None
    return {"arch": json.dumps({"model": model, "params": summary.params}, sort_keys=True, default=str),
            "data_id": json.dumps(summary.data, sort_keys=True, default=str)}


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


def metric_columns(runs: list[dict]) -> dict[str, Column]:
    """METRICS plus a column per extra test evaluation (MC dropout, ensemble, TTA) found in the runs."""
    cols = dict(METRICS)
    for key in sorted({k for r in runs for k in r if k.startswith("test_") and k not in METRICS}):
        name, _, metric = key[len("test_"):].rpartition("_")
        cols[key] = (f"test {EXTRA[metric][0]} ({EXTRA_NAMES.get(name, name)})", EXTRA[metric][1])
    return cols


def choose_columns(columns: dict[str, Column], wanted: Optional[str]) -> dict[str, Column]:
    """``--metrics a,b,c``: those columns, in that order; None: every column. An unknown name: one line."""
    if wanted is None:
        return dict(columns)
    names = list(dict.fromkeys(w.strip() for w in wanted.split(",") if w.strip()))
    bad = [n for n in names if n not in columns] or ([] if names else ["(nothing)"])
    if bad:
        raise RegbenchError(f"--metrics {printable(wanted)!r}: {printable(bad[0])} is not a metric of this sweep; "
                            f"expected a comma-separated list of: {', '.join(columns)}")
    return {n: columns[n] for n in names}


def aggregate(runs: list[dict], sort: str = "best_val_loss") -> list[dict]:
    """One row per configuration: n, seeds, and per metric its mean, sample std, t interval of the mean and the
    value of each seed ({seed: value}, for the comparisons); sorted by ``sort``."""
    columns = metric_columns(runs)
    if sort not in columns:
        raise RegbenchError(f"--sort {sort!r}: expected one of {', '.join(columns)}")
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["config"], []).append(r)
    table = []
    for config, members in groups.items():
        archs, seeds = {m["arch"] for m in members}, [m["seed"] for m in members]
        # a run's key in the comparisons: its seed (a seed found twice, or none: its folder; it pairs with nothing)
        keys = [s if s is not None and seeds.count(s) == 1 else m["run"] for s, m in zip(seeds, members)]
        row: dict[str, Any] = {"config": config, "n": len(members),
                               "regularizers": "[" + ",".join(members[0]["regularizers"]) + "]",
                               "seeds": sorted(seeds, key=str),
                               "arch": archs.pop() if len(archs) == 1 else None,
                               "data_ids": {m["data_id"] for m in members}, "_columns": columns}
        for m in columns:
            values = {k: x.get(m) for k, x in zip(keys, members)}
            complete = all(v is not None for v in values.values())
            row[m], row[f"{m}_std"] = mean_sd(list(values.values())) if complete else (None, None)
            ci = t_interval(list(values.values())) if complete else None
            row[f"{m}_ci_lo"], row[f"{m}_ci_hi"] = ci if ci else (None, None)
            row[f"{m}_values"], row[f"{m}_delta"] = values, None  # Δ: set by the comparison with the baseline
        table.append(row)
    for row, label in zip(table, short_labels([row["config"] for row in table]).values()):
        row["label"] = label
    sign = -1 if columns[sort][1] else 1
    # Missing and NaN values sort last (NaN compares false with everything and would scramble the order).
    table.sort(key=lambda r: (0, sign * r[sort]) if r[sort] is not None and not math.isnan(r[sort]) else (1, 0))
    return table


def pick_baseline(table: list[dict], name: Optional[str]) -> tuple[dict, str]:
    """The baseline row and how it was chosen: ``--baseline`` (a configuration's folder name or its label in the
    table), else the one configuration without regularizers, else the first configuration in folder order."""
    if name is not None:
        match = [r for r in table if name in (r["config"], r["label"])]
        if not match:
            raise RegbenchError(f"--baseline {printable(name)!r}: no such configuration in this sweep; expected one "
                                f"of: {', '.join(printable(r['label']) for r in table)}")
        return match[0], "chosen with --baseline"
    empty = [row for row in table if row["regularizers"] == "[]"]
    if len(empty) == 1:
        return empty[0], "the configuration without regularizers"
    return min(table, key=lambda r: r["config"]), ("the first configuration in folder order; choose another with "
                                                   "--baseline <configuration>")


def pairing(a: dict, b: dict) -> tuple[bool, Optional[str], str]:
    """Whether configurations ``a`` and ``b`` are compared seed by seed: (pairable, why not, what a pair shares).
    ``seed`` seeds the model init (torch.manual_seed right before the model is built) and the data order, so one
    seed gives the same initial weights where the model config and parameter counts agree (dropout, l2, label
    smoothing: yes; batchnorm, another width: no; tests/test_report.py checks it) and the same order where the
    training data agree. No shared initial weights: Welch (report.md's "How to read these numbers")."""
    if a["arch"] is None or a["arch"] != b["arch"]:
        pa, pb = ((json.loads(r["arch"])["params"] if r["arch"] else None) or {} for r in (a, b))
        counts = f" (parameters {pa['total']} vs {pb['total']})" if all("total" in p for p in (pa, pb)) else ""
        return False, f"different architectures{counts}: the same seed does not give the same initial weights", ""
    same_data = len(a["data_ids"]) == 1 and a["data_ids"] == b["data_ids"]
    return True, None, "initial weights and data order" if same_data else "initial weights; the training data differ"


def comparisons(table: list[dict], columns: dict, baseline: dict, all_pairs: bool = False) -> list[dict]:
    """Per metric: every other configuration against the baseline (with ``all_pairs`` every pair, the baseline's
    first), Holm-adjusted across that metric's rows (one family per metric)."""
    others = [r for r in table if r is not baseline]
    pairs = [(baseline, r) for r in others]
    if all_pairs:
        pairs += [(a, b) for i, a in enumerate(others) for b in others[i + 1:]]
    out = []
    for m, (_, higher) in columns.items():
        family = []
        for ref, row in pairs:
            pairable, why, shared = pairing(ref, row)
            family.append({"metric": m, "reference": ref, "row": row, "shared": shared,
                           "comparison": compare(ref[f"{m}_values"], row[f"{m}_values"], higher, pairable, why,
                                                 against="the baseline" if ref is baseline else ref["label"])})
        for f, c in zip(family, with_holm([f["comparison"] for f in family])):
            f["comparison"] = c
        out += family
    return out


def paper_figures(runs: list[dict], table: list[dict], base: dict, rows: list[dict], out: Path) -> list[Path]:
    """The figures for a paper (regbench.report_figures): small multiples of the validation loss per configuration,
    the training loss dashed (the clean one where the runs have it), and a forest plot per metric: each
    configuration's Δ against the baseline with its t interval and verdict."""
    label = {row["config"]: row["label"] for row in table}
    train = "clean_train_loss" if all(any(e["clean_train_loss"] is not None for e in r["rows"]) for r in runs) \
        else "train_loss"
    curves: dict[str, dict[str, list]] = {"val_loss": {}, train: {}}
    for r in runs:
        for key, by_config in curves.items():
            values: list = [None] * max(e["epoch"] for e in r["rows"])
            for e in r["rows"]:
                values[e["epoch"] - 1] = e[key]
            by_config.setdefault(label[r["config"]], []).append(values)
    forest = [{"config": f["row"]["label"], "metric": f["metric"], "delta": f["comparison"].delta,
               "lo": (f["comparison"].t_ci or (None, None))[0], "hi": (f["comparison"].t_ci or (None, None))[1],
               "verdict": f["comparison"].verdict} for f in rows if f["reference"] is base]
    return plot_small_multiples(curves["val_loss"], base["label"], out, "val_loss", train=curves[train],
                                train_metric=train) + plot_forest(forest, out)


def report(sweep_dir: Path, sort: str = "best_val_loss", out: Optional[Path] = None, metrics: Optional[str] = None,
           baseline: Optional[str] = None, all_pairs: bool = False) -> dict:
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
    columns = choose_columns(metric_columns(runs), metrics)
    table = aggregate(runs, sort) if runs else []
    if not runs and sort not in METRICS:
        raise RegbenchError(f"--sort {sort!r}: expected one of {', '.join(METRICS)}")
    base, chosen = pick_baseline(table, baseline) if table else (None, "")
    for row in table:
        row["baseline"] = row is base
    rows = comparisons(table, columns, base, all_pairs) if base is not None else []
    for f in rows:  # the mean Δ against the baseline in the table too (None: not compared)
        if f["reference"] is base:
            f["row"][f"{f['metric']}_delta"] = f["comparison"].delta
    out.mkdir(parents=True, exist_ok=True)
    # the final-gap bars: no bar where a configuration has no clean training loss (trainer.clean_subset=0)
    bars = [{**row, "final_gap": math.nan if row["final_gap"] is None else row["final_gap"]} for row in table]
    figures = report_plots.plot(runs, bars, out) + paper_figures(runs, table, base, rows, out) if runs else []
    result = {"table": table, "failed": failed, "links": links, "columns": columns, "baseline": base,
              "baseline_chosen": chosen, "comparisons": rows, "all_pairs": all_pairs, "sort": sort,
              "sweep_dir": sweep_dir, "figures": [p.name for p in figures]}
    write_csv(result, out / "report.csv")
    write_tex(result, out / "report.tex")
    write_markdown(result, out / "report.md")
    result["files"] = [out / "report.md", out / "report.csv", out / "report.tex", *figures]
    return result


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="regbench report", description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--sort", default="best_val_loss",
                   help="metric to sort configurations by: " + ", ".join(METRICS) + ", or an extra test column")
    p.add_argument("--metrics", default=None,
                   help="the metrics to report, comma-separated (default: all): " + ", ".join(METRICS))
    p.add_argument("--baseline", default=None, help="the configuration every other is compared with (its folder "
                   "name or its label in the table; default: the one without regularizers, else the first)")
    p.add_argument("--all-pairs", action="store_true", help="compare every pair of configurations too")
    p.add_argument("--out", type=Path, default=None, help="folder for the report (default: the sweep folder)")
    args = p.parse_args(argv)
    result = report(args.sweep_dir, args.sort, args.out, args.metrics, args.baseline, args.all_pairs)
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
