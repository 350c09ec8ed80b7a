"""The report's plots: train vs validation loss curves, the generalization gap over epochs and the final gap per
configuration (mean ± std over seeds), each a PNG of a fixed size."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

from regbench.report_figures import OKABE_ITO
from regbench.report_files import write_file

CURVES_SIZE = (1200, 600)  # pixels of each PNG (width, height) at 100 dpi
GAP_SIZE = (1000, 600)
BARS_SIZE = (1000, 600)


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample std (None for one value: one seed has no spread to report, which is not a spread of 0); a
    NaN or inf among the values makes them NaN/inf instead of an exception (the statistics module raises on
    non-finite floats)."""
    n = len(values)
    if n < 2:
        return (values[0] if values else math.nan), None
    if not all(math.isfinite(v) for v in values):
        return sum(values) / n, math.nan
    mean = math.fsum(values) / n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _curve(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over seeds of a per-epoch column, at the epochs every seed reached and has a value for (a
    column that is empty throughout, e.g. the clean ones with trainer.clean_subset=0, gives no curve; epochs
    that trainer.eval_every skips are left out of the validation curves)."""
    n_epochs = min(len(r["rows"]) for r in runs)
    epochs, stats = [], []
    for i in range(n_epochs):
        values = [r["rows"][i][key] for r in runs]
        if all(v is not None for v in values):
            epochs.append(runs[0]["rows"][i]["epoch"])
            stats.append(mean_std(values))
    return epochs, [m for m, _ in stats], [s for _, s in stats]


def _has(runs: list[dict], key: str) -> bool:
    """Whether the runs recorded ``key`` at all (the clean columns are empty with trainer.clean_subset=0)."""
    return any(row[key] is not None for row in runs[0]["rows"])


def plot(runs: list[dict], table: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # headless
    with matplotlib.rc_context({"text.parse_math": False}):  # a folder's name ("lr=${...}") is text, not mathtext
        return _plot(runs, table, out)


def _plot(runs: list[dict], table: list[dict], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["config"], []).append(r)
    order = [row["config"] for row in table]
    label_of = {row["config"]: row["label"] for row in table}
    colors = OKABE_ITO  # colour-blind safe
    paths = []

    fig, ax = plt.subplots(figsize=(CURVES_SIZE[0] / 100, CURVES_SIZE[1] / 100), dpi=100)
    for i, config in enumerate(order):
        c = colors[i % len(colors)]
        train_key = "clean_train_loss" if _has(groups[config], "clean_train_loss") else "train_loss"
        for key, style, label in ((train_key, "--", "train"), ("val_loss", "-", "val")):
            ep, mean, std = _curve(groups[config], key)
            if not mean:
                continue
            ax.plot(ep, mean, style, color=c, label=f"{label_of[config]} ({label})",
                    marker="o" if len(ep) == 1 else None)  # one evaluated epoch: a point, not an empty line
            _band(ax, ep, mean, std, c)
    ax.set(xlabel="epoch", ylabel="cross-entropy loss",
           title="Train (dashed, clean: eval mode, plain CE) vs validation (solid); mean ± std over seeds")
    ax.legend(fontsize=7, loc="upper right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    paths.append(_save(fig, out / "curves.png"))

    fig, ax = plt.subplots(figsize=(GAP_SIZE[0] / 100, GAP_SIZE[1] / 100), dpi=100)
    gap_keys = set()
    for i, config in enumerate(order):
        c = colors[i % len(colors)]
        key = "clean_gap_loss" if _has(groups[config], "clean_gap_loss") else "gap_loss"
        gap_keys.add(key)
        ep, mean, std = _curve(groups[config], key)
        if not mean:
            continue
        ax.plot(ep, mean, color=c, label=label_of[config], marker="o" if len(ep) == 1 else None)
        _band(ax, ep, mean, std, c)
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
    ax.bar(range(len(table)), [r["final_gap"] for r in table],
           color=[colors[i % len(colors)] for i in range(len(table))])
    spread = [i for i, r in enumerate(table) if r["final_gap_std"] is not None]  # one seed: no error bar at all
    if spread:
        ax.errorbar(spread, [table[i]["final_gap"] for i in spread], yerr=[table[i]["final_gap_std"] for i in spread],
                    fmt="none", ecolor="black", capsize=4)
    ax.set_xticks(range(len(table)), [r["label"] for r in table], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="final val loss − clean train loss", title="Final generalization gap (mean ± std over seeds)")
    fig.subplots_adjust(bottom=0.22)
    paths.append(_save(fig, out / "final_gap.png"))
    return paths


def _band(ax, epochs: list[int], mean: list[float], std: list[Optional[float]], color) -> None:
    """mean ± std over seeds as a band; none where there is one seed (no std)."""
    if any(s is None for s in std):
        return
    ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color,
                    alpha=0.15, linewidth=0)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # no bbox_inches="tight": the size stays exactly figsize × dpi
    plt.close(fig)
    write_file(path, buf.getvalue())
    return path
