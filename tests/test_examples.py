"""Run the downstream example (``examples/downstream``) as a user would, in a fresh process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "downstream"
TESTS = "tests/test_hotswap.py"
DEMO = f"{TESTS}::test_demonstrates_a_caught_recompile"
CLEAN = {
    f"{TESTS}::test_swap_sequence_does_not_recompile[{pipeline}-{implementation}]"
    for pipeline in ("sd", "tinydenoiser")
    for implementation in ("diffusers", "reference")
} | {
    f"{TESTS}::test_marker_overrides_the_options[tinydenoiser-diffusers]",
    f"{TESTS}::test_marker_overrides_the_options[tinydenoiser-reference]",
    f"{TESTS}::test_strength_changes_between_requests",
}


@pytest.fixture
def downstream(pytester: pytest.Pytester) -> pytest.Pytester:
    """A copy of the example repo as the pytester directory (its pytest.ini makes it the rootdir)."""
    shutil.copytree(
        EXAMPLE,
        pytester.path,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", "hotswap-report.json"),
    )
    return pytester


@pytest.mark.slow
def test_example_passes_and_writes_the_report(
    downstream: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_ACTIONS", "true")  # the conftest's recompile hook annotates the PR
    result = downstream.runpytest_subprocess(
        "--hotswap-report=hotswap-report.json", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=8, xfailed=1)
    result.stdout.fnmatch_lines(
        [
            # The options come from pytest.ini.
            "hotswap: * | max_rank=32 backend=eager *pipelines=sd,tinydenoiser "
            "implementations=diffusers,reference",
            # pytest_hotswap_recompile in the example's conftest, fired by the demonstration only:
            # PEFT re-shapes the padded tensors, then dynamo recompiles: one event with both.
            f"::warning file={TESTS},line=*,title=hotswap layout change::{DEMO}: layout change - "
            "after 'hotswap #1: * (rank 12)': mid.lora_A.default.weight: shape (8, 64) -> (12, 64)"
            "; then recompile * of forward (tinydenoiser.py:*): *lora_A*",
            "*= hotswap summary =*",
            "tests watched: 8, swaps: *, compiles: *, recompiles: 1 (layout change: 1), graph breaks: 0",
            "recompiles:",
            f"  {DEMO}: layout_change - of tinydenoiser-diffusers after 'hotswap #1: * (rank 12)': *"
            "; then recompile * of forward (tinydenoiser.py:*): *",
            "hotswap report written to *hotswap-report.json",
        ]
    )
    assert result.stdout.str().count("::warning") == 1

    report = json.loads((downstream.path / "hotswap-report.json").read_text())
    records = {record["nodeid"]: record for record in report["tests"]}
    assert set(records) == {*CLEAN, DEMO}  # test_tinydenoiser.py uses no hotswap fixture
    for nodeid in CLEAN:
        assert (records[nodeid]["outcome"], records[nodeid]["recompiles"]) == ("passed", 0), nodeid
    swaps = records[f"{TESTS}::test_swap_sequence_does_not_recompile[sd-diffusers]"]["swaps"]
    assert [swap["label"].split(":")[0] for swap in swaps] == [f"hotswap #{n}" for n in range(1, 6)]
    assert records[f"{TESTS}::test_strength_changes_between_requests"]["context"] == {
        "pipeline": "tinydenoiser",
        "implementation": "reference",
        "backend": "eager",
        "device": "cuda" if torch.cuda.is_available() else "cpu",  # how `auto` resolves here
        "quantize": "none",
        "max_rank": 32,
    }
    demo = records[DEMO]
    assert demo["recompiles"] == 1 and demo["context"]["max_rank"] == 8  # the marker's max_rank
    assert (demo["outcome"], demo["layout_changes"]) == ("xfailed", 1)
    (layout,) = demo["events"]
    assert layout["kind"] == "layout_change" and layout["step"].endswith("(rank 12)")
    assert layout["caused"].startswith("recompile ") and "lora_A" in layout["guards"][0]
    assert layout["stopped_at_guard"] and demo["stopped_at_guard"]  # refused before compiling

    # The CI gate (ci/github-actions.yml) on an unchanged tree, with that report as the baseline;
    # compile_s is left out of the thresholds: timings on a shared machine are not a test.
    gate = downstream.runpytest_subprocess(
        "--hotswap-pipelines=tinydenoiser",
        "--hotswap-baseline=hotswap-report.json",
        "--hotswap-fail-on=recompiles:0",
        "-p",
        "no:cacheprovider",
    )
    gate.assert_outcomes(passed=6, xfailed=1)  # the recompiling demo is not compared
    gate.stdout.fnmatch_lines(
        ["*- hotswap baseline *hotswap-report.json -*", "compared 5 tests *", "no regressions"]
    )


@pytest.mark.slow
def test_max_rank_below_the_adapters_fails_clearly(downstream: pytest.Pytester) -> None:
    """Negative control: the command line beats pytest.ini, and max rank 4 is too small."""
    result = downstream.runpytest_subprocess(
        "--hotswap-max-rank=4", "--hotswap-pipelines=tinydenoiser", "-p", "no:cacheprovider"
    )
    # The marker test sets its own max_rank (16) and the demonstration still recompiles.
    result.assert_outcomes(passed=3, failed=3, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines_random(
        [
            "hotswap: * | max_rank=4 *pipelines=tinydenoiser *",
            # diffusers + PEFT grows the padded rank to 16 and dynamo recompiles.
            "no_recompile: 1 recompile (none allowed)",
            'layout change (a LoRA tensor changed under the compiled code) after step "hotswap #3: '
            '* (rank 16)": tinydenoiser-diffusers',
            "   then recompile * of forward (tinydenoiser.py:*)",
            "   guard: *mid.lora_A.default.weight*",
            f"FAILED {TESTS}::test_swap_sequence_does_not_recompile?tinydenoiser-diffusers?*",
            # The reference refuses the adapters, naming the ranks.
            "E *RankTooLargeError: *rank 16 is above max_rank=4; prepare the model with "
            "max_rank >= 16*",
            f"FAILED {TESTS}::test_swap_sequence_does_not_recompile?tinydenoiser-reference?*",
            "E *RankTooLargeError: *rank 8 is above max_rank=4*",
            f"FAILED {TESTS}::test_strength_changes_between_requests*",
        ]
    )
