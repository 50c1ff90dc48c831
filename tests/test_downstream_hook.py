"""Edges of the downstream build hook: rebuilds, the factory cache, a storm, a hook returning garbage.

The happy path (a conftest building a plain nn.Module, swaps under the markers) is the example in
``examples/downstream``, run by ``tests/test_examples.py``.
"""

from __future__ import annotations

import pytest

CONFTEST = """
import torch

from pytest_hotswap.pipelines import PipelineSpec


class TinyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Linear(8, 32)
        self.mid = torch.nn.Linear(32, 32)
        self.proj_out = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.proj_out(torch.relu(self.mid(torch.relu(self.proj_in(x)))))


def pytest_hotswap_build_pipeline(name, options):
    if name == "broken":
        return {"denoiser": TinyDenoiser()}
    if name != "tiny":
        return None
    torch.manual_seed(0)
    dtype = getattr(torch, options.dtype)
    model = TinyDenoiser().to(options.device, dtype)
    x = torch.ones(2, 8, device=options.device, dtype=dtype)
    return PipelineSpec(name="tiny", denoiser=model, run=lambda: model(x), inputs=lambda: {"x": x})
"""

TESTS = """
import pytest
import torch

from peft.tuners.lora import LoraLayer


@pytest.mark.no_recompile
@pytest.mark.hotswap(max_rank=8)
def test_rank_above_the_marker_max_rank(hotswap_pipeline, lora_factory):
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=16, seed=2))
    hotswap_pipeline.run()


@pytest.mark.no_recompile
@pytest.mark.hotswap(max_rank=8)
def test_next_test_gets_an_intact_pipeline(hotswap_pipeline, lora_factory):
    assert hotswap_pipeline.denoiser.mid.lora_A["default"].weight.shape[0] == 8  # padded to max
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=8, seed=3))
    hotswap_pipeline.run()


def test_factory_caches_and_discards(hotswap_pipeline_factory):
    first = hotswap_pipeline_factory("tiny", "reference", max_rank=4)
    assert hotswap_pipeline_factory("tiny", "reference", max_rank=4) is first
    hotswap_pipeline_factory.discard(first)
    rebuilt = hotswap_pipeline_factory("tiny", "reference", max_rank=4)
    assert rebuilt is not first and rebuilt.max_rank == 4
    assert torch.equal(rebuilt.run(), first.run())
    only_mid = hotswap_pipeline_factory("tiny", "reference", max_rank=4, first_targets=["mid"])
    assert only_mid is not rebuilt
    assert isinstance(only_mid.denoiser.mid, LoraLayer)
    assert not isinstance(only_mid.denoiser.proj_in, LoraLayer)


@pytest.mark.hotswap(pipeline="broken")
def test_hook_returning_something_else(hotswap_pipeline):
    pass


stormed = []


def test_a_recompile_storm(hotswap_pipeline_factory, compile_watcher):
    pipeline = hotswap_pipeline_factory("tiny", "reference", max_rank=4)
    stormed.append(pipeline)
    pipeline.denoise()  # the direct call's first compile, a warm-up
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):  # fullgraph: no fallback
            pipeline.denoise(x=torch.ones(5, 8))
    assert [event.kind for event in compile_watcher.events] == ["storm"]


def test_the_next_test_gets_a_rebuilt_pipeline(hotswap_pipeline_factory):
    pipeline = hotswap_pipeline_factory("tiny", "reference", max_rank=4)
    assert pipeline is not stormed[0]
    assert torch.equal(pipeline.run(), stormed[0].run())
"""


@pytest.mark.slow
def test_rebuild_after_reshape_or_storm_factory_cache_and_bad_hook_result(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_downstream=TESTS)
    result = pytester.runpytest_subprocess(
        "--hotswap-pipelines=tiny",
        "--hotswap-backend=eager",
        "--hotswap-max-rank=32",
        "-p",
        "no:cacheprovider",
        "-v",
    )
    result.stdout.fnmatch_lines_random(
        [
            # The negative control: PEFT grows the tensors (a layout change), dynamo recompiles,
            # the marker fails it once, at the guard, for both.
            "*test_rank_above_the_marker_max_rank?tiny-diffusers? FAILED*",
            "no_recompile: 1 recompile (none allowed)",
            "layout change (a LoRA tensor changed under the compiled code) after step "
            '"hotswap #1: *(rank 16)": tiny-diffusers',
            "   tensor: mid.lora_A.default.weight: shape (8, 32) -> (16, 32)",
            "   then recompile * of *",
            "*guard: *mid.lora_A.default.weight*",
            "   stopped at the guard: *",
            # The reference refuses the adapter instead, naming the ranks.
            "*test_rank_above_the_marker_max_rank?tiny-reference? FAILED*",
            "*RankTooLargeError: *rank 16 is above max_rank=8*",
            # The diffusers pipeline the control re-shaped is rebuilt, not reused with recompiles.
            "*test_next_test_gets_an_intact_pipeline?tiny-diffusers? PASSED*",
            "*test_next_test_gets_an_intact_pipeline?tiny-reference? PASSED*",
            "*test_factory_caches_and_discards PASSED*",
            # A pipeline whose test saw a recompile storm is not handed out again.
            "*test_a_recompile_storm PASSED*",
            "*test_the_next_test_gets_a_rebuilt_pipeline PASSED*",
            "*returned dict for 'broken'; return a pytest_hotswap.pipelines.PipelineSpec*",
        ]
    )
    result.assert_outcomes(passed=5, failed=2, errors=2)
