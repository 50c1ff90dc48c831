"""Issue 22: what the conformance suite pays per verdict. Its blocks and their order (shared
compiles), and pipelines left uncompiled for known defects decided in the swap itself."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_hotswap.conformance.conftest import _block_order


@dataclasses.dataclass
class _Impl:
    features: frozenset[str]


IMPLEMENTATIONS = {
    "diffusers": _Impl(frozenset({"adapter slots", "several denoisers"})),
    "reference": _Impl(frozenset({"union of targets", "text-encoder hotswap", "adapter slots"})),
}


def test_the_reference_columns_first_then_graphs_of_their_own_then_the_sharing_columns():
    blocks = [
        (pipeline, implementation, part)
        for pipeline in ("sd", "flux")
        for implementation in ("diffusers", "reference")
        for part in ("", "defects", "catalog")
        if not (implementation == "reference" and part == "defects")
    ]
    order = _block_order(blocks, IMPLEMENTATIONS)
    assert sorted(blocks, key=order.__getitem__) == [
        ("sd", "reference", ""),
        ("flux", "reference", ""),
        ("sd", "diffusers", "catalog"),
        ("sd", "diffusers", "defects"),
        ("sd", "reference", "catalog"),
        ("sd", "diffusers", ""),
        ("flux", "diffusers", "catalog"),
        ("flux", "diffusers", "defects"),
        ("flux", "reference", "catalog"),
        ("flux", "diffusers", ""),
    ]


def test_one_implementation_keeps_the_pipeline_order():
    blocks = [("sd", "diffusers", ""), ("flux", "diffusers", ""), ("sd", "diffusers", "catalog")]
    order = _block_order(blocks, IMPLEMENTATIONS)
    assert sorted(blocks, key=order.__getitem__) == blocks


UNCOMPILED = """
import pytest
import torch

from pytest_hotswap.conformance.test_conformance import assert_rejected


@pytest.mark.hotswap(backend="eager")
def test_an_uncompiled_pipeline_and_its_compiled_twin(
    hotswap_pipeline_factory, lora_factory, compile_watcher
):
    plain = hotswap_pipeline_factory("flux", "reference", compiled=False)
    assert not plain.compiled and compile_watcher.compiles == 0
    compiled = hotswap_pipeline_factory("flux", "reference")  # the negative control
    assert compiled.compiled and compile_watcher.compiles == 1
    assert plain is not compiled
    torch.testing.assert_close(plain.run(), compiled.run())

    rejection = plain.impl.rejection("RankTooLargeError")
    over = lora_factory(plain, rank=plain.max_rank + 8, seed=20)
    twins = []

    def again():
        twins.append(hotswap_pipeline_factory("flux", "reference"))
        return twins[-1]

    assert_rejected(plain, over, rejection, again)  # refused uncompiled: checked again compiled
    assert twins == [compiled]
    assert_rejected(compiled, over, rejection, again)  # compiled already: not again
    assert twins == [compiled]
"""


@pytest.mark.slow
def test_an_uncompiled_pipeline_and_its_compiled_twin(pytester: pytest.Pytester) -> None:
    """``hotswap_pipeline_factory(..., compiled=False)`` and ``assert_rejected``'s check again on
    a compiled pipeline, in a subprocess (the fixtures switch compile isolation on)."""
    pytester.makepyfile(test_uncompiled=UNCOMPILED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hotswap-max-rank=32")
    result.assert_outcomes(passed=1)
