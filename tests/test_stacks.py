"""The stack logic on fabricated versions: minimum versions, verified ranges, and what a run on a
stack outside them shows (a vanished defect reads "fixed upstream?" and does not fail the run)."""

from __future__ import annotations

import json

import pytest

from pytest_hotswap.cli import main
from pytest_hotswap.stacks import KnownDefect, stack_verdict, too_old, verified_stack

PINNED = {"torch": "2.13.0+cpu", "diffusers": "0.42.1", "peft": "0.21.2", "transformers": "5.23.0"}
DEFECT = KnownDefect(
    "rank_over_max",
    "grows instead of refusing",
    KnownDefect.NOT_REJECTED,
    verified={"diffusers": ">=0.40,<=0.42.1", "peft": ">=0.20,<=0.21.2"},
)


@pytest.mark.parametrize(
    ("changes", "verified"),
    [
        ({}, True),
        ({"diffusers": "0.40.0", "peft": "0.20.0"}, True),  # the oldest stack
        ({"diffusers": "0.43.0"}, False),  # a newer diffusers: not verified
        ({"peft": "0.22.0.dev0"}, False),
        ({"peft": "0.19.0"}, False),
        ({"diffusers": None}, False),  # not installed
    ],
)
def test_a_defect_is_verified_only_inside_every_range(changes, verified):
    stack = {k: v for k, v in {**PINNED, **changes}.items() if v is not None}
    assert DEFECT.verified_on(stack) is verified
    assert verified_stack([DEFECT], stack) is verified


def test_the_stack_verdict_is_one_sentence_for_each_case():
    assert stack_verdict([DEFECT], PINNED) == (
        "verified: the known defects were reproduced on these versions"
    )
    assert stack_verdict([DEFECT], {**PINNED, "diffusers": "0.43.0"}) == (
        "not verified: known defects are expected loosely, a vanished one reads 'fixed upstream?'"
    )
    assert stack_verdict([], PINNED) == "no known defects to verify"


def test_too_old_names_the_package_the_version_found_and_the_one_needed():
    assert too_old(PINNED) == []
    assert too_old(
        {**PINNED, "torch": "2.10.0+cu128", "diffusers": "0.39.0", "torchao": "0.15.0"}
    ) == [
        "torch 2.10.0+cu128 is installed; pytest-hotswap needs torch>=2.11.0 (pip install -U 'torch>=2.11.0')",
        "diffusers 0.39.0 is installed; pytest-hotswap needs diffusers>=0.40.0 (pip install -U 'diffusers>=0.40.0')",
        "torchao 0.15.0 is installed; pytest-hotswap needs torchao>=0.16.0 (pip install -U 'torchao>=0.16.0')",
    ]
    assert too_old({k: v for k, v in PINNED.items() if k != "peft"}) == [
        "peft is not installed; pytest-hotswap needs peft>=0.20.0"
    ]


@pytest.mark.parametrize(
    ("peft", "failure"),
    [
        ("0.21.2", KnownDefect.NOT_REJECTED),  # the first one, verified here
        ("0.19.1", KnownDefect.MODEL_CHANGED),  # the variant verified on older PEFTs
        ("0.23.0", KnownDefect.NOT_REJECTED),  # neither verified: the first one listed
    ],
)
def test_a_defect_that_shows_differently_by_version_is_chosen_by_the_stack(peft, failure):
    from pytest_hotswap.implementations import Implementation

    class Upstream(Implementation):
        name = "upstream"
        known_defects = (
            DEFECT,
            KnownDefect(
                "rank_over_max",
                "refused, then the adapter deleted",
                KnownDefect.MODEL_CHANGED,
                verified={"diffusers": ">=0.40,<=0.42.1", "peft": ">=0.18,<0.20"},
            ),
            KnownDefect("strength_change", "recompiles", KnownDefect.RECOMPILES),
        )

    defects = Upstream().defects_for({**PINNED, "peft": peft})
    assert [(d.scenario, d.failure) for d in defects] == [
        ("rank_over_max", failure),
        ("strength_change", KnownDefect.RECOMPILES),
    ]


def test_a_bad_specifier_is_refused_when_the_table_is_written():
    with pytest.raises(ValueError, match="'>=zero' is not a version specifier"):
        KnownDefect("x", "y", KnownDefect.RECOMPILES, verified={"peft": ">=zero"})


FABRICATED = """
import pytest

from pytest_hotswap import stacks
from pytest_hotswap.conformance.support import NotRejectedError, expect_defect
from pytest_hotswap.stacks import KnownDefect

pytest_plugins = ["pytest_hotswap.conformance.conftest"]
STACK = {"torch": "2.13.0", "diffusers": "DIFFUSERS", "peft": "0.21.2", "transformers": "5.23.0"}
stacks.installed_stack = lambda: dict(STACK)  # the fabricated stack
DEFECT = KnownDefect(
    "rank_over_max", "grows", KnownDefect.NOT_REJECTED, verified={"diffusers": "==0.42.1"}
)


@pytest.mark.parametrize("case", ["sd-diffusers"])
def test_rank_over_max(request, case):
    expect_defect(request, DEFECT)  # the defect no longer reproduces: nothing raised


@pytest.mark.parametrize("case", ["sd-diffusers"])
def test_superset_targets(request, case):
    expect_defect(request, DEFECT)
    raise NotRejectedError("still grows")  # it reproduces


@pytest.mark.parametrize("case", ["sd-diffusers"])
def test_text_encoder_keys(request, case):
    expect_defect(request, DEFECT)
    raise KeyError("a new, different failure")
"""


@pytest.mark.parametrize(
    ("diffusers", "outcomes", "cells"),
    [
        # Verified: strict; the vanished defect turns the run red.
        ("0.42.1", {"failed": 2, "xfailed": 1}, ("XPASS", "upstream defect", "FAIL")),
        # Outside the range: the vanished defect is "fixed upstream?"; a new failure still fails.
        (
            "0.43.0",
            {"xpassed": 1, "xfailed": 1, "failed": 1},
            ("fixed upstream?", "defect (unverified)", "FAIL"),
        ),
    ],
    ids=["verified stack", "unverified stack"],
)
def test_defects_on_a_verified_and_an_unverified_stack(pytester, diffusers, outcomes, cells):
    pytester.makepyfile(test_stack=FABRICATED.replace("DIFFUSERS", diffusers))
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--hotswap-report={report}")
    result.assert_outcomes(**outcomes)
    rows = {
        r["scenario"]: r["results"]["sd-diffusers"]
        for r in json.loads(report.read_text())["conformance"]["rows"]
    }
    assert (
        rows["rank > max rank (rejected)"],
        rows["superset of targets (rejected)"],
        rows["text-encoder keys (rejected)"],
    ) == cells


def test_stacks_command_combines_reports_and_lists_what_changes(tmp_path, capsys):
    def report(name: str, verdict: str, diffusers: str) -> None:
        data = {
            "schema_version": 1,
            "tests": [],
            "conformance": {
                "stack": {"diffusers": diffusers},
                "columns": ["sd-diffusers"],
                "rows": [
                    {"scenario": "same rank", "results": {"sd-diffusers": "pass"}},
                    {
                        "scenario": "rank > max rank (rejected)",
                        "results": {"sd-diffusers": verdict},
                    },
                ],
            },
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(data))

    report("oldest", "upstream defect", "0.40.0")
    report("newest", "fixed upstream?", "0.43.0")
    code = main(["stacks", str(tmp_path / "oldest.json"), str(tmp_path / "newest.json")])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[:2] == ["oldest: diffusers 0.40.0", "newest: diffusers 0.43.0"]
    assert lines[-2:] == [
        "1 cells differ between stacks:",
        "  rank > max rank (rejected) [sd-diffusers]: oldest: upstream defect, newest: fixed upstream?",
    ]


@pytest.mark.parametrize(
    ("torch", "verified"),
    [("2.13.0+cpu", True), ("2.14.1", True), ("2.11.0+cu130", False), ("2.12.1", False)],
)
def test_the_slot_switch_recompile_is_verified_on_torch_2_13_and_newer_only(torch, verified):
    """On torch 2.11.0 switching a slot off and on does not recompile (make stacks
    TORCH=2.11.0): the defect is strict from 2.13 on, "fixed upstream?" before."""
    from pytest_hotswap.implementations import DiffusersImplementation

    stack = {**PINNED, "torch": torch}
    [defect] = [
        d for d in DiffusersImplementation().defects_for(stack) if d.scenario == "slot_off_on"
    ]
    assert defect.verified_on(stack) is verified
