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
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
    write_file(path, text.getvalue().encode())


def write_file(path: Path, data: bytes) -> None:
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
