"""Dynamo's automatic-dynamic record does not carry a verdict from one test to the next.

dynamo remembers, per code object and for the whole process, which floats and input sizes it has
seen change; a model compiled after another of the same class that changed one compiles it
dynamic from the start, so the recompile a fresh process makes at the first change is hidden
(``isolate_recompiles`` does not separate this record). Each watched test starts with an empty
record: the same verdicts whole file, each test alone, reversed and under ``-n 2``.
"""

from __future__ import annotations

import re

import pytest
from test_order import CONFTEST  # reverses the items when REVERSE_ITEMS is set

pytestmark = pytest.mark.xdist_group("profile")

DOWNSTREAM = """
import pytest
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.scaling = {"default": 1.0}

    def forward(self, x):
        return self.lin(x) * self.scaling["default"]


def run(scalings=(), sizes=(2,)):
    net = Net()
    model = torch.compile(net, backend="eager", fullgraph=True)
    model(torch.ones(sizes[0], 4))
    for value in scalings:
        net.scaling["default"] = value
        model(torch.ones(sizes[0], 4))
    for size in sizes[1:]:
        model(torch.ones(size, 4))


@pytest.mark.no_recompile(max_recompiles=1)
def test_a_two_new_scalings():
    run(scalings=(0.5, 0.25))  # a fresh process: one recompile, then the float is dynamic


@pytest.mark.no_recompile
def test_b_one_new_scaling():
    run(scalings=(0.5,))  # a fresh process recompiles: fails, whatever ran before


@pytest.mark.no_recompile
def test_c_the_same_scaling():
    run(scalings=(1.0,))  # negative control: nothing changes, nothing recompiles


@pytest.mark.no_recompile(max_recompiles=1)
def test_d_two_new_input_sizes():
    run(sizes=(2, 3, 5))  # one recompile, then the size is dynamic


@pytest.mark.no_recompile
def test_e_one_new_input_size():
    run(sizes=(2, 3))  # a fresh process recompiles: fails
"""

EXPECTED = {
    "test_a_two_new_scalings": "PASSED",
    "test_b_one_new_scaling": "FAILED",
    "test_c_the_same_scaling": "PASSED",
    "test_d_two_new_input_sizes": "PASSED",
    "test_e_one_new_input_size": "FAILED",
}
OPTIONS = ("-p", "no:cacheprovider", "-rA")


def _outcomes(result: pytest.RunResult) -> dict[str, str]:
    found = re.findall(r"^(PASSED|FAILED) test_downstream\.py::(\w+)", result.stdout.str(), re.M)
    return {name: outcome for outcome, name in found}


def test_the_same_verdicts_in_every_order(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_downstream=DOWNSTREAM)
    runs = {"whole": _outcomes(pytester.runpytest_subprocess(*OPTIONS))}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REVERSE_ITEMS", "1")
        runs["reversed"] = _outcomes(pytester.runpytest_subprocess(*OPTIONS))
    runs["-n 2"] = _outcomes(pytester.runpytest_subprocess(*OPTIONS, "-n", "2"))
    runs["alone"] = {}
    for name in EXPECTED:
        runs["alone"].update(_outcomes(pytester.runpytest_subprocess(*OPTIONS, "-k", name)))
    assert runs == dict.fromkeys(runs, EXPECTED)


def test_a_failure_names_the_change(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_downstream=DOWNSTREAM)
    result = pytester.runpytest_subprocess(*OPTIONS, "-k", "a_two_new_scalings or b_one")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "no_recompile: 1 recompile (none allowed)",
            "recompile before any step: forward (test_downstream.py:11)",
            "   guard: self.scaling['default'] == 1.0",
        ]
    )
