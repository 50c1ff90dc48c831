"""The conformance suite's own cost accounting: its time split (in the matrix, the JSON report and
`make bench`'s ``conformance_split``), and known-defect cells compiling with eager."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from pytest_hotswap.bench import split
from pytest_hotswap.conformance.matrix import TimeSplit
from pytest_hotswap.conformance.support import DEFECT_BACKEND, EAGER_PROPERTY


def _report(when: str, duration: float, **properties: float) -> SimpleNamespace:
    return SimpleNamespace(when=when, duration=duration, user_properties=list(properties.items()))


def test_time_split_sums_phases_and_the_teardown_properties():
    timed = TimeSplit()
    timed.add(_report("setup", 10.0))
    timed.add(_report("call", 5.0))
    timed.add(_report("teardown", 1.0, compile_s=8.0, swap_ms=250.0, **{EAGER_PROPERTY: 2.0}))
    timed.add(_report("call", 4.0, compile_s=99.0))  # read at teardown only: not counted
    assert timed.as_dict() == {
        "tests": 20.0,
        "compiling": 8.0,
        "swapping": 0.25,
        "eager references": 2.0,
        "building, set-up and running": 9.75,
    }
    assert timed.describe() == (
        "time in tests: 20.0 s summed over tests and workers: compiling 8.0 s (40%), "
        "swapping 0.2 s (1%), eager references 2.0 s (10%), building, set-up and running "
        "9.8 s (49%)"
    )


def test_time_split_of_nothing_is_zero():
    assert TimeSplit().describe() == (
        "time in tests: 0.0 s summed over tests and workers: compiling 0 s, swapping 0 s, "
        "eager references 0 s, building, set-up and running 0 s"
    )


def test_bench_reads_the_split_from_the_report(tmp_path):
    path = tmp_path / "conformance.json"
    seconds = {"tests": 200.0, "compiling": 150.0, "swapping": 0.5, "eager references": 10.0}
    path.write_text(
        json.dumps(
            {
                "created": "2026-12-07T18:00:00",
                "xdist_workers": 2,
                "conformance": {"seconds": seconds},
            }
        )
    )
    rows = split.split_rows(path)
    assert [(r["part"], r["seconds"], r["share_pct"]) for r in rows] == [
        ("compiling", 150.0, 75.0),
        ("swapping", 0.5, 0.2),
        ("eager references", 10.0, 5.0),
        ("all tests", 200.0, 100.0),
    ]
    assert {r["xdist_workers"] for r in rows} == {2}


def test_bench_refuses_a_report_without_the_split(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"tests": []}))  # a report of a run without the suite
    with pytest.raises(RuntimeError, match="holds no conformance time split"):
        split.split_rows(path)
    with pytest.raises(RuntimeError, match="run `make conformance` first"):
        split.split_rows(tmp_path / "missing.json")


@pytest.mark.slow
def test_known_defect_cells_compile_with_eager(tmp_path):
    """Under another backend, a known-defect cell builds its pipeline with eager (its report
    context says so) and keeps its verdict; a passing cell keeps the session's backend."""
    report = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "pytest", "--pyargs", "pytest_hotswap.conformance",
        "--hotswap-backend=aot_eager", "--hotswap-max-rank=32", "--hotswap-pipelines=flux",
        "--hotswap-implementations=diffusers", "-k", "same_rank or strength_change",
        f"--hotswap-report={report}", "-p", "no:cacheprovider", "-p", "no:xdist",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    tests = {t["nodeid"].rsplit("::", 1)[1]: t for t in json.loads(report.read_text())["tests"]}
    defect, passing = (
        tests["test_strength_change[flux-diffusers]"],
        tests["test_same_rank[flux-diffusers]"],
    )
    assert (defect["outcome"], defect["context"]["backend"]) == ("xfailed", DEFECT_BACKEND)
    assert (passing["outcome"], passing["context"]["backend"]) == ("passed", "aot_eager")
    assert "upstream defect cells compile with eager" in done.stdout
    assert "time in tests:" in done.stdout
