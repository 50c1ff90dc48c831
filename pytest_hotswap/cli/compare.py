"""``pytest-hotswap compare``: two ``--hotswap-report`` files, exit 1 on a regression."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pytest_hotswap.report import (
    DEFAULT_FAIL_ON,
    Report,
    ReportError,
    Threshold,
    compare,
    parse_fail_on,
)


def run(args: argparse.Namespace) -> int:
    try:
        old, new = Report.load(args.old), Report.load(args.new)
    except ReportError as error:
        print(f"pytest-hotswap compare: {error}", file=sys.stderr)
        return 2
    comparison = compare(old, new, args.fail_on)
    print("\n".join(comparison.lines()))
    return 1 if comparison.failed else 0


def _thresholds(text: str) -> tuple[Threshold, ...]:
    try:
        return parse_fail_on(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_command(commands: Any) -> None:
    """Add the command to the ``pytest-hotswap`` subcommands (an argparse subparsers action)."""
    cmp = commands.add_parser(
        "compare",
        help="Compare two --hotswap-report JSON files; exit 1 on a regression",
        description="Compare NEW with the baseline OLD per test; exit 1 when a threshold is "
        "exceeded, 2 when a report cannot be read. Tests new or gone since OLD are listed, not failed",
    )
    cmp.add_argument("old", type=Path, metavar="OLD", help="The baseline report")
    cmp.add_argument("new", type=Path, metavar="NEW", help="The report to check")
    cmp.add_argument(
        "--fail-on",
        type=_thresholds,
        default=parse_fail_on(DEFAULT_FAIL_ON),
        metavar="EXPR",
        help="Comma list of METRIC:N (cap) or METRIC:+P%% (growth over OLD); METRIC is compiles, "
        "recompiles, cache_switches, layout_changes, graph_breaks, compile_s or swap_ms (median). "
        f"Default: {DEFAULT_FAIL_ON}",
    )
    cmp.set_defaults(run=run)
