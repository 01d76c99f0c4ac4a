"""Numbers as the reports print them: one formatter for every table (lb-report's and the ladders')."""

from __future__ import annotations

import math


def fmt(x, digits: int = 4) -> str:
    """A cell: "—" for a missing or non-finite value, whole numbers from 1000 to 1e9 as integers (a step or
    sample count), else ``digits`` significant digits (a blown-up perplexity stays 1.531e+26)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and 1000 <= abs(x) < 1e9):
        return str(int(x))
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def table(headers: list, body: list[list]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(map(str, row)) + " |" for row in body)]
