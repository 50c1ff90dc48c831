"""``pytest-hotswap stacks``: one table from the conformance reports of several stacks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pytest_hotswap.report import Report, ReportError


def conformance_matrix(name: str, report: Report) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The stack and the rows of a report's conformance matrix, every field checked: a problem
    is a ``ReportError`` naming ``name`` and the field."""
    matrix = report.extra.get("conformance")
    if matrix is None:
        raise ReportError(f"{name}: no conformance matrix in it (run the conformance suite)")
    _expect(name, "conformance", matrix, dict, "an object")
    stack = matrix.get("stack")
    if stack is not None:
        _string_map(name, "conformance.stack", stack, "package names to version strings")
    rows = matrix.get("rows", [])
    _expect(name, "conformance.rows", rows, list, "a list")
    for index, row in enumerate(rows):
        where = f"conformance.rows[{index}]"
        _expect(name, where, row, dict, "an object")
        _expect(name, f"{where}.scenario", row.get("scenario"), str, "a string")
        _string_map(name, f"{where}.results", row.get("results"), "columns to verdict strings")
    return (stack or report.versions), rows


def _expect(name: str, field: str, value: Any, kind: type, what: str) -> None:
    if not isinstance(value, kind):
        raise ReportError(f"{name}: '{field}' must be {what}, got {_json_kind(value)}")


def _string_map(name: str, field: str, value: Any, what: str) -> None:
    _expect(name, field, value, dict, f"an object mapping {what}")
    for key, item in value.items():
        _expect(name, f"{field}.{key}", item, str, "a string")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return f"a JSON {kinds.get(type(value), 'object' if isinstance(value, dict) else 'value')}"


def stack_table(reports: dict[str, Report]) -> list[str]:
    """Stack by scenario: one row per (scenario, pipeline-implementation) cell, one column per
    stack, then what changes between stacks (the answer to "what changes if we upgrade?")."""
    from pytest_hotswap.report import format_table

    cells: dict[tuple[str, str], dict[str, str]] = {}
    stacks: dict[str, dict[str, Any]] = {}
    for name, report in reports.items():
        stacks[name], rows = conformance_matrix(name, report)
        for row in rows:
            for column, verdict in row["results"].items():
                cells.setdefault((row["scenario"], column), {})[name] = verdict
    names = list(reports)
    lines = [
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in stack.items())
        for name, stack in stacks.items()
    ]
    rows = [[s, c, *(v.get(n, "-") for n in names)] for (s, c), v in cells.items()]
    lines += format_table(["scenario", "column", *names], rows, indent="")
    changed = [row for row in rows if len(set(row[2:])) > 1]
    lines.append(f"{len(changed)} cells differ between stacks" + (":" if changed else ""))
    for row in changed:
        steps = ", ".join(
            f"{name}: {verdict}" for name, verdict in zip(names, row[2:], strict=True)
        )
        lines.append(f"  {row[0]} [{row[1]}]: {steps}")
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        reports: dict[str, Report] = {}
        for path in args.reports:
            if path.stem in reports:
                raise ReportError(
                    f"{path}: a second report named {path.stem!r}; stacks are named by file "
                    "name, so give each report its own"
                )
            reports[path.stem] = Report.load(path)
            conformance_matrix(str(path), reports[path.stem])  # errors name the file
        print("\n".join(stack_table(reports)))
    except ReportError as error:
        print(f"pytest-hotswap stacks: {error}", file=sys.stderr)
        return 2
    return 0


def add_command(commands: Any) -> None:
    """Add the command to the ``pytest-hotswap`` subcommands (an argparse subparsers action)."""
    stk = commands.add_parser(
        "stacks",
        help="One table from the conformance reports of several stacks (make stacks)",
        description="Combine --hotswap-report files of conformance runs on different stacks: "
        "scenario by stack, then every cell that differs between stacks. A report's name is "
        "its file name without .json",
    )
    stk.add_argument("reports", nargs="+", type=Path, metavar="REPORT", help="Conformance reports")
    stk.set_defaults(run=run)
