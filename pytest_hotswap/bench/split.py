"""Measurement 9: where `make conformance`'s time goes, read from its own report (issue 22).

`make conformance` writes its hotswap report to ``bench-results/conformance.json``
(``CONFORMANCE_REPORT``); the conformance suite puts the split of its test time there
(``conformance.seconds``: compiling and swapping from the plugin's records, the eager references
the outputs are compared with, and the rest: building pipelines, fixtures, running), summed over
every test and xdist worker. This measurement runs nothing: it reads that report, so its figures
are those of the last `make conformance` on this machine (the row says when it was written).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result

#: Where `make conformance` writes its report (the Makefile's ``CONFORMANCE_REPORT``).
REPORT = Path(os.environ.get("CONFORMANCE_REPORT", "bench-results/conformance.json"))


def run(config: BenchConfig, workdir: Path) -> Result:
    del config, workdir  # reads the last make conformance's report; measures nothing itself
    result = Result(
        "conformance_split",
        f"Conformance time split: where the last `make conformance`'s test time went, from its "
        f"own report ({REPORT}), seconds summed over tests and xdist workers",
        note="compiling and swapping: the plugin's records; eager references: building and "
        "running the plain pipelines outputs are compared with; the rest: building the "
        "compiled pipelines, fixtures, running",
    )
    if not REPORT.exists():  # nothing to read yet: said, not an error
        result.note = f"no conformance report at {REPORT}: run `make conformance` first"
        return result
    result.rows.extend(split_rows(REPORT))
    return result


def split_rows(path: Path) -> list[dict[str, object]]:
    """One row per part of the split in the report at ``path``; a clear error when there is
    none (no report yet, or one written without the conformance suite)."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise RuntimeError(
            f"no conformance report at {path}: run `make conformance` first"
        ) from None
    seconds = (report.get("conformance") or {}).get("seconds")
    if not isinstance(seconds, dict) or "tests" not in seconds:
        raise RuntimeError(
            f"{path} holds no conformance time split: write it with `make conformance`"
        )
    total = float(seconds["tests"])
    workers = report.get("xdist_workers", 0)
    return [
        {
            "part": part,
            "seconds": round(float(value), 2),
            "share_pct": round(100 * float(value) / total, 1) if total else 0.0,
            "report_created": report.get("created", ""),
            "xdist_workers": workers,
        }
        for part, value in seconds.items()
        if part != "tests"
    ] + [
        {
            "part": "all tests",
            "seconds": round(total, 2),
            "share_pct": 100.0,
            "report_created": report.get("created", ""),
            "xdist_workers": workers,
        }
    ]
