"""``regbench report <sweep dir>``: one row per configuration (mean ± std over seeds) and the overfitting plots.

Reads every run's summary.json and metrics.csv below the sweep folder, groups the seeds of one configuration
(the folder above ``seed=N``), and writes report.md, report.csv and three PNGs into the sweep folder.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from regbench.errors import RegbenchError
from regbench.io import LogWriteError, atomic_write, read_json
from regbench.logs import read_metrics
from regbench.records import Summary, monitor_sign

# column -> (label, higher is better)
METRICS = {
    "best_val_loss": ("best-epoch val loss", False),
    "best_val_acc": ("best-epoch val acc", True),
    "final_gap": ("final gap (val − clean train loss)", False),
    "min_val_loss_epoch": ("epoch of min val loss", True),
    "test_acc": ("test acc", True),
    "test_nll": ("test NLL", False),
    "test_ece": ("test ECE", False),
}
# Extra test evaluations (summary.json test_extra) get columns of their own when a sweep has them.
EXTRA = {"acc": ("acc", True), "nll": ("NLL", False), "ece": ("ECE", False)}
CURVES_SIZE = (1200, 600)  # pixels of each PNG (width, height) at 100 dpi
GAP_SIZE = (1000, 600)
BARS_SIZE = (1000, 600)


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
        dirnames[:] = sorted(d for d in dirnames if d not in (".hydra", "tb", "checkpoints", "attempts")
                             and not (here / d).is_symlink())
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
    """The report's numbers of one completed run (summary.json + metrics.csv)."""
    try:
        rows = read_metrics(run_dir / "metrics.csv")
    except (ValueError, TypeError, IndexError) as e:
        raise _Unusable(f"metrics.csv has a malformed row ({e})") from None
    if not rows:
        raise _Unusable("metrics.csv has no epoch rows")
    try:
        final, test = _need(summary.final, "final"), _need(summary.test, "test")
        gap = final.get("clean_gap_loss")
        result = dict(
            seed=summary.seed, regularizers=list(summary.regularizers or []), rows=rows,
            best_val_loss=_best(summary, rows, "val_loss"), best_val_acc=_best(summary, rows, "val_acc"),
            final_gap=gap if gap is not None else final["gap_loss"],
            min_val_loss_epoch=min(rows, key=lambda r: r["val_loss"])["epoch"],
            test_acc=test["acc"], test_nll=test["loss"], test_ece=test["ece"],
        )
        for name, extra in (summary.test_extra or {}).items():
            for k in EXTRA:
                if k in extra:
                    result[f"test_{name}_{k}"] = extra[k]
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


def _best(summary: Summary, rows: list[dict], column: str) -> float:
    """The best value of ``column``: the best epoch's, when the run monitored it, else the best over its epochs
    (in the column's own direction)."""
    if _need(summary.monitor, "monitor") == column:
        return _need(summary.best, "best")[column]
    return min(rows, key=lambda r: monitor_sign(column) * r[column])[column]


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


def _split_overrides(name: str) -> list[str]:
    """Split an override_dirname ("a=1,b=[x,y]") at top-level commas (not those inside brackets or quotes)."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in name:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return parts + [cur]


def short_labels(configs: list[str]) -> dict[str, str]:
    """Configuration names without the overrides every configuration shares (what differs is what matters)."""
    split = {c: _split_overrides(c) for c in configs}
    common = set.intersection(*(set(p) for p in split.values())) if len(configs) > 1 else set()
    return {c: ",".join(p for p in parts if p not in common) or c for c, parts in split.items()}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std; a NaN or inf among the values makes them NaN/inf instead of an exception
    (the statistics module raises on non-finite floats)."""
    n = len(values)
    if not all(math.isfinite(v) for v in values):
        return sum(values) / n, (math.nan if n > 1 else 0.0)
    mean = math.fsum(values) / n
    return mean, (math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def _missing(v: Optional[float]) -> bool:
    return v is None or math.isnan(v)


def metric_columns(runs: list[dict]) -> dict[str, tuple[str, bool]]:
    """METRICS plus a column per extra test evaluation (MC dropout, ensemble, TTA) found in the runs."""
    cols = dict(METRICS)
    for key in sorted({k for r in runs for k in r if k.startswith("test_") and k not in METRICS}):
        name, _, metric = key[len("test_"):].rpartition("_")
        cols[key] = (f"test {EXTRA[metric][0]} ({name})", EXTRA[metric][1])
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
            row[m], row[f"{m}_std"] = _mean_std([float(v) for v in values]) if len(values) == len(members) \
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


def _fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def write_csv(table: list[dict], path: Path) -> None:
    columns = table[0]["_columns"] if table else METRICS
    cols = ["label", "config", "regularizers", "n"] + [c for m in columns for c in (m, f"{m}_std", f"{m}_delta")]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for row in table:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
    _write(path, text.getvalue().encode())


def _write(path: Path, data: bytes) -> None:
    """Write one report file atomically (temp file + rename: never a half-written or 0-byte file). A symlink
    planted at ``path`` is replaced by the new file, never written through (the rename replaces the link
    itself, so a file outside the sweep is not touched)."""
    try:
        atomic_write(path, lambda f: f.write(data))
    except LogWriteError as e:  # its fix names the run folder; here it is the report's folder
        raise RegbenchError(f"{str(e).split('; fix:')[0]}; fix: free disk space or make {path.parent} writable, "
                            "or write the report elsewhere with --out <folder>") from None


def _cell(value: Any) -> str:
    """Text for one Markdown table cell: newlines would end the row and pipes would split it."""
    text = " ".join(str(value if value is not None else "").split())  # all whitespace runs (\n, \r, \t) -> " "
    return text.replace("\\", "\\\\").replace("|", "\\|")


def write_markdown(table: list[dict], failed: list[dict], links: list[Path], sweep_dir: Path, sort: str,
                   path: Path, pngs: list[str]) -> None:
    lines = [f"# Sweep report: {_cell(sweep_dir.name)}", ""]
    if table:
        columns = table[0]["_columns"]
        lines += [f"{sum(r['n'] for r in table)} completed runs in {len(table)} configurations; mean ± sample std "
                  f"over seeds (n per row); sorted by {columns[sort][0]}. Shared by every configuration: "
                  f"{_shared(table) or 'nothing'}. Δ = difference from the baseline "
                  "(the configuration without regularizers)" + ("." if any(r["baseline"] for r in table)
                                                                else "; no single baseline in this sweep."), "",
                  "| configuration | n | " + " | ".join(label for label, _ in columns.values()) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for row in table:
            cells = []
            for m in columns:
                if row[m] is None:
                    cells.append("—")
                    continue
                digits = 1 if m == "min_val_loss_epoch" else 4
                cell = _fmt(row[m], row[f"{m}_std"], row["n"], digits)
                if row[f"{m}_delta"] is not None and not row["baseline"]:
                    cell += f" (Δ {row[f'{m}_delta']:+.{digits}f})"
                cells.append(cell)
            name = f"**{_cell(row['label'])}** (baseline)" if row["baseline"] else _cell(row["label"])
            lines.append(f"| {name} | {row['n']} | " + " | ".join(cells) + " |")
        lines += ["", "## Overfitting curves", ""]
        alt = {"curves.png": "train vs validation loss", "gap.png": "generalization gap over epochs",
               "final_gap.png": "final gap per configuration"}
        lines += [line for name in pngs for line in (f"![{alt[name]}]({name})", "")]
    else:
        lines += ["No completed run in this sweep: no table and no plots. The jobs below failed or did not "
                  "finish; fix the cause (see each job's regbench.log) and re-run the sweep's command.", ""]
    if failed:
        lines += [f"## Failed or unfinished jobs ({len(failed)})", "",
                  "Not in the table above: no summary.json means the job stopped before training started.", "",
                  "| job | status | reason |", "|---|---|---|"]
        lines += [f"| {_cell(f['run'])} | {_cell(f['status'])} | {_cell(f.get('error'))} |" for f in failed]
        lines.append("")
    if links:
        lines += [f"## Symlinked folders not followed ({len(links)})", "",
                  "The report does not follow symbolic links (a link could point outside the sweep, or at a "
                  "configuration counted already); copy the folder in if it belongs to the sweep.", ""]
        lines += [f"- `{_cell(link.relative_to(sweep_dir))}`" for link in links]
        lines.append("")
    _write(path, "\n".join(lines).encode())


def _shared(table: list[dict]) -> str:
    if len(table) < 2:
        return ""
    parts = [set(_split_overrides(row["config"])) for row in table]
    return ", ".join(f"`{p}`" for p in sorted(set.intersection(*parts)))


def _curve(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over seeds of a per-epoch column (epochs that every seed reached)."""
    n_epochs = min(len(r["rows"]) for r in runs)
    epochs = [runs[0]["rows"][i]["epoch"] for i in range(n_epochs)]
    values = [[r["rows"][i][key] for r in runs] for i in range(n_epochs)]
    if any(v is None for vs in values for v in vs):
        return epochs, [], []
    stats = [_mean_std(vs) for vs in values]
    return epochs, [m for m, _ in stats], [s for _, s in stats]


def plot(runs: list[dict], table: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["config"], []).append(r)
    order = [row["config"] for row in table]
    label_of = {row["config"]: row["label"] for row in table}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = []

    fig, ax = plt.subplots(figsize=(CURVES_SIZE[0] / 100, CURVES_SIZE[1] / 100), dpi=100)
    for i, config in enumerate(order):
        c = colors[i % len(colors)]
        train_key = "clean_train_loss" if groups[config][0]["rows"][0]["clean_train_loss"] is not None else "train_loss"
        for key, style, label in ((train_key, "--", "train"), ("val_loss", "-", "val")):
            ep, mean, std = _curve(groups[config], key)
            if not mean:
                continue
            ax.plot(ep, mean, style, color=c, label=f"{label_of[config]} ({label})")
            ax.fill_between(ep, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=c,
                            alpha=0.15, linewidth=0)
    ax.set(xlabel="epoch", ylabel="cross-entropy loss",
           title="Train (dashed, clean: eval mode, plain CE) vs validation (solid); mean ± std over seeds")
    ax.legend(fontsize=7, loc="upper right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    paths.append(_save(fig, out / "curves.png"))

    fig, ax = plt.subplots(figsize=(GAP_SIZE[0] / 100, GAP_SIZE[1] / 100), dpi=100)
    gap_keys = set()
    for i, config in enumerate(order):
        c = colors[i % len(colors)]
        key = "clean_gap_loss" if groups[config][0]["rows"][0]["clean_gap_loss"] is not None else "gap_loss"
        gap_keys.add(key)
        ep, mean, std = _curve(groups[config], key)
        if not mean:
            continue
        ax.plot(ep, mean, color=c, label=label_of[config])
        ax.fill_between(ep, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=c,
                        alpha=0.15, linewidth=0)
    ax.axhline(0, color="grey", linewidth=0.8)
    # Say which train loss the gap subtracts: the clean one (eval mode, plain CE) unless a run has none.
    ylabel = {frozenset({"clean_gap_loss"}): "val loss − clean train loss",
              frozenset({"gap_loss"}): "val loss − train loss (as trained)"}.get(
        frozenset(gap_keys), "val loss − clean train loss (as-trained train loss where no clean one)")
    ax.set(xlabel="epoch", ylabel=ylabel, title="Generalization gap over epochs")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "gap.png"))

    fig, ax = plt.subplots(figsize=(BARS_SIZE[0] / 100, BARS_SIZE[1] / 100), dpi=100)
    ax.bar(range(len(table)), [r["final_gap"] for r in table], yerr=[r["final_gap_std"] for r in table], capsize=4,
           color=[colors[i % len(colors)] for i in range(len(table))])
    ax.set_xticks(range(len(table)), [r["label"] for r in table], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="final val loss − clean train loss", title="Final generalization gap (mean ± std over seeds)")
    fig.subplots_adjust(bottom=0.22)
    paths.append(_save(fig, out / "final_gap.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # no bbox_inches="tight": the size stays exactly figsize × dpi
    plt.close(fig)
    _write(path, buf.getvalue())
    return path


def report(sweep_dir: Path, sort: str = "best_val_loss", out: Optional[Path] = None) -> dict:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise RegbenchError(f"{sweep_dir}: no such folder; fix: give the sweep folder printed at the end of a sweep")
    out = Path(out) if out else sweep_dir
    runs, failed = load_runs(sweep_dir)
    _, links = find_jobs(sweep_dir)
    if not runs and not failed:
        raise RegbenchError(f"{sweep_dir}: no completed run below it (and no failed or unfinished job either); "
                            "fix: give the sweep folder printed at the end of a sweep, or run the sweep first")
    table = aggregate(runs, sort) if runs else []
    if not runs and sort not in METRICS:
        raise RegbenchError(f"--sort {sort!r}: expected one of {', '.join(METRICS)}")
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot(runs, table, out) if runs else []
    write_csv(table, out / "report.csv")
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
    for f in result["files"]:
        print(f)
    for link in result["links"]:
        print(f"regbench: warning: {link}: a symbolic link, not followed (listed in report.md)", file=sys.stderr)
    if result["failed"]:
        print(f"regbench: warning: {len(result['failed'])} failed or unfinished jobs (listed apart in report.md)"
              + ("; no completed run, so no table or plots" if not result["table"] else ""), file=sys.stderr)
    if not all(math.isfinite(r[m]) for r in result["table"] for m in ("best_val_loss", "test_acc")
               if r[m] is not None):
        print("note: some runs have non-finite metrics")
