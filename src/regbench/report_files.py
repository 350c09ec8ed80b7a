"""The report's files: a run's metrics.csv and a sweep's job records, read as data; report.csv (a row per
configuration: each metric's mean, CI and comparison), report.md (the tables, the verdicts, how to read them,
failed jobs, links not followed) and report.tex (a booktabs table that compiles on its own), each written
atomically; a file that cannot be written is one line naming it."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Optional

from regbench.errors import RegbenchError
from regbench.io import METRICS_LIMIT, LogWriteError, atomic_write, read_folder_text, read_json
from regbench.records import BAGGING_COLUMNS, METRIC_COLUMNS
from regbench.stats import ALPHA, LEVEL, N_RESAMPLES, ROUNDING, interval_text


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


def config_of(rel: Path) -> str:
    config = str(rel.parent) if rel.name.startswith("seed=") else str(rel)
    return config if config not in ("", ".") else "default"


def job_outcome(run_dir: Path) -> dict:
    """The sweep's record of one job (sweep_job.json), if it left one."""
    try:
        outcome = read_json(run_dir / "sweep_job.json")
    except (OSError, ValueError):
        return {}
    return {k: outcome.get(k) for k in ("outcome", "reason")
            if isinstance(outcome, dict) and isinstance(outcome.get(k), str)}


def missing_jobs(sweep_dir: Path, known: set[str]) -> list[dict]:
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
        missing.append({"run": job["run"], "config": config_of(Path(job["run"])), "status": outcome,
                        "error": job.get("reason") if isinstance(job.get("reason"), str) else ""})
    return missing


# report.csv: per metric <m>, the configuration's own numbers, then its comparison with the row's reference (``vs``:
# the baseline; with --all-pairs also one row per other pair), the columns of an older report first.
OWN = ("", "_std", "_ci_lo", "_ci_hi")
VERSUS = ("_delta", "_delta_ci_lo", "_delta_ci_hi", "_boot_lo", "_boot_hi", "_boot_method", "_p", "_p_holm",
          "_effect", "_effect_name", "_paired", "_why_unpaired", "_seeds_for_80pct_power", "_decision", "_verdict")


def csv_columns(columns: dict) -> list[str]:
    return ["label", "config", "regularizers", "n"] + [m + k for m in columns for k in OWN + VERSUS] + ["seeds", "vs"]


def _digits(metric: str) -> int:
    return 1 if metric == "min_val_loss_epoch" else 4


def write_csv(r: dict, path: Path) -> None:
    """One row per configuration (the baseline's first), its mean, std and t interval of each metric, and its
    comparison with ``vs`` (the baseline; with --all-pairs one more row per other pair it is the second of)."""
    cols = csv_columns(r["columns"])
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=cols)
    w.writeheader()
    for row in sorted(r["table"], key=lambda row: not row["baseline"]):
        own = {"label": row["label"], "config": row["config"], "regularizers": row["regularizers"], "n": row["n"],
               "seeds": " ".join(str(s) for s in row["seeds"])}
        for m in r["columns"]:
            own.update({m + k: row[m + k] for k in OWN})
        refs = list(dict.fromkeys(id(f["reference"]) for f in r["comparisons"] if f["row"] is row))
        for ref in refs or [None]:
            cells = dict(own)
            for f in (f for f in r["comparisons"] if f["row"] is row and id(f["reference"]) == ref):
                cells.update(vs=f["reference"]["label"], **{f["metric"] + k: v for k, v in _versus(f).items()})
            w.writerow({k: ("" if cells.get(k) is None else _csv_cell(cells[k])) for k in cols})
    write_file(path, text.getvalue().encode())


def _versus(f: dict) -> dict:
    c = f["comparison"]
    values = (c.delta, *(c.t_ci or (None, None)), *(c.boot_ci or (None, None, None)), c.p, c.p_holm, c.effect,
              c.effect_name if c.effect is not None else None, c.paired, c.why_unpaired,
              c.seeds_needed if c.decision == "within noise" else None, c.decision, c.verdict)
    return dict(zip(VERSUS, values))


def _csv_cell(value: Any) -> Any:
    """A text cell a spreadsheet would evaluate as a formula (starting with = + - @, or a tab / carriage return
    before one) gets a leading ' (OWASP's advice); numbers stay numbers."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_file(path: Path, data: bytes) -> None:
    """Write one report file atomically (temp file + rename: never a half-written or 0-byte file). A symlink
    planted at ``path`` is replaced by the new file, never written through (the rename replaces the link
    itself, so a file outside the sweep is not touched)."""
    try:
        atomic_write(path, lambda f: f.write(data))
    except LogWriteError as e:  # its fix names the run folder; here it is the report's folder
        raise RegbenchError(f"{str(e).split('; fix:')[0]}; fix: free disk space or make {path.parent} writable, "
                            "or write the report elsewhere with --out <folder>") from None


# Markdown's and HTML's own characters in text from a folder (its name, an error text): as themselves, never markup.
# <, >, & as HTML entities; the rest backslash-escaped (CommonMark: any ASCII punctuation may be), and the ":" of
# "://", the "." of "www." and every "@" too, so that no URL or e-mail address becomes a link (GFM's autolinks).
_MD_ESCAPES = {"<": "&lt;", ">": "&gt;", "&": "&amp;", **{c: "\\" + c for c in "\\`*_[](){}!|~#@"}}


def _cell(value: Any) -> str:
    """Text for one Markdown table cell (or line) from a folder name or an error text: whitespace runs (newlines
    would end the row) become one space, control characters are shown as escapes, and Markdown / HTML markup
    (links, images, tags, code spans, emphasis; | would split the cell) is escaped, so it shows as written."""
    text = " ".join(printable(value if value is not None else "").split())  # all whitespace runs -> " "
    return "".join(_MD_ESCAPES.get(c, c) for c in text).replace("://", "\\://").replace("www.", "www\\.")


def printable(value: Any) -> str:
    """``value`` as text with control characters (terminal escape sequences, C1 codes, DEL) shown as Python's
    escapes (``\\x1b``), so a folder name cannot drive the terminal or the renderer; tab and newline kept."""
    text = str(value)
    return "".join(c if c in "\t\n" or (c >= " " and c != "\x7f" and not "\x80" <= c <= "\x9f")
                   else repr(c)[1:-1] for c in text)


def write_markdown(r: dict, path: Path) -> None:
    table, sweep_dir = r["table"], r["sweep_dir"]
    lines = [f"# Sweep report: {_cell(sweep_dir.name)}", ""]
    if table:
        lines += _summary_md(r) + _comparisons_md(r) + _methods_md(r)
        lines += ["## Figures", "", "Each small-multiples and forest figure is also written as PDF and SVG beside "
                  "its PNG.", ""] + [line for name in r["figures"] if name.endswith(".png")
                                     for line in (f"![{_cell(name[:-4])}]({name})", "")]
    else:
        lines += ["No completed run in this sweep: no table and no plots. The jobs below failed or did not "
                  "finish; fix the cause (see each job's regbench.log) and re-run the sweep's command.", ""]
    if r["failed"]:
        lines += [f"## Failed or unfinished jobs ({len(r['failed'])})", "",
                  "Not in the table above: no summary.json means the job stopped before training started.", "",
                  "| job | status | reason |", "|---|---|---|"]
        lines += [f"| {_cell(f['run'])} | {_cell(f['status'])} | {_cell(f.get('error'))} |" for f in r["failed"]]
        lines.append("")
    if r["links"]:
        lines += [f"## Symlinked folders not followed ({len(r['links'])})", "",
                  "The report does not follow symbolic links (a link could point outside the sweep, or at a "
                  "configuration counted already); copy the folder in if it belongs to the sweep.", ""]
        lines += [f"- {_cell(link.relative_to(sweep_dir))}" for link in r["links"]]
        lines.append("")
    write_file(path, "\n".join(lines).encode())


def _summary_md(r: dict) -> list[str]:
    """The per-configuration table: each metric's mean and its t interval (a value alone for one seed)."""
    table, columns, level = r["table"], r["columns"], f"{LEVEL * 100:g} %"
    all_sorts = {**table[0]["_columns"]}
    configs = f"{len(table)} configuration{'s' if len(table) != 1 else ''}"
    lines = [f"{sum(row['n'] for row in table)} completed runs in {configs}. Shared by every "
             f"configuration: {_shared(table) or 'nothing'}. Baseline: **{_cell(r['baseline']['label'])}** "
             f"({_cell(r['baseline_chosen'])}).", "", "## Per configuration", "",
             f"The mean over seeds and its {level} t confidence interval \\[lo, hi\\] (n: seeds); sorted by "
             f"{all_sorts[r['sort']][0]}.", ""]
    if all(row["n"] == 1 for row in table):
        lines += ["**Every configuration has one seed: no interval can be given and no comparison can be tested** "
                  "(an interval needs at least 2 seeds). Run more seeds (e.g. seed=0,1,2,3,4) for them.", ""]
    elif any(row["n"] == 1 for row in table):
        lines += ["A configuration of one seed shows its value alone: no interval can be given for it.", ""]
    lines += ["| configuration | n | " + " | ".join(label for label, _ in columns.values()) + " |",
              "|---|---|" + "---|" * len(columns)]
    for row in table:
        cells = []
        for m in columns:
            mean, lo, hi, d = row[m], row[f"{m}_ci_lo"], row[f"{m}_ci_hi"], _digits(m)
            if mean is None:
                cells.append("—")
            elif lo is None:
                cells.append(f"{mean:.{d}f}" + (" (no interval: nan/inf)" if row["n"] > 1 else ""))
            else:
                cells.append(f"{mean:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]")
        name = f"**{_cell(row['label'])}** (baseline)" if row["baseline"] else _cell(row["label"])
        lines.append(f"| {name} | {row['n']} | " + " | ".join(cells) + " |")
    if any("bagging" in row["regularizers"].strip("[]").split(",") for row in table):
        lines += ["", "Bagging runs (regularizer=\\[bagging\\]): each is one run of its configuration (n counts "
                  "runs, not members). Its validation and test columns are its ensemble's (the softmax averaged "
                  "over its members), its final gaps and its curves its members' mean (an ensemble has no "
                  "training loss); its members (members/\\<j\\> in its folder) are not configurations of "
                  "their own, and their mean test results are the columns marked (bagging members' mean)."]
    return lines + [""]


def _comparisons_md(r: dict) -> list[str]:
    """One table per metric: each comparison's Δ, both intervals, p, p_holm, effect, pairing and verdict."""
    if not r["comparisons"]:
        return []
    level, pairs = f"{LEVEL * 100:g} %", r["all_pairs"]
    lines = ["## Every pair of configurations" if pairs else "## Against the baseline", "",
             "Δ = configuration − " + ("its reference (vs)" if pairs else "baseline") + "; one table per metric, "
             "Holm's correction across the rows of each table; how to read it: below.", ""]
    for m, (label, higher) in r["columns"].items():
        rows = [f for f in r["comparisons"] if f["metric"] == m]
        d = _digits(m)
        better = {True: "higher is better", False: "lower is better", None: "a diagnostic: no better direction"}
        lines += [f"### {label} ({better[higher]})", "",
                  "| configuration | " + ("vs | " if pairs else "") + f"n | Δ | {level} CI (t) | "
                  f"{level} CI (bootstrap) | p | p_holm | effect | test | verdict |",
                  "|---|" + ("---|" if pairs else "") + "---|" * 9]
        for f in rows:
            c = f["comparison"]
            n = f"{c.n}" if c.paired else f"{c.n_baseline} + {c.n}"
            boot = f"{interval_text(c.boot_ci.lo, c.boot_ci.hi)} ({c.boot_ci.method})" if c.boot_ci else "—"
            test = (f"paired ({f['shared']})" if c.paired else f"Welch: {c.why_unpaired}")
            cells = [_cell(f["row"]["label"])] + ([_cell(f["reference"]["label"])] if pairs else []) + [
                n, "—" if c.delta is None else f"{c.delta:+.{d}f}".replace("-", "−"),
                interval_text(*c.t_ci) if c.t_ci else "—", boot, _p(c.p), _p(c.p_holm),
                "—" if c.effect is None else f"{c.effect_name} = {c.effect:+.2f}".replace("-", "−"),
                _cell(test), _cell(c.verdict + (f" ({c.note})" if c.note and not c.note.startswith("equal") else ""))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _p(p: Optional[float]) -> str:
    return "—" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _methods_md(r: dict) -> list[str]:
    level = f"{LEVEL * 100:g} %"
    return ["## How to read these numbers", "",
            f"- **Intervals**: the t interval of the mean (scipy.stats.t), and a bootstrap interval "
            f"(scipy.stats.bootstrap, BCa — the percentile method where BCa is undefined, e.g. too few distinct "
            f"values; {N_RESAMPLES:,} resamples, seeded, so the same sweep gives the same report). With few seeds "
            "(below ~20) bootstrap intervals are too narrow (they ignore that the SD is estimated): the verdicts "
            "use the t interval and the t-test.",
            "- **Pairing**: regbench seeds the model's initial weights (torch.manual_seed(seed) right before the "
            "model is built) and the data order (a generator of its own) from `seed`. Two configurations whose "
            "runs have the same model config and parameter counts (.hydra/config.yaml, summary.json `params`: "
            "e.g. dropout, l2, label smoothing) start from the same weights for the same seed, and see the data in "
            "the same order where their training data agree: they are compared seed by seed (the per-seed "
            "differences Δ; the paired t-test, scipy.stats.ttest_rel; effect d_z = mean Δ / SD of Δ), over the "
            "seeds both have. Configurations of different architectures (batchnorm, another width or model) do "
            "not share their initial weights, and fewer than 2 shared seeds make no pairs: Welch's t-test "
            "(scipy.stats.ttest_ind, equal_var=False; Welch–Satterthwaite interval; effect Hedges' g), marked "
            "Welch with its reason. n: pairs, or baseline + configuration seeds for Welch.",
            f"- **Verdict**: different (higher / lower) when the Holm-adjusted p (Holm's step-down across the "
            f"rows of that metric's table) is below {ALPHA:g}; otherwise within noise, with the {level} t interval "
            "of Δ. Runs equal on every seed up to float32 rounding (|Δ| ≤ "
            f"{ROUNDING:g} · max(1, |value|): e.g. only trainer.num_threads differs, which changes the order of a "
            "sum) are within noise without a test (p = 1).",
            f"- **Seeds for 80 % power** (within-noise rows): the seeds at which the t-test (paired; Welch: per "
            f"configuration) at α = {ALPHA:g}, two-sided, before Holm's correction, would detect the observed "
            "effect with 80 % probability (scipy.stats.nct), **assuming the observed mean Δ and SD of Δ are the "
            "true ones** — optimistic for a small effect measured on few seeds.",
            "- **The gaps**: val loss − the clean training loss (eval mode, plain cross-entropy, on a fixed "
            "training subset) and val loss − the training loss as trained (dropout active, augmentation, smoothing "
            "— the epoch's mean). A regularizer that only raises the training loss measured while it acts "
            "shrinks the second gap, not the first.", ""]


# LaTeX's special characters in text from a folder (a configuration's name) or a label; anything else outside
# printable ASCII as [U+XXXX] (pdflatex's default input encoding does not cover every character a name may hold).
_TEX = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "_": r"\_",
        "%": r"\%", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}", "<": r"\textless{}", ">": r"\textgreater{}",
        "|": r"\textbar{}", "−": "$-$", "Δ": r"$\Delta$"}


def tex_text(value: Any) -> str:
    return "".join(_TEX.get(c, c if " " <= c <= "~" else f"[U+{ord(c):04X}]") for c in printable(value))


def write_tex(r: dict, path: Path) -> None:
    """report.tex: a document that compiles on its own (pdflatex; booktabs, graphicx) holding one table, between
    two marker lines to copy it into a paper: a row per configuration, a column per metric, mean ± the half-width
    of its t interval, the best mean of each column bold, marks for the Holm-adjusted p against the baseline."""
    columns, table = r["columns"], r["table"]
    body = [r"\begin{tabular}{l r " + "c" * len(columns) + "}", r"\toprule",
            "Configuration & $n$ & " + " & ".join(tex_text(label) + {True: r" $\uparrow$", False: r" $\downarrow$",
                                                                     None: ""}[hi]
                                                  for label, hi in columns.values()) + r" \\", r"\midrule"]
    best = {m: _best(table, m, hi) for m, (_, hi) in columns.items() if hi is not None}
    for row in table:
        cells = [tex_text(row["label"]) + (r" (baseline)" if row["baseline"] else ""), str(row["n"])]
        cells += [_tex_cell(r, row, m, best.get(m)) for m in columns]
        body.append(" & ".join(cells) + r" \\")
    body += [r"\bottomrule", r"\end{tabular}"]
    if len(columns) > 4:  # a wide table: scaled to the text width
        body = [r"\resizebox{\textwidth}{!}{%"] + body + ["}"]
    level = f"{LEVEL * 100:g}\\,\\%"
    base = tex_text(r["baseline"]["label"]) if r["baseline"] else "none"
    caption = (f"Mean $\\pm$ half-width of the {level} $t$ confidence interval of the mean over $n$ seeds "
               "(one seed: the value alone, no interval can be given). Bold: the best mean of each column "
               "($\\downarrow$: lower is better, $\\uparrow$: higher; no arrow: a diagnostic, no best). "
               f"$^{{*}}$, $^{{**}}$, $^{{***}}$: different from the baseline ({base}) at a Holm-adjusted "
               "$p < 0.05$, $0.01$, $0.001$ (paired $t$-test over seeds; $^{\\dagger}$: Welch's $t$-test, the "
               "configurations do not share initial weights).")
    lines = [f"% regbench report of {tex_text(r['sweep_dir'].name)}: compiles with pdflatex; copy the table "
             "between the marker lines into a paper (needs booktabs, graphicx).",
             r"\documentclass{article}", r"\usepackage[T1]{fontenc}", r"\usepackage{booktabs}",
             r"\usepackage{graphicx}", r"\begin{document}", "% --- regbench table: from here ---",
             r"\begin{table}[ht]", r"\centering", f"\\caption{{{caption}}}", r"\label{tab:regbench}",
             *body, r"\end{table}", "% --- regbench table: to here ---", r"\end{document}", ""]
    write_file(path, "\n".join(lines).encode())


def _best(table: list[dict], m: str, higher: bool) -> Optional[float]:
    """The best mean of a column as printed (rounded: means equal to the digits shown are equally best)."""
    values = [round(row[m], _digits(m)) for row in table if row[m] is not None and math.isfinite(row[m])]
    return (max(values) if higher else min(values)) if len(table) > 1 and values else None


def _tex_cell(r: dict, row: dict, m: str, best: Optional[float]) -> str:
    mean, lo, hi, d = row[m], row[f"{m}_ci_lo"], row[f"{m}_ci_hi"], _digits(m)
    if mean is None:
        return "--"
    value = f"{mean:.{d}f}" if math.isfinite(mean) else str(mean)
    if lo is not None:
        value += f" \\pm {(hi - lo) / 2:.{d}f}"
    if best is not None and math.isfinite(mean) and round(mean, d) == best:
        value = f"\\mathbf{{{value}}}"
    c = next((f["comparison"] for f in r["comparisons"] if f["metric"] == m and f["row"] is row
              and f["reference"] is r["baseline"]), None)
    marks = ""
    if c is not None and c.decision == "different":
        p = c.p_holm if c.p_holm is not None else c.p
        marks = "*" * sum(p < t for t in (0.05, 0.01, 0.001))
    if c is not None and not c.paired and not c.no_test:
        marks += r"\dagger"
    return f"${value}" + (f"^{{{marks}}}" if marks else "") + "$"


def _shared(table: list[dict]) -> str:
    if len(table) < 2:
        return ""
    parts = [set(split_overrides(row["config"])) for row in table]
    return ", ".join(f"`{p}`" for p in sorted(set.intersection(*parts)))


def short_labels(configs: list[str]) -> dict[str, str]:
    """Configuration names without the overrides every configuration shares (what differs is what matters)."""
    split = {c: split_overrides(c) for c in configs}
    common = set.intersection(*(set(p) for p in split.values())) if len(configs) > 1 else set()
    return {c: ",".join(p for p in parts if p not in common) or c for c, parts in split.items()}


def split_overrides(name: str) -> list[str]:
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
