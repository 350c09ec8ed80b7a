"""The report's files: report.csv and report.md (the table, failed jobs, links not followed), each written
atomically; a file that cannot be written is one line naming it."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from regbench.errors import RegbenchError
from regbench.io import LogWriteError, atomic_write


def _fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def write_csv(table: list[dict], path: Path, columns: dict[str, tuple[str, bool]]) -> None:
    cols = ["label", "config", "regularizers", "n"] + [c for m in columns for c in (m, f"{m}_std", f"{m}_delta")]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for row in table:
        w.writerow({k: ("" if row.get(k) is None else _csv_cell(row.get(k))) for k in cols})
    write_file(path, text.getvalue().encode())


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
        if any("bagging" in row["regularizers"].strip("[]").split(",") for row in table):
            lines += ["", "Bagging runs (regularizer=\\[bagging\\]): each is one run of its configuration (n counts "
                      "runs, not members). Its validation and test columns are its ensemble's (the softmax averaged "
                      "over its members), its final gap and its curves its members' mean (an ensemble has no "
                      "training loss); its members (members/\\<j\\>/ in its folder) are not configurations of "
                      "their own, and their mean test results are the columns marked (bagging members' mean)."]
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
        lines += [f"- {_cell(link.relative_to(sweep_dir))}" for link in links]
        lines.append("")
    write_file(path, "\n".join(lines).encode())


def _shared(table: list[dict]) -> str:
    if len(table) < 2:
        return ""
    parts = [set(split_overrides(row["config"])) for row in table]
    return ", ".join(f"`{p}`" for p in sorted(set.intersection(*parts)))


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
