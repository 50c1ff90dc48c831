"""Hotswap tests as a downstream repo writes them: fixtures, the two markers and a watcher.

``hotswap_pipeline`` runs each test for every pipeline in ``hotswap_pipelines`` (pytest.ini) and
both implementations (diffusers + PEFT as installed, and pytest-hotswap's reference), built and
compiled once per configuration for the whole session.
"""

from __future__ import annotations

import pytest
import torch

from pytest_hotswap.reference import set_lora_scale


@pytest.mark.no_recompile
def test_swap_sequence_does_not_recompile(hotswap_pipeline, lora_factory):
    first = hotswap_pipeline.run()
    sequence = [
        lora_factory(hotswap_pipeline, rank=4, seed=1),  # below max_rank
        lora_factory(hotswap_pipeline, rank=hotswap_pipeline.max_rank, seed=2),  # at max_rank
        lora_factory(hotswap_pipeline, rank=16, alpha=4, seed=3),  # another alpha
        lora_factory(hotswap_pipeline, rank=8, targets="half", seed=4),  # a subset of the layers
    ]
    outputs = []
    for lora in sequence:
        hotswap_pipeline.swap(lora)
        outputs.append(hotswap_pipeline.run())
    for i, out in enumerate(outputs):
        assert not torch.allclose(out, first), f"adapter {i} did not change the output"
    hotswap_pipeline.swap(sequence[0])
    torch.testing.assert_close(hotswap_pipeline.run(), outputs[0], rtol=0, atol=1e-6)


@pytest.mark.no_recompile
@pytest.mark.hotswap(pipeline="tinydenoiser", max_rank=16)
def test_marker_overrides_the_options(hotswap_pipeline, lora_factory):
    assert hotswap_pipeline.max_rank == 16  # the marker beats pytest.ini and the command line
    hotswap_pipeline.denoise()  # its first call compiles the direct call's graph: before any swap
    for rank in (2, 16):
        hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=rank, seed=rank))
        hotswap_pipeline.denoise()


def test_strength_changes_between_requests(hotswap_pipeline_factory, lora_factory, compile_watcher):
    pipeline = hotswap_pipeline_factory("tinydenoiser", "reference")
    style = lora_factory(pipeline, rank=8, seed=5)
    requests = [(style, 1.0), (style, 0.5), (pipeline.first_lora, 0.25)]
    for number, (lora, strength) in enumerate(requests):  # the next test gets full strength
        compile_watcher.step(f"request {number}: strength {strength}")
        set_lora_scale(pipeline.denoiser, strength)
        pipeline.swap(lora)
        pipeline.run()
    assert compile_watcher.recompiles == 0, compile_watcher.report()
    labels = [step.label for step in compile_watcher.steps if step.label.startswith("request")]
    assert labels == [
        "request 0: strength 1.0",
        "request 1: strength 0.5",
        "request 2: strength 0.25",
    ]


@pytest.mark.xfail(
    strict=True,
    raises=pytest.fail.Exception,  # how the no_recompile marker fails a test
    reason="demonstrates the failure message: a rank above max_rank recompiles under PEFT",
)
@pytest.mark.no_recompile
@pytest.mark.hotswap(max_rank=8)
def test_demonstrates_a_caught_recompile(hotswap_pipeline_factory, lora_factory):
    """PEFT grows the padded tensors to rank 12 instead of refusing: dynamo recompiles.

    Run it with ``--runxfail`` to read the failure: the recompile, its guard (the replaced
    lora_A tensor) and the swap it followed. Rank 12 is one no other test grows to: dynamo
    reuses a cache entry for the same shapes, whichever model instance made it.
    """
    pipeline = hotswap_pipeline_factory("tinydenoiser", "diffusers")
    pipeline.swap(lora_factory(pipeline, rank=12, seed=6))
    pipeline.run()
