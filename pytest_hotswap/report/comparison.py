"""Thresholds (``--hotswap-fail-on``) and the comparison of a run with its baseline."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pytest_hotswap.report.records import METRICS
from pytest_hotswap.report.tables import fmt, format_table

if TYPE_CHECKING:
    from pytest_hotswap.report.files import Report

# Used when a baseline is given without thresholds: nothing may recompile more than it used to.
DEFAULT_FAIL_ON = "recompiles:+0%,graph_breaks:+0%"


@dataclasses.dataclass(frozen=True)
class Threshold:
    """``metric:N`` caps the value at N; ``metric:+P%`` allows it to grow by P percent at most."""

    metric: str
    limit: float
    relative: bool

    def __str__(self) -> str:
        return (
            f"{self.metric}:+{self.limit:g}%" if self.relative else f"{self.metric}:{self.limit:g}"
        )

    def exceeded(self, old: float | None, new: float | None) -> bool:
        if new is None:
            return False
        if not self.relative:
            return new > self.limit
        return old is not None and new > old * (1 + self.limit / 100)


def parse_fail_on(text: str) -> tuple[Threshold, ...]:
    """Parse ``recompiles:0,graph_breaks:0,compile_s:+50%,swap_ms:+100%``.

    Raises ``ValueError`` saying what is wrong and what is accepted.
    """
    thresholds: dict[str, Threshold] = {}
    forms = "METRIC:N (a cap) or METRIC:+P% (growth over the baseline)"
    for part in (piece.strip() for piece in str(text).split(",")):
        if not part:
            continue
        metric, sep, limit = (s.strip() for s in part.partition(":"))
        if not sep or metric not in METRICS:
            raise ValueError(
                f"bad threshold {part!r}: expected {forms}, METRIC one of {', '.join(METRICS)}"
            )
        relative = limit.startswith("+")
        if relative and not limit.endswith("%"):
            raise ValueError(
                f"bad limit in {part!r}: growth needs a percent sign ({metric}:{limit}%); a cap "
                f"has no plus sign ({metric}:{limit[1:]})"
            )
        number = limit[1:-1] if relative else limit
        try:
            value = float(number)
        except ValueError:
            value = -1.0
        if not number or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"bad limit in {part!r}: expected a number >= 0 (like {metric}:0) or a "
                f"percentage growth (like {metric}:+50%)"
            )
        thresholds[metric] = Threshold(metric, value, relative)
    if not thresholds:
        raise ValueError(
            "expected at least one threshold, like recompiles:0,compile_s:+50%,swap_ms:+100%"
        )
    return tuple(thresholds.values())


@dataclasses.dataclass(frozen=True)
class Regression:
    nodeid: str
    metric: str
    old: float | None
    new: float | None
    threshold: Threshold


@dataclasses.dataclass
class Comparison:
    """The outcome of comparing a run with its baseline. Only ``regressions`` fail it."""

    thresholds: tuple[Threshold, ...]
    compared: int
    regressions: list[Regression]
    new_tests: list[str]
    gone_tests: list[str]
    notes: list[str]

    @property
    def failed(self) -> bool:
        return bool(self.regressions)

    def lines(self) -> list[str]:
        limits = ",".join(str(t) for t in self.thresholds)
        lines = [f"compared {self.compared} tests with the baseline on {limits}"]
        if self.regressions:
            lines.append(f"{len(self.regressions)} regressions:")
            rows = [
                (r.nodeid, r.metric, fmt(r.old), fmt(r.new), str(r.threshold))
                for r in self.regressions
            ]
            lines += format_table(("test", "metric", "baseline", "now", "limit"), rows)
        else:
            lines.append("no regressions")
        lines += [f"new since the baseline (not compared): {nodeid}" for nodeid in self.new_tests]
        lines += [f"gone since the baseline: {nodeid}" for nodeid in self.gone_tests]
        return lines + [f"note: {note}" for note in self.notes]


#: Outcomes of tests a baseline comparison leaves out.
NOT_COMPARED_OUTCOMES = frozenset({"skipped", "xfailed"})


def compare(baseline: Report, current: Report, thresholds: Sequence[Threshold]) -> Comparison:
    """Compare the tests both reports hold; tests new or gone are listed, never failed.

    Tests that did not run for real now (skipped, or xfailed: an expected failure, such as a
    test demonstrating a recompile) are not held to the thresholds.
    """
    old = {test.nodeid: test for test in baseline.tests}
    new = {test.nodeid: test for test in current.tests}
    common = [n for n in new if n in old and new[n].outcome not in NOT_COMPARED_OUTCOMES]
    regressions = [
        Regression(nodeid, t.metric, old_value, new_value, t)
        for nodeid in common
        for t in thresholds
        if t.exceeded(
            old_value := old[nodeid].metric(t.metric), new_value := new[nodeid].metric(t.metric)
        )
    ]
    notes = []
    timed = any(t.metric in ("compile_s", "swap_ms") for t in thresholds)
    if timed and baseline.xdist_workers != current.xdist_workers:
        notes.append(
            f"timings compared across different xdist worker counts "
            f"({baseline.xdist_workers} in the baseline, {current.xdist_workers} now)"
        )
    return Comparison(
        thresholds=tuple(thresholds),
        compared=len(common),
        regressions=regressions,
        new_tests=[nodeid for nodeid in new if nodeid not in old],
        gone_tests=[nodeid for nodeid in old if nodeid not in new],
        notes=notes,
    )
