"""The bundled conformance suite, run as a user runs it (eager backend, to keep CI fast).

`make conformance` runs the same suite under inductor; here it must produce the documented matrix:
every scenario passes for the reference, and diffusers + PEFT fail exactly the known upstream
defects (strict xfails), no more and no fewer.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from pytest_hotswap.conformance.conftest import DEFECT, NA, PASS, SCENARIOS
from pytest_hotswap.conformance.test_conformance import KNOWN_DEFECTS

pytestmark = pytest.mark.xdist_group("conformance")


@dataclasses.dataclass
class SuiteRun:
    returncode: int
    stdout: pytest.LineMatcher
    outcomes: dict[str, int]
    report: dict


@pytest.fixture(scope="module")
def conformance_run(tmp_path_factory: pytest.TempPathFactory) -> SuiteRun:
    """One run of the suite in a fresh process, shared by the checks below (a minute or two)."""
    workdir = tmp_path_factory.mktemp("conformance")
    report = workdir / "report.json"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--pyargs",
        "pytest_hotswap.conformance",
        "--hotswap-backend=eager",
        "--hotswap-max-rank=32",
        f"--hotswap-report={report}",
        "-p",
        "no:cacheprovider",
    ]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900)
    lines = done.stdout.splitlines()
    return SuiteRun(
        done.returncode,
        pytest.LineMatcher(lines),
        pytest.RunResult.parse_summary_nouns(lines),
        json.loads(report.read_text()) if report.exists() else {},
    )


def test_suite_passes_with_exactly_the_known_defects(conformance_run):
    defects = len(KNOWN_DEFECTS) * 2  # two pipelines, sd and flux
    outcomes = conformance_run.outcomes
    assert conformance_run.returncode == 0, conformance_run.stdout.str()
    assert outcomes.get("failed", 0) == 0
    assert outcomes.get("xfailed", 0) == defects
    assert "xpassed" not in outcomes


def test_matrix_is_printed(conformance_run):
    conformance_run.stdout.fnmatch_lines(
        [
            "*hotswap conformance matrix*",
            "backend=eager mode=default max_rank=32 device=cpu dtype=float32 quantize=none",
            "scenario*sd-diffusers*sd-reference*flux-diffusers*flux-reference",
            "same rank*pass*pass*pass*pass",
            "rank > max rank (rejected)*upstream defect*pass*upstream defect*pass",
        ]
    )


def test_matrix_in_the_json_report(conformance_run):
    matrix = conformance_run.report["conformance"]
    assert matrix["columns"] == ["sd-diffusers", "sd-reference", "flux-diffusers", "flux-reference"]
    rows = {row["scenario"]: row["results"] for row in matrix["rows"]}
    assert list(rows) == list(SCENARIOS.values())
    for scenario, label in SCENARIOS.items():
        for column, verdict in rows[label].items():
            implementation = column.rsplit("-", 1)[1]
            if (scenario, implementation) in KNOWN_DEFECTS:
                assert verdict == DEFECT, (label, column)
            elif scenario == "conv2d" and column.startswith("flux"):
                assert verdict == NA, (label, column)  # the Flux transformer has no Conv2d
            else:
                assert verdict == PASS, (label, column)


def test_no_recompile_outside_the_known_defects(conformance_run):
    recompiled = {t["nodeid"] for t in conformance_run.report["tests"] if t["recompiles"]}
    allowed = {
        f"test_{scenario}[{name}-{implementation}]"
        for scenario, implementation in KNOWN_DEFECTS
        for name in ("sd", "flux")
    }
    assert {nodeid.rsplit("::", 1)[1] for nodeid in recompiled} <= allowed
