"""A marked test's verdict is the one it gets in a fresh process, whatever ran before it.

The same downstream files run whole, each test alone, in reversed order and under
``pytest-xdist -n 2``; every test's outcome must be the same in all four. Without isolated
compiles and the cache-switch check, a test that swaps in a shape an earlier test compiled passes
when the file runs whole and fails alone (dynamo keeps entries on the code object).
"""

from __future__ import annotations

import re
import sys

import pytest

from pytest_hotswap.watch import isolation

pytestmark = pytest.mark.xdist_group("order")

CONFTEST = """
import os


def pytest_collection_modifyitems(items):
    if os.environ.get("REVERSE_ITEMS"):
        items.reverse()
"""

PLAIN_TORCH = """
import pytest
import torch

X = torch.ones(2, 4)


class Net(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.lin = torch.nn.Linear(4, width)

    def forward(self, x):
        return self.lin(x)


def compiled(net):
    return torch.compile(net, backend="eager", fullgraph=True)


@pytest.fixture(scope="module")
def shared():
    net = Net()
    return net, compiled(net)


@pytest.mark.no_recompile
def test_a_fresh_model_grows(compile_watcher):
    net = Net()
    model = compiled(net)
    model(X)
    compile_watcher.step("swap to width 6")
    net.lin = torch.nn.Linear(4, 6)
    model(X)


@pytest.mark.no_recompile
def test_b_another_fresh_model_grows(compile_watcher):
    net = Net()
    model = compiled(net)
    model(X)
    compile_watcher.step("swap to width 6")
    net.lin = torch.nn.Linear(4, 6)
    model(X)


@pytest.mark.no_recompile
def test_c_a_fresh_model_swaps_in_place(compile_watcher):
    net = Net()
    model = compiled(net)
    model(X)
    compile_watcher.step("swap in place")
    with torch.no_grad():
        net.lin.weight.copy_(torch.randn(4, 4))
    model(X)


# count_all: it compiles its width-6 entry on (refused at the guard, it would leave none behind)
@pytest.mark.no_recompile(count_all=True)
def test_d_the_shared_model_grows(shared, compile_watcher):
    net, model = shared
    net.lin = torch.nn.Linear(4, 4)
    model(X)
    compile_watcher.step("swap to width 6")
    net.lin = torch.nn.Linear(4, 6)
    model(X)


@pytest.mark.no_recompile
def test_f_the_shared_model_grows_again(shared, compile_watcher):
    net, model = shared
    net.lin = torch.nn.Linear(4, 4)
    model(X)
    compile_watcher.step("swap to width 6")
    net.lin = torch.nn.Linear(4, 6)
    model(X)  # after test_d: an entry test_d compiled; alone: a recompile


@pytest.mark.no_recompile
def test_e_the_shared_model_swaps_in_place(shared, compile_watcher):
    net, model = shared
    net.lin = torch.nn.Linear(4, 4)
    model(X)
    compile_watcher.step("swap in place")
    with torch.no_grad():
        net.lin.weight.copy_(torch.randn(4, 4))
    model(X)
"""

PIPELINES = """
import pytest


@pytest.mark.no_recompile
def test_p1_a_rank_that_grows_the_padding(hotswap_pipeline, lora_factory):
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=2 * hotswap_pipeline.max_rank))
    hotswap_pipeline.run()


@pytest.mark.no_recompile
def test_p2_the_same_rank_again(hotswap_pipeline, lora_factory):
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=2 * hotswap_pipeline.max_rank))
    hotswap_pipeline.run()


@pytest.mark.no_recompile
def test_p3_a_clean_swap(hotswap_pipeline, lora_factory):
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=4, seed=3))
    hotswap_pipeline.run()
"""

OPTIONS = (
    "--hotswap-backend=eager",
    "--hotswap-max-rank=8",
    "--hotswap-pipelines=flux",
    "--hotswap-implementations=diffusers",
    "-p",
    "no:cacheprovider",
    "-rA",
)
EXPECTED = {
    "test_plain.py::test_a_fresh_model_grows": "FAILED",
    "test_plain.py::test_b_another_fresh_model_grows": "FAILED",
    "test_plain.py::test_c_a_fresh_model_swaps_in_place": "PASSED",
    "test_plain.py::test_d_the_shared_model_grows": "FAILED",
    "test_plain.py::test_f_the_shared_model_grows_again": "FAILED",
    "test_plain.py::test_e_the_shared_model_swaps_in_place": "PASSED",
    "test_pipelines.py::test_p1_a_rank_that_grows_the_padding[flux-diffusers]": "FAILED",
    "test_pipelines.py::test_p2_the_same_rank_again[flux-diffusers]": "FAILED",
    "test_pipelines.py::test_p3_a_clean_swap[flux-diffusers]": "PASSED",
}
_OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR) (\S+)")


def _outcomes(result: pytest.RunResult) -> dict[str, str]:
    found = {}
    for line in result.outlines:
        match = _OUTCOME.match(line)
        if match:
            found[match[2]] = match[1]
    return found


@pytest.fixture
def downstream(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_plain=PLAIN_TORCH, test_pipelines=PIPELINES)
    return pytester


#: Each test alone, in a process of its own that has compiled nothing: one driver imports torch,
#: diffusers and the plugin once and warms dynamo up on a frame of its own (then
#: ``torch.compiler.reset()``), and forks a child per test that runs ``pytest.main`` on it. Every
#: child starts with empty dynamo caches, as a fresh ``pytest <nodeid>`` does, without paying
#: the imports and dynamo's first-use cost again (~10 s of CPU per test here).
ALONE_DRIVER = """
import os
import sys
import threading

import torch
import diffusers
import peft
import pytest
import transformers
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import pytest_hotswap.pipelines
import pytest_hotswap.watch

OPTIONS = {options!r}
torch.set_num_threads(1)  # no OpenMP pool in the parent: a forked child may not inherit one


def warm(x):
    return x + 1


torch.compile(warm, backend="eager", fullgraph=True)(torch.ones(2))
torch.compiler.reset()
assert not _debug_get_cache_entry_list(warm.__code__), "dynamo kept an entry"
assert threading.active_count() == 1, "a thread in the parent: forking is not safe"
for i, nodeid in enumerate(sys.argv[1:]):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = pytest.main([*OPTIONS, f"--basetemp=alone-{{i}}", nodeid])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))
    os.waitpid(pid, 0)
"""


@pytest.mark.slow
def test_whole_alone_reversed_and_under_xdist_give_the_same_verdicts(
    downstream: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = downstream.runpytest_subprocess(*OPTIONS)
    runs = {"whole": _outcomes(whole)}
    driver = downstream.makepyfile(alone=ALONE_DRIVER.format(options=OPTIONS))
    runs["each alone"] = _outcomes(downstream.run(sys.executable, driver, *EXPECTED, timeout=600))
    with monkeypatch.context() as patch:
        patch.setenv("REVERSE_ITEMS", "1")
        runs["reversed"] = _outcomes(downstream.runpytest_subprocess(*OPTIONS))
    runs["-n 2"] = _outcomes(downstream.runpytest_subprocess(*OPTIONS, "-n", "2"))
    for order in ("whole", "each alone", "reversed", "-n 2"):
        assert runs[order] == EXPECTED, order

    layout = (
        'layout change (a LoRA tensor changed under the compiled code) after step "hotswap '
        '#1: * (rank 16)": flux-diffusers'
    )
    if isolation.supported():
        # Run whole, test_f hits the width-6 entry test_d compiled on the shared model: a cache
        # switch, named with the guard that tells the two entries apart (alone, a plain
        # recompile). The rank growth is a layout change, then a recompile.
        whole.stdout.fnmatch_lines_random(
            [
                "hotswap isolation: isolate_recompiles=True on every torch.compile call (torch *)",
                "cache switch (the frame ran a compiled entry made before this test: in a fresh "
                'process this is a recompile) after step "swap to width 6": forward '
                "(test_plain.py:*)",
                "   guard: tensor 'self.lin.bias' size=?4? (entry */*, run before the step) is "
                "size=?6? in entry */*, compiled before this test",  # ? for fnmatch's [ and ]
                layout,
            ]
        )
    else:  # torch < 2.13: dynamo is reset before each watched test, so test_f recompiles plainly
        assert "cache switch" not in whole.stdout.str()
        whole.stdout.fnmatch_lines_random(
            [
                "hotswap isolation: torch.compiler.reset() before each watched test (torch * has "
                "no isolate_recompiles; models compiled within one test share entries)",
                layout,
            ]
        )


@pytest.mark.slow
def test_fresh_dynamo_per_test_makes_the_shared_model_recompile(
    downstream: pytest.Pytester,
) -> None:
    """``--hotswap-fresh`` resets dynamo before each marked test: what the cache-switch check
    infers, a fresh dynamo shows as a plain recompile."""
    result = downstream.runpytest_subprocess(*OPTIONS, "--hotswap-fresh", "test_plain.py")
    assert _outcomes(result) == {k: v for k, v in EXPECTED.items() if k.startswith("test_plain")}
    assert "cache switch" not in result.stdout.str()
    result.stdout.fnmatch_lines(
        ["*_ test_f_the_shared_model_grows_again _*", "no_recompile: 1 recompile (none allowed)"]
    )
