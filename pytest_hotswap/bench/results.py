"""What a measurement returns, and its two printed forms: the JSON file and the text table.

A timed value is a :class:`Stat`: the median of its samples and their spread (quartiles, min,
max, count). The table prints it as ``median [q1, q3]``; the JSON keeps every field.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: Bumped when a key of the JSON file changes meaning. 2: timed values are Stat objects
#: (median, q1, q3, min, max, n) instead of bare medians; targets carry their spread.
SCHEMA_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Stat:
    """Median and spread of repeated samples (times in ms, ratios, ...)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Iterable[float]) -> Stat:
        values = sorted(float(v) for v in samples)
        if not values:
            raise ValueError("a Stat needs at least one sample")
        if len(values) == 1:
            q1 = q3 = values[0]
        else:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, values[0], values[-1], len(values))

    def __float__(self) -> float:
        return self.median

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": _round(self.median),
            "q1": _round(self.q1),
            "q3": _round(self.q3),
            "min": _round(self.min),
            "max": _round(self.max),
            "n": self.n,
        }

    def text(self) -> str:
        if self.n == 1:
            return _number(self.median)
        return f"{_number(self.median)} [{_number(self.q1)}, {_number(self.q3)}]"


def median(value: Stat | float) -> float:
    """The median of a Stat, or the number itself."""
    return value.median if isinstance(value, Stat) else float(value)


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal from the issues, reported (never asserted): ``value`` compared with ``limit``.

    ``spread`` is the value's Stat when it was measured repeatedly (its median is ``value``).
    """

    name: str
    value: float
    limit: float
    at_least: bool
    spread: Stat | None = None

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    @property
    def goal(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.limit:g}"

    def as_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "name": self.name,
            "value": _round(self.value),
            "target": self.goal,
            "met": self.met,
        }
        if self.spread is not None:
            document["spread"] = self.spread.as_dict()
        return document

    def text(self) -> str:
        value = self.spread.text() if self.spread is not None else _number(self.value)
        return f"{self.name}: {value} (goal {self.goal}): {'met' if self.met else 'NOT met'}"


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
            "rows": [{key: _json(value) for key, value in row.items()} for row in self.rows],
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


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def _json(value: Any) -> Any:
    if isinstance(value, Stat):
        return value.as_dict()
    if isinstance(value, float):
        return _round(value)
    return value


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _cell(value: Any) -> str:
    if isinstance(value, Stat):
        return value.text()
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _number(value)
    return str(value)


def format_table(result: Result) -> str:
    """The measurement as aligned text: a heading, its rows, then its targets.

    A timed cell reads ``median [q1, q3]``: the median and the interquartile range.
    """
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
        lines.append(f"   target {target.text()}")
    return "\n".join(lines)
