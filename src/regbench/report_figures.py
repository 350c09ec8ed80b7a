"""The report's figures for a paper (issue 29): small multiples of a metric's curves (one panel per configuration,
the baseline's mean in grey in each, the mean over seeds and its 95 % t-interval as a band) and one forest plot
per metric (Δ vs the baseline with its CI). Each figure is written as PNG, PDF and SVG, atomically, in a
colour-blind-safe palette (Okabe & Ito), and byte-identical for the same input (no date, fixed SVG ids).

matplotlib and scipy are imported inside the functions: ``regbench report`` is the only command that draws."""

from __future__ import annotations

import contextlib
import io
import math
import re
import textwrap
from pathlib import Path
from typing import Iterator, Optional, Sequence

from regbench.report_files import write_file

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
CONFIG_COLOR = OKABE_ITO[0]  # a panel's configuration; the baseline is grey
BASELINE_COLOR = "#808080"
FORMATS = ("png", "pdf", "svg")
PNG_DPI = 150
MAX_COLUMNS = 4
PANEL_SIZE = (3.2, 2.4)  # inches per small-multiples panel
LEVEL = 0.95  # the CI level of every band and bar
# No creation date in the PDF/SVG (and no software stamp in the PNG): two reports of one sweep are the same bytes.
_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None}, "svg": {"Date": None}}

Curves = dict[str, list[list[Optional[float]]]]  # config label -> one list per seed -> one value per epoch


def mean_band(values_per_seed: Sequence[float], level: float = LEVEL
              ) -> tuple[float, Optional[float], Optional[float]]:
    """Mean over seeds and the two-sided t-interval of that mean at ``level``: mean ± t(1-(1-level)/2, n-1) · s/√n
    with s the sample std. One value: (value, None, None) — one seed gives no interval (not one of width 0); a NaN
    or inf among the values: NaN bounds (and the mean they give)."""
    from scipy.stats import t

    n = len(values_per_seed)
    if n == 0:
        return math.nan, None, None
    mean = math.fsum(values_per_seed) / n if all(math.isfinite(v) for v in values_per_seed) \
        else sum(values_per_seed) / n
    if n < 2:
        return mean, None, None
    if not math.isfinite(mean):
        return mean, math.nan, math.nan
    half = float(t.ppf(1 - (1 - level) / 2, n - 1)) * math.sqrt(
        math.fsum((v - mean) ** 2 for v in values_per_seed) / (n - 1) / n)
    return mean, mean - half, mean + half


def _mean_curve(seeds: list[list[Optional[float]]]) -> dict:
    """The mean curve of one configuration at the epochs every seed reached and has a value for (early stopping:
    no mean over the survivors only; trainer.eval_every: skipped epochs are left out), 1-based epochs."""
    common = min((len(s) for s in seeds), default=0)
    out: dict = {"epochs": [], "mean": [], "lo": [], "hi": [], "common": common,
                 "longest": max((len(s) for s in seeds), default=0),
                 "nonfinite": sum(1 for s in seeds for v in s if v is not None and not math.isfinite(v))}
    for i in range(common):
        values = [s[i] for s in seeds]
        if any(v is None for v in values):
            continue
        mean, lo, hi = mean_band(values)
        out["epochs"].append(i + 1)
        for key, v in (("mean", mean), ("lo", lo), ("hi", hi)):
            out[key].append(math.nan if v is None or not math.isfinite(v) else v)  # a NaN point: a gap in the line
    return out


def _short(label: str, width: int, lines: int, *, keep_end: bool = True) -> str:
    """``label`` wrapped to at most ``lines`` lines of ``width`` characters. A longer one keeps its start and, with
    ``keep_end``, its end (where configurations' names differ) around an ellipsis; else its start only."""
    room = width * lines - 1
    if keep_end and len(label) > room:
        label = label[:room // 2] + "…" + label[len(label) - (room - room // 2 - 1):]
    return "\n".join(textwrap.wrap(label, width, max_lines=lines, placeholder=" …", break_on_hyphens=False)) \
        or "(empty)"


def _safe_name(name: str) -> str:
    """A metric's name as part of a file name: letters, digits, ``_ . -`` (anything else becomes ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "metric"


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """The figures' matplotlib settings, for their duration only (the other plots keep theirs)."""
    import matplotlib
    from cycler import cycler

    # text.parse_math off: a configuration's name (a folder name, e.g. "${...}") is text, never mathtext to parse
    rc = {"svg.hashsalt": "regbench", "svg.id": "regbench", "axes.prop_cycle": cycler(color=OKABE_ITO),
          "text.parse_math": False,
          "font.size": 8, "axes.titlesize": 8, "figure.titlesize": 9, "legend.fontsize": 7,
          "axes.spines.top": False, "axes.spines.right": False}
    with matplotlib.rc_context({k: v for k, v in rc.items() if k in matplotlib.rcParams}):  # svg.id: matplotlib ≥ 3.8
        yield


def save_figure(fig, out_dir: Path, stem: str) -> list[Path]:
    """``fig`` as ``<out_dir>/<stem>.png`` (150 dpi), ``.pdf`` and ``.svg``: each rendered in memory first, then
    written atomically (a failed write is one RegbenchError naming the file)."""
    data = {}
    for fmt in FORMATS:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=PNG_DPI, metadata=_METADATA[fmt])
        data[fmt] = buf.getvalue()
    paths = []
    for fmt in FORMATS:
        paths.append(out_dir / f"{stem}.{fmt}")
        write_file(paths[-1], data[fmt])
    return paths


def plot_small_multiples(curves: Curves, baseline: Optional[str], out_dir: Path, metric: str = "val_loss", *,
                         train: Optional[Curves] = None, train_metric: str = "train_loss") -> list[Path]:
    """One panel per configuration (the baseline's first), on shared axes, ≤ 4 columns: each seed's curve thin,
    the mean over seeds thick with its 95 % t-interval as a band, the baseline's mean in grey; epoch i is
    ``curves[config][seed][i-1]`` (None: not evaluated). With ``train`` (same shape, e.g. the clean training loss)
    the overfitting view: its mean dashed in each panel, the validation curves solid. Writes
    ``small_multiples_<metric>.{png,pdf,svg}`` (``overfitting_<metric>.*`` with ``train``) into ``out_dir``."""
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("plot_small_multiples: no configuration to draw")
    if baseline is not None and baseline not in curves:
        raise ValueError(f"plot_small_multiples: the baseline {baseline!r} is not one of the configurations")
    order = ([baseline] if baseline is not None else []) + [c for c in curves if c != baseline]
    ncols = min(MAX_COLUMNS, len(order))
    nrows = math.ceil(len(order) / ncols)
    ref = {key: _mean_curve(src[baseline]) for key, src in (("val", curves), ("train", train))
           if baseline is not None and src is not None and baseline in src}
    with _style():
        fig = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 1.0), layout="constrained")
        axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
        for ax, config in zip(axes, order):
            _panel(ax, config, curves[config], (train or {}).get(config),
                   None if config == baseline else ref)
            ax.set_title(_short(config, 38, 3) + (" (baseline)" if config == baseline else ""))
        for ax in axes[len(order):]:
            fig.delaxes(ax)
        for i, ax in enumerate(axes[:len(order)]):
            if i + ncols >= len(order):  # no panel below: this one shows the epochs
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xlabel("epoch")
            if i % ncols == 0:
                ax.set_ylabel(metric if train is None else f"{metric}, {train_metric}")
        what = f"{train_metric} (dashed) and {metric} (solid)" if train is not None else metric
        base = f"; grey: the baseline's mean ({_short(baseline, 60, 1)})" if baseline is not None else ""
        fig.suptitle(f"{what} per configuration: thin lines are seeds, the thick line their mean, the band its "
                     f"{LEVEL:.0%} t-interval (at epochs every seed reached){base}", wrap=True)
        _legend(fig, train is not None, baseline is not None)
        stem = f"{'overfitting' if train is not None else 'small_multiples'}_{_safe_name(metric)}"
        return save_figure(fig, out_dir, stem)


def _panel(ax, config: str, seeds: list, train_seeds: Optional[list], ref: Optional[dict]) -> None:
    """One configuration's panel (see :func:`plot_small_multiples`); ``ref`` the baseline's mean curves."""
    from matplotlib.ticker import MaxNLocator

    for key, style in (("train", "--"), ("val", "-")):
        if ref and key in ref and ref[key]["epochs"]:
            ax.plot(ref[key]["epochs"], ref[key]["mean"], style, color=BASELINE_COLOR, linewidth=1.2, zorder=1)
    for s in seeds:
        points = [(i + 1, v if math.isfinite(v) else math.nan) for i, v in enumerate(s) if v is not None]
        if points:
            ax.plot(*zip(*points), color=CONFIG_COLOR, linewidth=0.6, alpha=0.35, zorder=2)
    for key, src, style in (("train", train_seeds, "--"), ("val", seeds, "-")):
        if not src:
            continue
        c = _mean_curve(src)
        single = len(c["epochs"]) == 1
        ax.plot(c["epochs"], c["mean"], style, color=CONFIG_COLOR, linewidth=1.8, zorder=3,
                marker="o" if single else None)
        if len(src) >= 2 and key == "val":
            ax.fill_between(c["epochs"], c["lo"], c["hi"], color=CONFIG_COLOR, alpha=0.25, linewidth=0, zorder=2)
    c = _mean_curve(seeds)
    notes = [f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}" + (": no CI band" if len(seeds) == 1 else "")]
    if c["common"] < c["longest"]:
        notes.append(f"mean: epochs 1–{c['common']} (all seeds)")
    if c["nonfinite"]:
        notes.append(f"{c['nonfinite']} NaN/inf value(s): gaps")
    if not c["epochs"]:
        notes.append("no value to draw")
    ax.text(0.98, 0.97, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=6.5,
            color="#333333")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers


def _legend(fig, train: bool, baseline: bool) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color=CONFIG_COLOR, linewidth=1.8, label="mean over seeds"),
               Patch(color=CONFIG_COLOR, alpha=0.25, label=f"{LEVEL:.0%} CI of the mean (t)"),
               Line2D([], [], color=CONFIG_COLOR, linewidth=0.6, alpha=0.35, label="one seed")]
    if train:
        handles.append(Line2D([], [], color=CONFIG_COLOR, linestyle="--", label="training (mean)"))
    if baseline:
        handles.append(Line2D([], [], color=BASELINE_COLOR, linewidth=1.2, label="baseline (mean)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)


def plot_forest(rows: list[dict], out_dir: Path) -> list[Path]:
    """One forest plot per metric (in the order the rows first name it): each configuration a row, a point at
    Δ = its value − the baseline's, a bar over the CI [lo, hi], a line at 0, and the row's verdict on the right;
    a filled point where the CI excludes 0, a hollow one where it includes 0 or there is none (``lo``/``hi`` None
    or NaN: one seed). ``rows``: dicts with ``config, metric, delta, lo, hi, verdict``. Writes
    ``forest_<metric>.{png,pdf,svg}`` into ``out_dir``."""
    by_metric: dict[str, list[dict]] = {}
    for row in rows:
        by_metric.setdefault(row["metric"], []).append(row)
    stems = [f"forest_{_safe_name(m)}" for m in by_metric]
    if len(set(stems)) < len(stems):
        raise ValueError(f"plot_forest: metrics {list(by_metric)} give the same file name")
    paths = []
    for (metric, group), stem in zip(by_metric.items(), stems):
        paths += _forest(metric, group, out_dir, stem)
    return paths


def _num(v) -> float:
    return math.nan if v is None or not math.isfinite(v) else float(v)


def _forest(metric: str, rows: list[dict], out_dir: Path, stem: str) -> list[Path]:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = len(rows)
    with _style():
        fig = Figure(figsize=(9.0, 1.4 + 0.5 * n), layout="constrained")
        ax = fig.subplots()
        ys = list(range(n - 1, -1, -1))  # the first row on top
        xs = [0.0]
        for y, row in zip(ys, rows):
            d, lo, hi = _num(row["delta"]), _num(row["lo"]), _num(row["hi"])
            has_ci = math.isfinite(lo) and math.isfinite(hi)
            if has_ci:
                ax.plot([lo, hi], [y, y], color=CONFIG_COLOR, linewidth=1.5, solid_capstyle="butt")
                ax.plot([lo, hi], [y, y], "|", color=CONFIG_COLOR, markersize=7)
                xs += [lo, hi]
            if math.isfinite(d):
                excludes = has_ci and (lo > 0 or hi < 0)
                ax.plot([d], [y], "o", color=CONFIG_COLOR, markersize=6, zorder=3,
                        markerfacecolor=CONFIG_COLOR if excludes else "white")
                xs.append(d)
        ax.axvline(0, color=BASELINE_COLOR, linestyle="--", linewidth=1)
        left, right = min(xs), max(xs)
        pad = 0.08 * (right - left) or 1.0
        ax.set_xlim(left - pad, right + pad)  # 0 always in view
        ax.set_ylim(-0.7, n - 0.3)
        ax.set_yticks(ys, [_short(str(r["config"]), 34, 2) for r in rows])
        side = ax.secondary_yaxis("right")
        side.set_yticks(ys, [_short(str(r.get("verdict") or "") + ("" if math.isfinite(_num(r["delta"])) else
                                                                   " (no Δ)"), 48, 3, keep_end=False) for r in rows])
        side.tick_params(length=0)
        ax.set_xlabel(f"Δ vs baseline ({LEVEL:.0%} CI)")
        ax.set_title(f"{metric}: difference from the baseline per configuration")
        fig.legend(handles=[
            Line2D([], [], marker="o", linestyle="none", color=CONFIG_COLOR, label="CI excludes 0"),
            Line2D([], [], marker="o", linestyle="none", color=CONFIG_COLOR, markerfacecolor="white",
                   label="CI includes 0 (or no CI)")], loc="outside lower center", ncols=2, frameon=False)
        return save_figure(fig, out_dir, stem)
