"""Issue 22: a failing ``no_recompile`` verdict costs a guard check, and one swap counts once.

Generated files run by pytester in subprocesses (torch's global state stays out of this one).
Each generated test records dynamo's own graph counter (``counters["stats"]["unique_graphs"]``)
around the calls that may recompile, and whether the line after them ran: a refused recompile
compiles no graph and ends the test at that call. No timing.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.xdist_group("fail_at_guard")

CONFTEST = """
import json

import torch
from torch._dynamo.utils import counters

GRAPHS = {}  # test name -> graphs compiled by each watched call
REACHED = []  # tests whose last line ran


class Widths(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


def call(name, compiled, x):
    before = counters["stats"]["unique_graphs"]
    try:
        return compiled(x)
    finally:
        GRAPHS.setdefault(name, []).append(counters["stats"]["unique_graphs"] - before)


def pytest_sessionfinish(session):
    with open("graphs.json", "w") as handle:
        json.dump({"graphs": GRAPHS, "reached": REACHED}, handle)
"""

TEST_PLAIN = """
import pytest
import torch

from conftest import REACHED, Widths, call

X = torch.ones(2, 4)


def widths(name, compile_watcher, *sizes):
    net = Widths()
    compiled = torch.compile(net, backend="eager")
    compiled(X)  # the first compile
    for width in sizes:
        compile_watcher.step(f"swap to width {width}")
        net.lin = torch.nn.Linear(4, width)
        call(name, compiled, X)
    REACHED.append(name)


@pytest.mark.no_recompile
def test_one_recompile(compile_watcher):
    widths("test_one_recompile", compile_watcher, 6)


@pytest.mark.no_recompile(max_recompiles=1)
def test_two_recompiles_one_allowed(compile_watcher):
    widths("test_two_recompiles_one_allowed", compile_watcher, 6, 8)


@pytest.mark.no_recompile(max_recompiles=1, count_all=True)
def test_two_recompiles_counted(compile_watcher):
    widths("test_two_recompiles_counted", compile_watcher, 6, 8)


@pytest.mark.no_recompile(max_recompiles=2)
def test_two_recompiles_two_allowed(compile_watcher):
    widths("test_two_recompiles_two_allowed", compile_watcher, 6, 8)


@pytest.mark.no_recompile
def test_clean(compile_watcher):
    net = Widths()
    compiled = torch.compile(net, backend="eager")
    compiled(X)
    compile_watcher.step("swap in place")
    with torch.no_grad():
        net.lin.weight.copy_(torch.randn(4, 4))
    call("test_clean", compiled, X)
    REACHED.append("test_clean")


@pytest.mark.no_recompile(max_recompiles=5)
def test_storm_within_the_allowance():
    def double(x):
        return x * 2
    compiled = torch.compile(double, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=2):
        for dtype in (torch.float32, torch.float64, torch.float16):
            call("test_storm_within_the_allowance", compiled, torch.ones(3, dtype=dtype))
    REACHED.append("test_storm_within_the_allowance")


@pytest.fixture(scope="module")
def shared():
    net = Widths()
    return net, torch.compile(net, backend="eager")


def test_shared_model_learns_width_6(shared):  # unmarked: its recompile is fine
    net, compiled = shared
    net.lin = torch.nn.Linear(4, 4)
    compiled(X)
    net.lin = torch.nn.Linear(4, 6)
    compiled(X)


@pytest.mark.no_recompile
def test_cache_switch(shared, compile_watcher):
    net, compiled = shared
    net.lin = torch.nn.Linear(4, 4)
    compiled(X)
    compile_watcher.step("swap to width 6")
    net.lin = torch.nn.Linear(4, 6)
    call("test_cache_switch", compiled, X)  # runs the width-6 entry of the test before
    REACHED.append("test_cache_switch")
"""

PLAIN_VERDICTS = {
    "test_one_recompile": "failed",
    "test_two_recompiles_one_allowed": "failed",
    "test_two_recompiles_counted": "failed",
    "test_two_recompiles_two_allowed": "passed",
    "test_clean": "passed",
    "test_storm_within_the_allowance": "failed",
    "test_cache_switch": "failed",
}


def _run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict, dict]:
    """Run, then: the result, the graphs and reached lines, and the report's records by name."""
    result = pytester.runpytest_subprocess(
        "--hotswap-backend=eager", "--hotswap-report=report.json", "-p", "no:cacheprovider", *args
    )
    data = json.loads((pytester.path / "graphs.json").read_text())
    report = json.loads((pytester.path / "report.json").read_text())
    records = {test["nodeid"].split("::")[-1].split("[")[0]: test for test in report["tests"]}
    return result, data, records


@pytest.fixture
def plain(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_plain=TEST_PLAIN)
    return pytester


@pytest.mark.slow
def test_a_failing_verdict_stops_at_the_guard(plain: pytest.Pytester) -> None:
    result, data, records = _run(plain)
    graphs, reached = data["graphs"], set(data["reached"])
    assert {name: record["outcome"] for name, record in records.items()} == PLAIN_VERDICTS
    result.assert_outcomes(passed=3, failed=5)  # and the unwatched test_shared_model_learns...

    # No allowance: the swap's recompile is refused at its guard, no graph, the test ends there.
    assert graphs["test_one_recompile"] == [0]
    assert "test_one_recompile" not in reached
    result.stdout.fnmatch_lines(
        [
            "*_ test_one_recompile _*",
            "no_recompile: 1 recompile (none allowed)",
            "1 compile, 1 recompile, 0 graph breaks, * s compiling",
            'recompile after step "swap to width 6": forward (conftest.py:*)',
            "   guard: tensor 'self.lin.bias' size mismatch at index 0. expected 4, actual 6*",
            "   stopped at the guard: the allowance was spent, so this recompile was refused *",
        ]
    )
    assert "RecompileError" not in result.stdout.str()  # the marker's clean failure, no trace
    assert records["test_one_recompile"]["stopped_at_guard"] is True
    assert [e["stopped_at_guard"] for e in records["test_one_recompile"]["events"]] == [True]

    # One allowed: the first recompile compiles, the second is refused at its guard.
    assert graphs["test_two_recompiles_one_allowed"] == [1, 0]
    assert "test_two_recompiles_one_allowed" not in reached
    result.stdout.fnmatch_lines(
        [
            "*_ test_two_recompiles_one_allowed _*",
            "no_recompile: 2 recompiles (1 allowed)",
            "2 compiles, 2 recompiles, 0 graph breaks, * s compiling",
            'recompile after step "swap to width 6": forward (conftest.py:*)',
            "   guard: tensor 'self.lin.bias' size mismatch at index 0. expected 4, actual 6*",
            'recompile after step "swap to width 8": forward (conftest.py:*)',
            "   guard: tensor 'self.lin.bias' size mismatch at index 0. expected 6, actual 8*",
            "   stopped at the guard: *",
        ]
    )
    assert [
        e["stopped_at_guard"] for e in records["test_two_recompiles_one_allowed"]["events"]
    ] == [
        False,
        True,
    ]

    # The negative controls: two allowed, both compile and the test passes; count_all compiles
    # both and fails at the end, as before.
    assert graphs["test_two_recompiles_two_allowed"] == [1, 1]
    assert "test_two_recompiles_two_allowed" in reached
    assert records["test_two_recompiles_two_allowed"]["stopped_at_guard"] is False
    assert graphs["test_two_recompiles_counted"] == [1, 1]
    assert "test_two_recompiles_counted" in reached
    assert records["test_two_recompiles_counted"]["recompiles"] == 2
    assert records["test_two_recompiles_counted"]["stopped_at_guard"] is False
    result.stdout.fnmatch_lines(
        ["*_ test_two_recompiles_counted _*", "no_recompile: 2 recompiles (1 allowed)"]
    )

    # A clean swap compiles nothing and passes.
    assert graphs["test_clean"] == [0]
    assert "test_clean" in reached

    # A storm within the allowance is still a storm (the frame fell back to eager).
    assert [e["kind"] for e in records["test_storm_within_the_allowance"]["events"]] == [
        "recompile",
        "storm",
    ]
    assert "test_storm_within_the_allowance" in reached

    # A cache switch runs an existing entry (nothing to refuse) and still fails the test.
    assert graphs["test_cache_switch"] == [0]
    assert [e["kind"] for e in records["test_cache_switch"]["events"]] == ["cache_switch"]
    result.stdout.fnmatch_lines(
        [
            "*_ test_cache_switch _*",
            "no_recompile: 1 recompile (none allowed)",
            "*",
            'cache switch (*) after step "swap to width 6": forward (conftest.py:*)',
        ]
    )


@pytest.mark.slow
def test_count_all_option_and_ini_compile_every_recompile(plain: pytest.Pytester) -> None:
    """``--hotswap-count-all`` (and its ini twin): every marked test compiles on and counts
    everything, then fails at the end (the default run above is its negative control)."""
    runs = {"option": ("--hotswap-count-all",)}
    for how, args in runs.items():
        _, data, records = _run(plain, *args, "-k", "one_recompile or one_allowed")
        graphs = data["graphs"]
        assert graphs["test_one_recompile"] == [1], how
        assert graphs["test_two_recompiles_one_allowed"] == [1, 1], how
        assert records["test_two_recompiles_one_allowed"]["recompiles"] == 2, how
        assert not any(record["stopped_at_guard"] for record in records.values()), how
        assert {record["outcome"] for record in records.values()} == {"failed"}, how
    plain.makeini("[pytest]\nhotswap_count_all = true\n")
    _, data, _ = _run(plain, "-k", "one_recompile")
    assert data["graphs"]["test_one_recompile"] == [1]


@pytest.mark.slow
def test_count_all_must_be_a_bool(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_bool="""
        import pytest

        @pytest.mark.no_recompile(count_all="yes")
        def test_x():
            pass
        """,
        test_unknown="""
        import pytest

        @pytest.mark.no_recompile(count_everything=True)
        def test_y():
            pass
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_bool.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*no_recompile(count_all='yes'): expected True or False*"])
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_unknown.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*got unexpected arguments (count_everything=)*count_all=True|False*"]
    )
    # the negative control: a bool is accepted
    pytester.makepyfile(
        test_ok="""
        import pytest

        @pytest.mark.no_recompile(count_all=True)
        def test_z():
            pass
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_ok.py").assert_outcomes(passed=1)


PIPELINES = """
import pytest

from conftest import REACHED


@pytest.mark.no_recompile
def test_rank_past_the_padding(hotswap_pipeline, lora_factory):
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=2 * hotswap_pipeline.max_rank))
    hotswap_pipeline.run()
    REACHED.append("test_rank_past_the_padding")


@pytest.mark.no_recompile(max_recompiles=1)
def test_rank_past_the_padding_one_allowed(hotswap_pipeline, lora_factory):
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=2 * hotswap_pipeline.max_rank))
    hotswap_pipeline.run()
    REACHED.append("test_rank_past_the_padding_one_allowed")


@pytest.mark.no_recompile(count_all=True)
def test_rank_past_the_padding_counted(hotswap_pipeline, lora_factory):
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=2 * hotswap_pipeline.max_rank))
    hotswap_pipeline.run()
    REACHED.append("test_rank_past_the_padding_counted")
"""


@pytest.mark.slow
def test_a_layout_change_and_its_recompile_are_one_event(pytester: pytest.Pytester) -> None:
    """diffusers + PEFT given a rank above the padding replace the LoRA tensors (a layout
    change) and dynamo recompiles on the next call: one incident, one event carrying the tensor
    and the guard. Allowed once, the test passes, as a fresh process (one recompile) says."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_pipelines=PIPELINES)
    result, data, records = _run(
        pytester,
        "--hotswap-max-rank=8",
        "--hotswap-pipelines=flux",
        "--hotswap-implementations=diffusers",
        "-p",
        "no:randomly",
    )
    outcomes = {name: record["outcome"] for name, record in records.items()}
    assert outcomes == {
        "test_rank_past_the_padding": "failed",
        "test_rank_past_the_padding_one_allowed": "passed",
        "test_rank_past_the_padding_counted": "failed",
    }
    reached = set(data["reached"])
    for name in ("test_rank_past_the_padding", "test_rank_past_the_padding_counted"):
        record = records[name]
        assert (record["recompiles"], record["layout_changes"]) == (1, 1), name
        (event,) = record["events"]
        assert event["kind"] == "layout_change"
        assert any("lora_A.default.weight: shape (8, " in tensor for tensor in event["reasons"])
        assert event["caused"].startswith("recompile ")
        assert any("lora_A" in guard for guard in event["guards"]), event["guards"]
    # stopped at the guard with no allowance; compiled on with count_all
    assert records["test_rank_past_the_padding"]["events"][0]["stopped_at_guard"] is True
    assert "test_rank_past_the_padding" not in reached
    assert records["test_rank_past_the_padding_counted"]["events"][0]["stopped_at_guard"] is False
    assert "test_rank_past_the_padding_counted" in reached
    allowed = records["test_rank_past_the_padding_one_allowed"]
    assert (allowed["recompiles"], allowed["layout_changes"]) == (1, 1)
    assert "test_rank_past_the_padding_one_allowed" in reached
    result.stdout.fnmatch_lines(
        [
            "*_ test_rank_past_the_padding?flux-diffusers? _*",
            "no_recompile: 1 recompile (none allowed)",
            "layout change (a LoRA tensor changed under the compiled code) after step "
            '"hotswap #1: *(rank 16)": flux-diffusers',
            "   tensor: *lora_A.default.weight: shape (8, *) -> (16, *)",
            "*",
            "   then recompile * of *",
            "   guard: *lora_A.default.weight*",
            "   stopped at the guard: *",
        ]
    )
