"""The report data: JSON round trip, fail-on parsing, baseline comparison and the summary lines."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_hotswap.report import (
    SCHEMA_VERSION,
    Report,
    ReportError,
    SwapRecord,
    TestRecord,
    Threshold,
    check_writable,
    compare,
    parse_fail_on,
    write_json,
)
from pytest_hotswap.watch import CompileEvent, shorten_reason

# Its module fixtures are built once, on one worker.
pytestmark = pytest.mark.xdist_group("report")

DATA = Path(__file__).parent / "data"
SWAP = "tests/test_lora.py::test_swap"
SCALE = "tests/test_lora.py::test_scale"


@pytest.fixture(scope="module")
def baseline() -> Report:
    return Report.load(DATA / "report_baseline.json")


@pytest.fixture(scope="module")
def regressed() -> Report:
    return Report.load(DATA / "report_regressed.json")


def regressions(comparison) -> set[tuple[str, str]]:
    return {(r.nodeid, r.metric) for r in comparison.regressions}


def test_round_trip_keeps_every_field_and_hook_extras(tmp_path):
    event = CompileEvent("0/1", "forward", "/m.py", 3, "recompile", ("size mismatch",), "swap", 0.2)
    switch = CompileEvent("0/0", "forward", "/m.py", 3, "cache_switch", ("size=[4]",), "swap", 0.0)
    record = TestRecord(
        "t.py::test",
        "failed",
        compiles=2,
        recompiles=2,
        cache_switches=1,
        graph_breaks=1,
        compile_s=1.25,
        swaps=[SwapRecord("swap", 3.5)],
        events=[event, switch],
        context={"device": "cpu"},
    )
    report = Report.new([record], xdist_workers=2)
    report.extra["ci"] = {"commit": "abc"}
    report.save(tmp_path / "nested" / "report.json")

    loaded = Report.load(tmp_path / "nested" / "report.json")

    assert loaded == report
    assert loaded.schema_version == SCHEMA_VERSION
    assert {"torch", "diffusers", "peft", "python"} <= set(loaded.versions)
    assert json.loads((tmp_path / "nested" / "report.json").read_text())["ci"] == {"commit": "abc"}


def test_new_report_sorts_tests_so_xdist_order_does_not_matter():
    records = [TestRecord("b.py::t", "passed"), TestRecord("a.py::t", "passed")]
    assert [t.nodeid for t in Report.new(records).tests] == ["a.py::t", "b.py::t"]


def test_median_swap_is_the_swap_metric(regressed):
    swap = next(t for t in regressed.tests if t.nodeid == SWAP)
    assert swap.metric("swap_ms") == 25.0
    assert swap.metric("recompiles") == 1
    assert TestRecord("x", "passed").metric("swap_ms") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        (json.dumps({"schema_version": 99, "tests": []}), "schema_version 99 is not 1"),
        (json.dumps({"schema_version": 1}), "not a pytest-hotswap report"),
        (json.dumps({"schema_version": 1, "tests": [{"nodeid": "x"}]}), "test 'x': 'outcome'"),
    ],
)
def test_load_errors_name_the_path_and_the_problem(tmp_path, content, message):
    path = tmp_path / "baseline.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ReportError, match=message) as info:
        Report.load(path)
    assert str(path) in str(info.value)


def test_parse_fail_on():
    assert parse_fail_on("recompiles:0, graph_breaks:2,compile_s:+50%,swap_ms:+100%") == (
        Threshold("recompiles", 0, relative=False),
        Threshold("graph_breaks", 2, relative=False),
        Threshold("compile_s", 50, relative=True),
        Threshold("swap_ms", 100, relative=True),
    )
    assert str(parse_fail_on("compile_s:+12.5%")[0]) == "compile_s:+12.5%"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one threshold"),
        ("recompile:0", "METRIC one of compiles, recompiles"),
        ("recompiles", "expected METRIC:N"),
        ("recompiles:-1", "a number >= 0"),
        ("compile_s:+x%", "percentage growth"),
        ("compile_s:50%", "a number >= 0"),
        ("compile_s:nan", "a number >= 0"),
    ],
)
def test_parse_fail_on_rejects_bad_input_with_the_fix(text, message):
    with pytest.raises(ValueError, match=message):
        parse_fail_on(text)


def test_equal_runs_pass(baseline):
    comparison = compare(
        baseline, baseline, parse_fail_on("recompiles:0,compile_s:+0%,swap_ms:+0%")
    )
    assert not comparison.failed
    assert comparison.compared == 3
    assert comparison.new_tests == comparison.gone_tests == []
    assert "no regressions" in comparison.lines()


def test_timing_noise_within_relative_limits_passes(baseline):
    noise = Report.load(DATA / "report_noise.json")
    assert not compare(baseline, noise, parse_fail_on("compile_s:+50%,swap_ms:+100%")).failed
    # The negative control: the same noise fails a tighter limit.
    tight = compare(baseline, noise, parse_fail_on("compile_s:+10%,swap_ms:+5%"))
    assert regressions(tight) == {
        (SWAP, "compile_s"),  # 2.0 -> 2.4 s
        (SWAP, "swap_ms"),  # median 12 -> 13 ms
        ("tests/test_lora.py::test_removed", "compile_s"),  # 0.5 -> 0.6 s
    }


@pytest.mark.parametrize(
    ("fail_on", "expected"),
    [
        ("recompiles:0", {(SWAP, "recompiles")}),
        ("recompiles:1", set()),
        ("recompiles:+0%", {(SWAP, "recompiles")}),
        ("graph_breaks:0", {(SCALE, "graph_breaks")}),
        ("compiles:+100%", set()),
        ("compiles:+99%", {(SWAP, "compiles")}),
        ("compile_s:+50%", {(SWAP, "compile_s")}),  # +75%; test_scale grew 20%
        ("compile_s:+10%", {(SWAP, "compile_s"), (SCALE, "compile_s")}),
        ("compile_s:3", {(SWAP, "compile_s")}),
        ("swap_ms:+100%", {(SWAP, "swap_ms")}),  # median 12 -> 25 ms
        ("swap_ms:+110%", set()),
        ("swap_ms:30", set()),
    ],
)
def test_each_threshold_kind(baseline, regressed, fail_on, expected):
    assert regressions(compare(baseline, regressed, parse_fail_on(fail_on))) == expected


def test_new_and_gone_tests_are_listed_not_failed(baseline, regressed):
    comparison = compare(baseline, regressed, parse_fail_on("recompiles:1"))
    assert not comparison.failed
    assert comparison.new_tests == ["tests/test_lora.py::test_added"]
    assert comparison.gone_tests == ["tests/test_lora.py::test_removed"]
    lines = comparison.lines()
    assert "new since the baseline (not compared): tests/test_lora.py::test_added" in lines
    assert "gone since the baseline: tests/test_lora.py::test_removed" in lines


def test_regression_table_shows_what_got_worse_per_test(baseline, regressed):
    comparison = compare(baseline, regressed, parse_fail_on("recompiles:0,swap_ms:+100%"))
    text = "\n".join(comparison.lines())
    assert "2 regressions:" in text
    header, *rows = [line.split() for line in comparison.lines()[2:5]]
    assert header == ["test", "metric", "baseline", "now", "limit"]
    assert rows == [
        [SWAP, "recompiles", "0", "1", "recompiles:0"],
        [SWAP, "swap_ms", "12.00", "25.00", "swap_ms:+100%"],
    ]


def test_timings_across_xdist_worker_counts_get_a_note(baseline, regressed):
    parallel = Report(tests=regressed.tests, xdist_workers=2)
    note = compare(baseline, parallel, parse_fail_on("compile_s:+50%")).notes
    assert note == [
        "timings compared across different xdist worker counts (0 in the baseline, 2 now)"
    ]
    assert compare(baseline, parallel, parse_fail_on("recompiles:0")).notes == []


def test_summary_totals_worst_tests_and_reasons(regressed):
    lines = regressed.summary_lines()
    assert lines[0] == "tests watched: 3, swaps: 3, compiles: 4, recompiles: 1, graph breaks: 1"
    assert lines[1] == "compile time: 5.40 s, median swap: 25.00 ms"
    assert lines[2] == "worst tests:"
    assert lines[4].split()[0] == SWAP  # most recompiles first
    assert lines[-2] == "recompiles:"
    reason = next(t for t in regressed.tests if t.nodeid == SWAP).events[0].reasons[0]
    assert lines[-1] == (
        f"  {SWAP}: recompile 0/1 of forward (/src/diffusers/models/unets/unet_2d_condition.py:1040) "
        f"after 'hotswap #1': "
        f"{shorten_reason(reason)}"
    )
    assert lines[-1].endswith("size mismatch at index 0. expected 8, actual 16")


def test_summary_marks_xdist_timings(regressed):
    parallel = Report(tests=regressed.tests, xdist_workers=2)
    assert parallel.summary_lines()[2] == (
        "(timings measured under pytest-xdist with 2 workers, not comparable with a serial run)"
    )


def test_from_watcher_records_a_real_recompile_with_its_swap_and_reason():
    import torch

    from pytest_hotswap.watch import CompileWatcher

    def scale(x):
        return x * 2

    compiled = torch.compile(scale, backend="eager", dynamic=False)
    with CompileWatcher() as watcher:
        watcher.context.update(backend="eager", dtype=torch.float32)
        compiled(torch.ones(3))
        watcher.step("swap to rank 16", swap_ms=4.0)
        compiled(torch.ones(4))  # a shape guard fails: the negative control

    record = TestRecord.from_watcher("t.py::test", "passed", watcher)

    assert (record.compiles, record.recompiles, record.graph_breaks) == (2, 1, 0)
    assert record.compile_s == watcher.compile_seconds > 0
    assert record.swaps == [SwapRecord("swap to rank 16", 4.0)]
    [event] = record.events
    assert (event.kind, event.frame, event.step) == ("recompile", "scale", "swap to rank 16")
    assert "size mismatch at index 0. expected 3, actual 4" in event.reasons[0]
    assert record.context == {"backend": "eager", "dtype": "torch.float32"}  # JSON-safe
    assert TestRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_from_watcher_keeps_the_watchers_compile_seconds():
    """One definition of compile time: the watcher's, not a second sum over its events."""
    from pytest_hotswap.watch import CompileWatcher

    class Timed(CompileWatcher):
        compile_seconds = 1.25  # e.g. a watcher that also counts time outside dynamo's frames

    assert TestRecord.from_watcher("t.py::test", "passed", Timed()).compile_s == 1.25


@pytest.mark.parametrize("outcome", ["xfailed", "skipped"])
def test_expected_failures_and_skips_are_not_held_to_thresholds(baseline, regressed, outcome):
    """A test that recompiles on purpose (xfail) must not fail the gate; the same test passing does."""
    relabelled = Report.from_dict(regressed.to_dict())
    for test in relabelled.tests:
        if test.nodeid == SWAP:
            test.outcome = outcome
    assert (SWAP, "recompiles") in regressions(
        compare(baseline, regressed, parse_fail_on("recompiles:0"))
    )
    assert (SWAP, "recompiles") not in regressions(
        compare(baseline, relabelled, parse_fail_on("recompiles:0"))
    )


# --- Malformed reports and paths: a clear error naming the field, never a traceback -----------


def _report_with(**fields):
    test = {"nodeid": "t.py::test", "outcome": "passed", "compiles": 1, "recompiles": 0}
    test.update(fields)
    return {"schema_version": 1, "tests": [test]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "a report must be a JSON object, got a JSON list"),
        ("str", "a report must be a JSON object, got a JSON str"),
        (None, "a report must be a JSON object, got null"),
        (5, "a report must be a JSON object, got a JSON int"),
        ({"schema_version": True, "tests": []}, "schema_version true is not 1"),
        ({"schema_version": 1, "tests": {}}, "'tests' must be a list, got {}"),
        (
            {"schema_version": 1, "tests": [[]]},
            "a test record must be a JSON object, got a JSON list",
        ),
        (
            {"schema_version": 1, "tests": [{"nodeid": ["a"]}]},
            """'nodeid' must be a string, got ["a"]""",
        ),
        (
            _report_with(recompiles="3"),
            """test 't.py::test': 'recompiles' must be an integer >= 0, got "3\"""",
        ),
        (_report_with(recompiles=None), "'recompiles' must be an integer >= 0, got null"),
        (_report_with(recompiles=1.5), "'recompiles' must be an integer >= 0, got 1.5"),
        (_report_with(compile_s=-1), "'compile_s' must be a finite number >= 0, got -1"),
        (_report_with(outcome="great"), "'outcome' must be one of passed, failed"),
        (_report_with(swaps=[{"label": "x"}]), "each swap must be an object with 'label' and 'ms'"),
        (_report_with(events=[{"kind": "recompile"}]), "event field 'compile_id' is missing"),
        (_report_with(context=[]), "'context' must be an object"),
        (_report_with(speed=3), "unknown fields ['speed']"),
        (
            {"schema_version": 1, "tests": [], "xdist_workers": "2"},
            "'xdist_workers' must be an integer",
        ),
    ],
)
def test_malformed_reports_name_the_test_and_the_field(tmp_path, data, message):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError) as info:
        Report.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_nan_recompiles_cannot_pass_a_cap(tmp_path):
    """NaN is not JSON; Python's json writes and reads it unless told not to."""
    path = tmp_path / "nan.json"
    path.write_text(
        '{"schema_version": 1, "tests": [{"nodeid": "t", "outcome": "passed", "recompiles": NaN}]}'
    )
    with pytest.raises(ReportError, match="NaN is not a valid JSON number"):
        Report.load(path)


def test_a_directory_is_not_a_report(tmp_path):
    with pytest.raises(ReportError, match="is a directory"):
        Report.load(tmp_path)


def test_growth_needs_a_percent_sign():
    with pytest.raises(ValueError, match=r"growth needs a percent sign \(recompiles:\+50%\)"):
        parse_fail_on("recompiles:+50")
    assert parse_fail_on("recompiles:+50%") == (Threshold("recompiles", 50, relative=True),)
    assert parse_fail_on("cache_switches:0,layout_changes:0")[1].metric == "layout_changes"


def test_write_json_leaves_no_temporary_file_behind(tmp_path):
    target = tmp_path / "out" / "report.json"
    with pytest.raises(TypeError):
        write_json(target, {"not json": object()})
    assert list(target.parent.iterdir()) == []
    write_json(target, {"ok": 1})
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_check_writable_creates_folders_and_refuses_a_directory(tmp_path):
    assert check_writable(tmp_path / "a" / "b" / "r.json") == tmp_path / "a" / "b" / "r.json"
    assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(ReportError, match="is a directory; give a file path"):
        check_writable(tmp_path)


# --- Fuzz: any JSON is a report or a ReportError, never a traceback ----------------------------

_EXAMPLES = int(os.environ.get("HOTSWAP_FUZZ_EXAMPLES", "150"))
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
_FIELDS = st.sampled_from(
    [
        "nodeid",
        "outcome",
        "compiles",
        "recompiles",
        "cache_switches",
        "compile_s",
        "swaps",
        "events",
        "context",
    ]
)


@st.composite
def _mutated_reports(draw):
    """A valid report with one field of one test replaced by arbitrary JSON."""
    test = {"nodeid": "t.py::test", "outcome": "passed", "compiles": 1, "recompiles": 0}
    test[draw(_FIELDS)] = draw(_JSON)
    top = {"schema_version": 1, "tests": [test]}
    if draw(st.booleans()):
        top[
            draw(
                st.sampled_from(["schema_version", "tests", "versions", "xdist_workers", "created"])
            )
        ] = draw(_JSON)
    return top


@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_JSON, _mutated_reports()))
def test_any_json_is_a_report_or_a_report_error(data):
    try:
        report = Report.from_dict(data)
    except ReportError as error:
        assert str(error)  # a message that names what is wrong
        return
    # What loads, compares: every metric a threshold reads is a number or None.
    for test in report.tests:
        for metric in (
            "compiles",
            "recompiles",
            "cache_switches",
            "layout_changes",
            "graph_breaks",
            "compile_s",
        ):
            assert isinstance(test.metric(metric), (int, float)) and test.metric(metric) >= 0
    compare(report, report, parse_fail_on("recompiles:0,compile_s:+50%,swap_ms:+10%"))


def test_summary_counts_the_tests_stopped_at_the_guard(regressed):
    assert not any(line.startswith("stopped at the guard") for line in regressed.summary_lines())
    stopped = Report(
        tests=[dataclasses.replace(t, stopped_at_guard=t.nodeid == SWAP) for t in regressed.tests]
    )
    assert stopped.summary_lines()[2] == (
        "stopped at the guard: 1 test (a recompile past the allowance was refused before "
        "compiling; --hotswap-count-all compiles on)"
    )
