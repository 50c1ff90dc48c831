"""What a measurement returns, and its two printed forms: the JSON file and the text table."""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Bumped when a key of the JSON file changes meaning.
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal from the issue, reported (never asserted): ``value`` compared with ``limit``."""

    name: str
    value: float
    limit: float
    at_least: bool

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": round(self.value, 3),
            "target": f"{'>=' if self.at_least else '<='} {self.limit:g}",
            "met": self.met,
        }


@dataclasses.dataclass
class Result:
    """One measurement: table rows (one dict per row, same keys), targets, and how it went."""

    name: str
    title: str
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)
    status: str = "ok"  # or "error": the measurement raised; ``note`` says what
    note: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "status": self.status,
            "note": self.note,
            "seconds": round(self.seconds, 2),
            "rows": self.rows,
            "targets": [target.as_dict() for target in self.targets],
        }


def versions() -> dict[str, str]:
    import diffusers
    import peft
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
    }


def write_json(path: Path, config: dict[str, Any], results: Sequence[Result]) -> None:
    document = {
        "schema": SCHEMA_VERSION,
        "versions": versions(),
        "config": config,
        "measurements": {result.name: result.as_dict() for result in results},
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(result: Result) -> str:
    """The measurement as aligned text: a heading, its rows, then its targets."""
    lines = [f"== {result.title} [{result.status}, {result.seconds:.1f} s]"]
    if result.note:
        lines.append(f"   {result.note}")
    if result.rows:
        columns = list(dict.fromkeys(key for row in result.rows for key in row))
        cells = [columns] + [[_cell(row.get(col, "")) for col in columns] for row in result.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
        for line in cells:
            lines.append(
                "   " + "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            )
    for target in result.targets:
        verdict = "met" if target.met else "NOT met"
        lines.append(
            f"   target {target.name}: {target.value:.3g} "
            f"{'>=' if target.at_least else '<='} {target.limit:g}: {verdict}"
        )
    return "\n".join(lines)
