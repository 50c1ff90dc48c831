"""Plain-text tables: the summary, the comparison and the conformance matrix print with these."""

from __future__ import annotations

from collections.abc import Sequence


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, indent: str = "  "
) -> list[str]:
    """Left-aligned columns two spaces apart, the header first."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return [
        indent
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
