"""The conformance matrix: a verdict per (scenario, pipeline-implementation) cell from the test
reports (the same with or without pytest-xdist), printed at the end of the run and put in the JSON
report with where the suite's test time went."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pytest_hotswap.conformance.support import (
    _RED,
    DEFECT,
    DEFECT_BACKEND,
    EAGER_PROPERTY,
    ERROR,
    FAIL,
    FIXED,
    MAYBE_FIXED,
    NA,
    PASS,
    SCENARIOS,
    UNSUPPORTED,
    UNVERIFIED_DEFECT,
    VERDICT_PROPERTY,
)
from pytest_hotswap.stacks import KnownDefect, describe_stack, installed_stack, stack_verdict


def _verdict(report: pytest.TestReport) -> str | None:
    if not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return None
    own = dict(report.user_properties).get(VERDICT_PROPERTY)
    verified = dict(report.user_properties).get("hotswap_defect_verified", True)
    if hasattr(report, "wasxfail"):
        if report.skipped:
            return DEFECT if verified else UNVERIFIED_DEFECT
        return MAYBE_FIXED if report.passed else FIXED
    if report.passed:
        return own or PASS
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        return UNSUPPORTED if "not supported" in reason else NA
    if report.failed and report.longreprtext.lstrip().startswith("[XPASS(strict)]"):
        return FIXED
    return FAIL if report.when == "call" else ERROR


def _cell(report: pytest.TestReport) -> tuple[str, str] | None:
    """``.../test_conformance.py::test_same_rank[sd-diffusers]`` -> (same rank, sd-diffusers)."""
    from pytest_hotswap.plugin.xdist_groups import strip_group_suffix

    nodeid = strip_group_suffix(report.nodeid)
    if "::test_" not in nodeid or "[" not in nodeid:
        return None
    name, _, param = nodeid.rsplit("::", 1)[1].partition("[")
    scenario = name.removeprefix("test_")
    if scenario not in SCENARIOS:
        return None
    param = param.rstrip("]")
    if scenario == "catalog":  # [sd-reference-style.safetensors]: one row per file
        column, _, file = param.partition("|")
        return f"catalog: {file}", column
    return SCENARIOS[scenario], param


MATRIX_PLUGIN = "hotswap-conformance-matrix"


def register_matrix(config: pytest.Config) -> None:
    """Keep the matrix in this process, once: the suite's conftest does it where it collects, and
    the plugin on a pytest-xdist controller, which loads no conftest of the suite (its workers
    collect) but receives every test report."""
    if config.pluginmanager.get_plugin(MATRIX_PLUGIN) is None:
        config.pluginmanager.register(ConformanceMatrix(config), MATRIX_PLUGIN)


class ConformanceMatrix:
    """Collects a verdict per (scenario, pipeline-implementation) cell from the test reports.

    Test reports reach the controller under pytest-xdist too, so the matrix is the same with or
    without ``-n``.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.cells: dict[tuple[str, str], str] = {}
        self.split = TimeSplit()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.split.add(report)
        cell, verdict = _cell(report), _verdict(report)
        # The first verdict that is not a pass sticks (a teardown error after a pass, say).
        if cell is not None and verdict is not None and self.cells.get(cell, PASS) == PASS:
            self.cells[cell] = verdict

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.cells:
            write_matrix(terminalreporter, self.cells, self.config)
            terminalreporter.write_line(self.split.describe())

    def pytest_hotswap_report(self, report: dict[str, Any]) -> None:
        if self.cells:
            columns, rows = matrix_rows(self.cells)
            report["conformance"] = {
                "stack": installed_stack(),
                "columns": columns,
                "rows": [
                    {"scenario": r[0], "results": dict(zip(columns, r[1:], strict=True))}
                    for r in rows
                ],
                "seconds": self.split.as_dict(),
            }


@dataclasses.dataclass
class TimeSplit:
    """Where the suite's test time went, summed over every test (and every xdist worker) from
    the test reports: compiling and swapping (the plugin's own records), the eager references
    the outputs are compared with, and the rest (building pipelines, fixtures, running)."""

    tests: float = 0.0
    compiling: float = 0.0
    swapping: float = 0.0
    eager: float = 0.0

    def add(self, report: pytest.TestReport) -> None:
        self.tests += report.duration
        if report.when == "teardown":
            properties = dict(report.user_properties)
            self.compiling += float(properties.get("compile_s", 0.0))
            self.swapping += float(properties.get("swap_ms", 0.0)) / 1000
            self.eager += float(properties.get(EAGER_PROPERTY, 0.0))

    def as_dict(self) -> dict[str, float]:
        rest = self.tests - self.compiling - self.swapping - self.eager
        return {
            "tests": round(self.tests, 2),
            "compiling": round(self.compiling, 2),
            "swapping": round(self.swapping, 3),
            "eager references": round(self.eager, 2),
            "building, set-up and running": round(max(rest, 0.0), 2),
        }

    def describe(self) -> str:
        parts = self.as_dict()
        total = parts.pop("tests")
        shares = ", ".join(
            f"{name} {seconds:.1f} s ({100 * seconds / total:.0f}%)" if total else f"{name} 0 s"
            for name, seconds in parts.items()
        )
        return f"time in tests: {total:.1f} s summed over tests and workers: {shares}"


def matrix_rows(cells: dict[tuple[str, str], str]) -> tuple[list[str], list[list[str]]]:
    columns = sorted({column for _, column in cells}, key=_column_order)
    labels = list(SCENARIOS.values())
    scenarios = sorted(
        {scenario for scenario, _ in cells},
        key=lambda s: (labels.index(s) if s in labels else len(labels), s),
    )
    rows = [
        [scenario, *(cells.get((scenario, column), "-") for column in columns)]
        for scenario in scenarios
    ]
    return columns, rows


def _column_order(column: str) -> tuple[int, str]:
    """Registered pipelines first, in registry order, then any other (saved, hub) by name."""
    from pytest_hotswap.pipelines.registry import REGISTRY

    names = list(REGISTRY)
    name = column.rsplit("-", 1)[0]
    return (names.index(name) if name in names else len(names), column)


def write_matrix(tr: Any, cells: dict[tuple[str, str], str], config: pytest.Config) -> None:
    from pytest_hotswap.plugin.fixtures import session_of
    from pytest_hotswap.report import format_table

    session = session_of(config)
    options = session.resolved_options
    columns, rows = matrix_rows(cells)
    verified = _stack_verified(session)
    tr.section("hotswap conformance matrix")
    tr.write_line(f"stack: {describe_stack()} ({verified})")
    tr.write_line(options.describe())
    table = format_table(["scenario", *columns], rows, indent="")
    for index, line in enumerate(table):
        row = rows[index - 1] if index else None
        tr.write_line(
            line, red=row is not None and any(c in _RED for c in row[1:]), bold=index == 0
        )
    tr.write_line(
        f"{PASS}: no recompile and the output of a fresh eager load (or rejected, model untouched); "
        f"{DEFECT}: known upstream defect, xfail(strict); {FIXED}: a known defect no longer "
        f"reproduces on its verified stack, update the suite; {MAYBE_FIXED}: a known defect does "
        f"not reproduce on this unverified stack; {UNSUPPORTED}: the implementation cannot do it; "
        "n/a: the pipeline has no such layers, or its LoRA loader loads none"
    )
    if options.backend != DEFECT_BACKEND:
        tr.write_line(
            f"{DEFECT} cells compile with {DEFECT_BACKEND}: how a known defect shows does not "
            "depend on the backend (dynamo's guards, the swap's refusal, the model's state); a "
            "pipeline of their own is not compiled where the defect shows in the swap itself, "
            "and a rejection that holds there is checked again compiled"
        )


def _stack_verified(session: Any) -> str:
    defects = [d for name in session.options.implementations for d in _known(session, name)]
    return stack_verdict(defects)


def _known(session: Any, name: str) -> tuple[KnownDefect, ...]:
    try:
        return tuple(session.implementations[name].defects_for())
    except KeyError:
        return ()
