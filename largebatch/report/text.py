"""Numbers and tables as the reports write them: one formatter, one markdown table and one CSV writer for every
report (lb-report's and the ladders')."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path


def fmt(x, digits: int = 4) -> str:
    """A cell: "—" for a missing or non-finite value, whole numbers from 1000 to 1e9 as integers (a step or
    sample count), else ``digits`` significant digits (a blown-up perplexity stays 1.531e+26)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and 1000 <= abs(x) < 1e9):
        return str(int(x))
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def table(headers: list, body: list[list]) -> list[str]:
    """A markdown table's lines (a "|" inside a cell is escaped)."""
    def row(cells) -> str:
        return "| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |"

    return [row(headers), "|" + "---|" * len(headers), *map(row, body)]


def write_csv(rows: list[dict], columns: list[str], path: Path) -> Path:
    """``rows`` as CSV with these columns (others ignored; None written empty), atomically."""
    from largebatch.fileio import atomic_write_text

    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    atomic_write_text(Path(path), buffer.getvalue())
    return Path(path)
