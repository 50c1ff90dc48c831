"""The goals the issues set for the bench's figures, in one table: reported, never asserted.

Each :class:`Goal` names a measurement, the row it reads (by the values of some of its columns)
and the column compared with the limit. The table, the JSON (``targets``) and the plot (goal
lines) all read this table; nothing else writes a limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pytest_hotswap.bench.results import Result, Stat, Target, median


@dataclasses.dataclass(frozen=True)
class Goal:
    """``row[column]`` of the matching row of ``measurement`` against ``limit``."""

    measurement: str
    where: tuple[tuple[str, Any], ...]
    column: str
    limit: float
    at_least: bool
    name: str
    issue: str

    def matches(self, row: Mapping[str, Any]) -> bool:
        return all(row.get(key) == value for key, value in self.where)


def _goal(
    measurement: str,
    where: Mapping[str, Any],
    column: str,
    limit: float,
    *,
    at_least: bool = False,
    name: str,
    issue: str,
) -> Goal:
    return Goal(measurement, tuple(where.items()), column, limit, at_least, name, issue)


GOALS: tuple[Goal, ...] = (
    _goal(
        "swap_latency",
        {"model": "flux-deep"},
        "reference_x_padded_floor",
        1.3,
        name="flux-deep reference / padded floor",
        issue="#15",
    ),
    _goal(
        "swap_latency",
        {"model": "flux-wide"},
        "reference_x_padded_floor",
        1.0,
        name="flux-wide reference / padded floor",
        issue="#15",
    ),
    _goal(
        "swap_latency",
        {"model": "flux-deep"},
        "peft_fn_x_reference",
        4.0,
        at_least=True,
        name="flux-deep PEFT function / reference",
        issue="#15",
    ),
    _goal(
        "swap_latency",
        {"model": "flux-wide"},
        "peft_fn_x_reference",
        4.0,
        at_least=True,
        name="flux-wide PEFT function / reference",
        issue="#15",
    ),
    _goal(
        "plugin_overhead",
        {"case": "compiled call in a watcher"},
        "overhead_ms",
        1.0,
        name="watched compiled call, overhead ms",
        issue="#11",
    ),
    _goal(
        "plugin_overhead",
        {"case": "compiled call, isolate_recompiles=True"},
        "overhead_ms",
        1.0,
        name="isolated compiled call, overhead ms",
        issue="#11",
    ),
    _goal(
        "installed_plugin",
        {"run": "plugin cost"},
        "wall_ms",
        50.0,
        name="installed plugin on an unrelated suite, ms",
        issue="#15",
    ),
)


def goals_of(measurement: str) -> list[Goal]:
    return [goal for goal in GOALS if goal.measurement == measurement]


def evaluate(result: Result) -> list[Target]:
    """The targets of ``result``: one per goal whose row it has (a smoke run may lack some)."""
    targets = []
    for goal in goals_of(result.name):
        row = next((row for row in result.rows if goal.matches(row)), None)
        if row is None or row.get(goal.column) is None:
            continue
        value = row[goal.column]
        spread = value if isinstance(value, Stat) else None
        targets.append(Target(goal.name, median(value), goal.limit, goal.at_least, spread))
    return targets
