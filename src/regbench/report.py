"""``regbench report <sweep dir>``: one row per configuration (mean ± std over seeds) and the overfitting plots.

Reads every run's summary.json and metrics.csv below the sweep folder, groups the seeds of one configuration
(the folder above ``seed=N``), and writes report.md, report.csv and three PNGs into the sweep folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional

from regbench.errors import RegbenchError
from regbench.logs import read_metrics

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


def load_runs(sweep_dir: Path) -> tuple[list[dict], list[dict]]:
    """(completed runs, failed or unfinished runs) below ``sweep_dir``."""
    done, failed = [], []
    for summary_path in sorted(sweep_dir.rglob("summary.json")):
        run_dir = summary_path.parent
        rel = run_dir.relative_to(sweep_dir)
        if "attempts" in rel.parts:
            continue
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError) as e:
            failed.append({"run": str(rel), "config": str(rel), "status": "unreadable", "error": str(e)})
            continue
        config = str(rel.parent) if rel.name.startswith("seed=") else str(rel)
        config = config if config not in ("", ".") else "default"
        entry = {"run": str(rel), "config": config, "status": summary.get("status"), "error": summary.get("error")}
        if summary.get("status") != "completed":
            failed.append(entry)
            continue
        rows = read_metrics(run_dir / "metrics.csv")
        final = summary["final"]
        gap = final.get("clean_gap_loss")
        entry.update(
            seed=summary.get("seed"), regularizers=summary.get("regularizers", []), rows=rows,
            best_val_loss=summary["best"]["val_loss"] if summary["monitor"] == "val_loss"
            else min(r["val_loss"] for r in rows),
            best_val_acc=summary["best"]["val_acc"] if summary["monitor"] == "val_acc"
            else max(r["val_acc"] for r in rows),
            final_gap=gap if gap is not None else final["gap_loss"],
            min_val_loss_epoch=min(rows, key=lambda r: r["val_loss"])["epoch"],
            test_acc=summary["test"]["acc"], test_nll=summary["test"]["loss"], test_ece=summary["test"]["ece"],
        )
        for name, result in (summary.get("test_extra") or {}).items():
            for k in EXTRA:
                if k in result:
                    entry[f"test_{name}_{k}"] = result[k]
        done.append(entry)
    return done, failed


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
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


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
                               "seeds": sorted(m["seed"] for m in members)}
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
    table.sort(key=lambda row: (row[sort] is None, -row[sort] if higher and row[sort] is not None
                                else (row[sort] if row[sort] is not None else 0)))
    return table


def _fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def write_csv(table: list[dict], path: Path) -> None:
    columns = table[0]["_columns"]
    cols = ["label", "config", "regularizers", "n"] + [c for m in columns for c in (m, f"{m}_std", f"{m}_delta")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in table:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})


def write_markdown(table: list[dict], failed: list[dict], sweep_dir: Path, sort: str, path: Path) -> None:
    columns = table[0]["_columns"]
    lines = [f"# Sweep report: {sweep_dir.name}", "",
             f"{sum(r['n'] for r in table)} completed runs in {len(table)} configurations; mean ± sample std over "
             f"seeds (n per row); sorted by {columns[sort][0]}. Shared by every configuration: "
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
        name = f"**{row['label']}** (baseline)" if row["baseline"] else row["label"]
        lines.append(f"| {name} | {row['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Overfitting curves", "", "![train vs validation loss](curves.png)", "",
              "![generalization gap over epochs](gap.png)", "", "![final gap per configuration](final_gap.png)", ""]
    if failed:
        lines += ["## Failed or unfinished runs", "", "| run | status | error |", "|---|---|---|"]
        lines += [f"| {f['run']} | {f['status']} | {f.get('error') or ''} |" for f in failed]
        lines.append("")
    path.write_text("\n".join(lines))


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
    paths.append(_save(fig, out / "curves.png"))

    fig, ax = plt.subplots(figsize=(GAP_SIZE[0] / 100, GAP_SIZE[1] / 100), dpi=100)
    for i, config in enumerate(order):
        c = colors[i % len(colors)]
        key = "clean_gap_loss" if groups[config][0]["rows"][0]["clean_gap_loss"] is not None else "gap_loss"
        ep, mean, std = _curve(groups[config], key)
        ax.plot(ep, mean, color=c, label=label_of[config])
        ax.fill_between(ep, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=c,
                        alpha=0.15, linewidth=0)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="epoch", ylabel="val loss − train loss", title="Generalization gap over epochs")
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
    fig.savefig(path, dpi=100)  # no bbox_inches="tight": the size stays exactly figsize × dpi
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def report(sweep_dir: Path, sort: str = "best_val_loss", out: Optional[Path] = None) -> dict:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise RegbenchError(f"{sweep_dir}: no such folder; fix: give the sweep folder printed at the end of a sweep")
    out = Path(out) if out else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    runs, failed = load_runs(sweep_dir)
    if not runs:
        raise RegbenchError(f"{sweep_dir}: no completed run below it (found {len(failed)} failed or unfinished); "
                            "fix: run or resume the sweep first")
    table = aggregate(runs, sort)
    write_csv(table, out / "report.csv")
    write_markdown(table, failed, sweep_dir, sort, out / "report.md")
    pngs = plot(runs, table, out)
    return {"table": table, "failed": failed, "files": [out / "report.md", out / "report.csv", *pngs]}


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
    if not math.isfinite(sum(r["best_val_loss"] for r in result["table"])):
        print("note: some runs have non-finite metrics")
