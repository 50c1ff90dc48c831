"""The reporting plugin end to end: JSON report, baseline check, summary, JUnit, usage errors, xdist.

Each run is a subprocess (torch's compile caches are process-global). The generated tests compile
tiny modules of their own with ``backend="eager"``, one class per test, so no test's compiles depend
on which other tests ran before it in the same process (as they would under xdist otherwise).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

TESTS = """
import torch

SIZE = {size}


class Double(torch.nn.Module):
    def forward(self, x):
        return x * 2


class AddOne(torch.nn.Module):
    def forward(self, x):
        return x + 1


def test_stable(compile_watcher):
    model = torch.compile(Double(), backend="eager", dynamic=False)
    model(torch.ones(3))
    compile_watcher.step("swap a", swap_ms=1.0)
    model(torch.ones(3))


def test_shapes(compile_watcher):
    model = torch.compile(AddOne(), backend="eager", dynamic=False)
    model(torch.ones(3))
    compile_watcher.step("swap b", swap_ms=2.0)
    model(torch.ones(SIZE))


def test_not_watched():
    assert True
"""

NEW_TEST = """
import torch


class Triple(torch.nn.Module):
    def forward(self, x):
        return x * 3


def test_new(compile_watcher):
    model = torch.compile(Triple(), backend="eager", dynamic=False)
    model(torch.ones(2))
    model(torch.ones(5))
"""

CONFTEST = """
def pytest_hotswap_report(report):
    report["ci"] = {"commit": "abc123"}
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_models=TESTS.format(size=3))
    pytester.makeconftest(CONFTEST)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def counts(path) -> dict[str, tuple]:
    """Per test what must not depend on timing or process layout."""
    data = json.loads(path.read_text())
    return {
        test["nodeid"]: (
            test["outcome"],
            test["compiles"],
            test["recompiles"],
            test["graph_breaks"],
            [swap["label"] for swap in test["swaps"]],
            [(event["kind"], event["step"], len(event["reasons"])) for event in test["events"]],
        )
        for test in data["tests"]
    }


@pytest.mark.slow
def test_report_then_baseline_passes_then_a_recompile_fails_with_the_table(project):
    report = project.path / "out" / "hotswap.json"
    first = run(project, f"--hotswap-report={report}", "--junitxml=junit.xml")
    first.assert_outcomes(passed=3)
    assert first.ret == 0
    data = json.loads(report.read_text())
    assert data["schema_version"] == 1
    assert data["ci"] == {"commit": "abc123"}  # pytest_hotswap_report ran before writing
    assert {"torch", "diffusers", "peft"} <= set(data["versions"])
    assert counts(report) == {
        "test_models.py::test_shapes": ("passed", 1, 0, 0, ["swap b"], []),
        "test_models.py::test_stable": ("passed", 1, 0, 0, ["swap a"], []),
    }
    first.stdout.fnmatch_lines(
        [
            "*= hotswap summary =*",
            "tests watched: 2, swaps: 2, compiles: 2, recompiles: 0, graph breaks: 0",
            "compile time: * s, median swap: 1.50 ms",
            f"hotswap report written to {report}",
        ]
    )
    junit = ET.parse(project.path / "junit.xml").getroot()
    properties = {
        (case.get("name"), prop.get("name")): prop.get("value")
        for case in junit.iter("testcase")
        for prop in case.iter("property")
    }
    assert properties[("test_stable", "compiles")] == "1"
    assert properties[("test_stable", "recompiles")] == "0"
    assert float(properties[("test_stable", "compile_s")]) > 0

    # A test new since the baseline is listed, not failed (not even when it recompiles).
    project.makepyfile(test_new=NEW_TEST)
    same = run(project, f"--hotswap-baseline={report}", "--hotswap-fail-on=recompiles:0")
    same.assert_outcomes(passed=4)
    assert same.ret == 0
    same.stdout.fnmatch_lines(
        [
            "*- hotswap baseline *hotswap.json -*",
            "compared 2 tests *",
            "no regressions",
            "new since the baseline (not compared): test_new.py::test_new",
        ]
    )

    project.makepyfile(test_models=TESTS.format(size=4))  # the second call now recompiles
    worse = run(
        project,
        f"--hotswap-baseline={report}",
        "--hotswap-fail-on=recompiles:0",
        "--deselect=test_models.py::test_stable",
    )
    worse.assert_outcomes(passed=3, deselected=1)  # all passed: the baseline check fails the run
    assert worse.ret == pytest.ExitCode.TESTS_FAILED
    worse.stdout.fnmatch_lines(
        [
            "*hotswap summary*",
            "tests watched: 2, swaps: 1, compiles: 4, recompiles: 2, graph breaks: 0",
            "recompiles:",
            "  test_models.py::test_shapes: recompile */1 of forward (*) after 'swap b': *size*",
            "*- hotswap baseline *",
            "1 regressions:",
            "  test *metric*baseline*now*limit",
            "  test_models.py::test_shapes*recompiles*0*1*recompiles:0",
            "gone since the baseline: test_models.py::test_stable",
        ]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--hotswap-baseline={path}/missing.json"],
            "ERROR: --hotswap-baseline: {path}/missing.json: no such file. "
            "Write one with --hotswap-report=PATH",
        ),
        (
            ["--hotswap-baseline={path}/test_a.py"],
            "ERROR: --hotswap-baseline: {path}/test_a.py: not JSON*",
        ),
        (
            ["--hotswap-fail-on=recompiles:0"],
            "ERROR: --hotswap-fail-on=recompiles:0 needs a report to compare with: "
            "add --hotswap-baseline=PATH*",
        ),
        (["--hotswap-baseline={path}/b.json", "--hotswap-fail-on=speed:+5%"], "ERROR: *speed:+5%*"),
        (
            ["--hotswap-baseline={path}/b.json", "--hotswap-fail-on=recompiles:+50"],
            "ERROR: *growth needs a percent sign (recompiles:+50%); a cap has no plus sign*",
        ),
        (
            ["--hotswap-baseline={path}/list.json"],
            "ERROR: --hotswap-baseline: {path}/list.json: a report must be a JSON object, got a "
            "JSON list. Write one with --hotswap-report=PATH",
        ),
        (
            ["--hotswap-baseline={path}/types.json"],
            "ERROR: --hotswap-baseline: {path}/types.json: test 't.py::x': 'recompiles' must be an "
            'integer >= 0, got "3"*',
        ),
        (
            ["--hotswap-report={path}"],
            "ERROR: --hotswap-report: {path}: is a directory; give a file path like *",
        ),
    ],
    ids=[
        "missing baseline",
        "not JSON",
        "fail-on without baseline",
        "unknown metric",
        "growth without %",
        "baseline a list",
        "baseline field types",
        "report a directory",
    ],
)
def test_usage_errors(pytester, args, message):
    pytester.makepyfile(test_a="def test_a(): pass")
    (pytester.path / "b.json").write_text(json.dumps({"schema_version": 1, "tests": []}))
    (pytester.path / "list.json").write_text("[]")
    test = {"nodeid": "t.py::x", "outcome": "passed", "recompiles": "3"}
    (pytester.path / "types.json").write_text(json.dumps({"schema_version": 1, "tests": [test]}))
    result = pytester.runpytest(*(arg.format(path=pytester.path) for arg in args))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message.format(path=pytester.path)])
    assert not list(pytester.path.glob("*.tmp")) and not list(pytester.path.glob(".*.tmp"))


def test_a_report_in_a_missing_folder_is_written_there(pytester):
    pytester.makepyfile(test_a="def test_a(compile_watcher): pass")
    target = pytester.path / "out" / "deeper" / "hotswap.json"
    result = pytester.runpytest(f"--hotswap-report={target}")
    result.assert_outcomes(passed=1)
    assert json.loads(target.read_text())["tests"][0]["nodeid"] == "test_a.py::test_a"
    assert [p.name for p in target.parent.iterdir()] == ["hotswap.json"]


@pytest.mark.slow
@pytest.mark.parametrize("xdist", [None, "0", "2"], ids=["no-xdist", "n0", "n2"])
def test_same_report_with_and_without_xdist(project, xdist):
    report = project.path / "hotswap.json"
    project.makepyfile(test_models=TESTS.format(size=4))
    args = ["-p", "no:xdist"] if xdist is None else ["-n", xdist]
    result = run(project, f"--hotswap-report={report}", *args)
    result.assert_outcomes(passed=3)
    assert counts(report) == {
        "test_models.py::test_shapes": (
            "passed",
            2,
            1,
            0,
            ["swap b"],
            [("recompile", "swap b", 1)],
        ),
        "test_models.py::test_stable": ("passed", 1, 0, 0, ["swap a"], []),
    }
    assert json.loads(report.read_text())["xdist_workers"] == (2 if xdist == "2" else 0)
    result.stdout.fnmatch_lines(
        [
            "*hotswap summary*",
            "tests watched: 2, swaps: 2, compiles: 3, recompiles: 1, graph breaks: 0",
        ]
    )
    if xdist == "2":
        result.stdout.fnmatch_lines(["(timings measured under pytest-xdist with 2 workers, *)"])
