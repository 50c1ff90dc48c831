"""Hotswap scenarios, each run on every pipeline x implementation of the session.

A scenario that swaps in a valid adapter passes when the compiled pipeline does not recompile and
its output equals a fresh eager pipeline with the same adapter loaded the plain way. A scenario
that swaps in an adapter that cannot be hotswapped passes when the swap raises, the model is left
bit-for-bit as it was, and the next call neither recompiles nor changes the output.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from pytest_hotswap.conformance.conftest import (
    Snapshot,
    assert_same_output,
    eager_output,
    snapshot,
)

pytestmark = pytest.mark.no_recompile


Rejection = type[Exception] | tuple[type[Exception], ...]


class NotRejectedError(AssertionError):
    """An adapter that cannot be hotswapped was accepted."""


class ModelChangedError(AssertionError):
    """A swap that raised left the model changed."""


#: (scenario, implementation) -> (what upstream does wrong, the failure that shows it), reproduced
#: with diffusers 0.42.1 and PEFT 0.21.2. Each is xfail(strict=True, raises=...): a fixed upstream
#: turns the run red, and so does a different failure than the documented one.
KNOWN_DEFECTS: dict[tuple[str, str], tuple[str, type[BaseException]]] = {
    ("rank_over_max", "diffusers"): (
        "diffusers/PEFT do not refuse an adapter above enable_lora_hotswap(target_rank): the "
        "LoRA parameter silently grows and the next call recompiles",
        NotRejectedError,
    ),
    ("superset_targets", "diffusers"): (
        "PEFT refuses keys the first adapter lacks, then diffusers' load_lora_adapter deletes the "
        "loaded adapter: the next call recompiles and runs without any LoRA",
        ModelChangedError,  # LoRA tensors removed
    ),
    ("text_encoder_keys", "diffusers"): (
        "load_lora_weights(hotswap=True) swaps the denoiser first and fails on the text-encoder "
        "keys only afterwards: the model is left half-swapped",
        ModelChangedError,  # denoiser LoRA values swapped
    ),
    ("strength_change", "diffusers"): (
        "diffusers changes LoRA strength through a Python float (the `scale` call argument): "
        "every new value recompiles",
        pytest.fail.Exception,  # raised by no_recompile only
    ),
}


@pytest.fixture(autouse=True)
def _known_defects(request: pytest.FixtureRequest) -> None:
    if "hotswap_pipeline" not in request.fixturenames:
        return
    implementation = request.node.callspec.params["hotswap_pipeline"][1]
    scenario = request.node.originalname.removeprefix("test_")
    defect = KNOWN_DEFECTS.get((scenario, implementation))
    if defect is not None:
        reason, raises = defect
        request.applymarker(pytest.mark.xfail(reason=reason, raises=raises, strict=True))


def swap_and_compare(hotswap_pipeline: Any, lora: Any, config: pytest.Config) -> Any:
    """Swap ``lora`` in, run, and compare with a fresh eager load; returns the output."""
    __tracebackhide__ = True
    before = hotswap_pipeline.run()
    hotswap_pipeline.swap(lora)
    actual = hotswap_pipeline.run()
    assert_same_output(
        actual, eager_output(config, hotswap_pipeline, lora), hotswap_pipeline.options.dtype
    )
    assert not _close(actual, before), (
        "the new adapter did not change the output: nothing was swapped"
    )
    return actual


def assert_rejected(hotswap_pipeline: Any, lora: Any, expected_error: Rejection) -> None:
    """The swap raises ``expected_error``; the model is untouched and keeps working as before."""
    import torch

    __tracebackhide__ = True
    before_output = hotswap_pipeline.run()
    before: Snapshot = snapshot(hotswap_pipeline)
    try:
        hotswap_pipeline.swap(lora)
    except expected_error:
        pass
    else:
        raise NotRejectedError(f"{hotswap_pipeline.implementation} accepted {lora}")
    changed = before.differences(snapshot(hotswap_pipeline))
    if changed:
        raise ModelChangedError(
            "the failed swap changed the model:\n  " + "\n  ".join(changed[:10])
        )
    assert torch.equal(hotswap_pipeline.run(), before_output), (
        "the output changed after a failed swap"
    )


def _close(a: Any, b: Any) -> bool:
    import torch

    return torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def _rejection(implementation: str, reference_error: str) -> Rejection:
    """The reference raises its own class; diffusers + PEFT raise ValueError (or RuntimeError for
    PEFT's unexpected keys). A harness error (a missing file, a TypeError) is never a rejection."""
    if implementation == "reference":
        from pytest_hotswap import reference

        return getattr(reference, reference_error)
    return (ValueError, RuntimeError)


@pytest.fixture
def discard_after(hotswap_pipeline_factory: Any):
    """Drop a pipeline from the session cache after a test that may have broken it."""
    pipelines: list[Any] = []
    yield pipelines.append
    for pipeline in pipelines:
        hotswap_pipeline_factory.discard(pipeline)


# --- Accepted adapters -----------------------------------------------------------------------


def test_same_rank(hotswap_pipeline, lora_factory, pytestconfig):
    swap_and_compare(hotswap_pipeline, lora_factory(hotswap_pipeline, rank=8, seed=1), pytestconfig)


def test_lower_rank(hotswap_pipeline, lora_factory, pytestconfig):
    swap_and_compare(hotswap_pipeline, lora_factory(hotswap_pipeline, rank=4, seed=2), pytestconfig)


def test_rank_equals_max(hotswap_pipeline, lora_factory, pytestconfig):
    lora = lora_factory(hotswap_pipeline, rank=hotswap_pipeline.max_rank, seed=3)
    swap_and_compare(hotswap_pipeline, lora, pytestconfig)


def test_different_alpha(hotswap_pipeline, lora_factory, pytestconfig):
    lora = lora_factory(hotswap_pipeline, rank=8, alpha=32, seed=4)
    swap_and_compare(hotswap_pipeline, lora, pytestconfig)


def test_subset_targets(hotswap_pipeline, lora_factory, pytestconfig):
    lora = lora_factory(hotswap_pipeline, rank=8, targets="half", seed=5)
    swap_and_compare(hotswap_pipeline, lora, pytestconfig)


def test_conv2d(hotswap_pipeline, lora_factory, pytestconfig):
    import torch

    from pytest_hotswap.adapters import lora_targets

    denoiser = getattr(hotswap_pipeline.denoiser, "_orig_mod", hotswap_pipeline.denoiser)
    convs = [
        name
        for name in lora_targets(denoiser)
        if isinstance(denoiser.get_submodule(name).get_base_layer(), torch.nn.Conv2d)
    ]
    if not convs:
        pytest.skip(f"n/a: {hotswap_pipeline.name}'s denoiser has no Conv2d layers")
    lora = lora_factory(hotswap_pipeline, rank=16, targets=convs, seed=6)
    swap_and_compare(hotswap_pipeline, lora, pytestconfig)


def test_quantized_base(hotswap_pipeline, hotswap_pipeline_factory, lora_factory, pytestconfig):
    quantize = hotswap_pipeline.options.quantize
    if quantize == "none":
        quantize = "int8-weight-only"
    pipeline = hotswap_pipeline_factory(
        hotswap_pipeline.name, hotswap_pipeline.implementation, quantize=quantize
    )
    swap_and_compare(pipeline, lora_factory(pipeline, rank=16, seed=7), pytestconfig)


def test_a_b_a(hotswap_pipeline, lora_factory):
    import torch

    first = hotswap_pipeline.run()
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=16, alpha=8, seed=8))
    other = hotswap_pipeline.run()
    hotswap_pipeline.swap(hotswap_pipeline.first_lora)
    again = hotswap_pipeline.run()
    assert not _close(other, first), "adapter B did not change the output"
    assert torch.equal(again, first), "A -> B -> A did not give A's output back bit for bit"


def test_long_sequence(hotswap_pipeline, lora_factory, pytestconfig):
    import torch

    max_rank = hotswap_pipeline.max_rank
    loras = [
        lora_factory(hotswap_pipeline, rank=rank, alpha=alpha, targets=targets, seed=10 + i)
        for i, (rank, alpha, targets) in enumerate(
            [
                (4, None, "all"),
                (max_rank, 16, "all"),
                (16, 4, "half"),
                (min(32, max_rank), None, "all"),
            ]
        )
    ]
    first_outputs: dict[Any, Any] = {}
    for number, lora in zip(range(50), itertools.cycle(loras)):
        hotswap_pipeline.swap(lora)
        output = hotswap_pipeline.run()
        if lora not in first_outputs:
            expected = eager_output(pytestconfig, hotswap_pipeline, lora)
            assert_same_output(output, expected, hotswap_pipeline.options.dtype)
            first_outputs[lora] = output
        else:
            assert torch.equal(output, first_outputs[lora]), f"swap #{number + 1} drifted"


def test_strength_change(hotswap_pipeline, pytestconfig):
    first = hotswap_pipeline.first_lora
    for scale in (0.5, 0.7, 1.0):
        actual = _run_with_strength(hotswap_pipeline, scale)
        expected = eager_output(pytestconfig, hotswap_pipeline, first, scale=scale)
        assert_same_output(actual, expected, hotswap_pipeline.options.dtype)


def _run_with_strength(pipeline: Any, scale: float) -> Any:
    """Reference: set_lora_scale writes the scaling tensors; diffusers: the `scale` call argument."""
    if pipeline.implementation == "reference":
        from pytest_hotswap.reference import set_lora_scale

        set_lora_scale(pipeline.spec.lora_target, scale)
        return pipeline.run()
    kwarg = "joint_attention_kwargs" if pipeline.name == "flux" else "cross_attention_kwargs"
    return pipeline.run(**{kwarg: {"scale": scale}})


# --- Rejected adapters -----------------------------------------------------------------------


def test_rank_over_max(hotswap_pipeline, lora_factory, discard_after):
    discard_after(hotswap_pipeline)
    lora = lora_factory(hotswap_pipeline, rank=hotswap_pipeline.max_rank + 8, seed=20)
    error = _rejection(hotswap_pipeline.implementation, "RankTooLargeError")
    assert_rejected(hotswap_pipeline, lora, error)


def test_superset_targets(hotswap_pipeline, hotswap_pipeline_factory, lora_factory, discard_after):
    pipeline = hotswap_pipeline_factory(
        hotswap_pipeline.name, hotswap_pipeline.implementation, first_targets="half"
    )
    discard_after(pipeline)
    error = _rejection(pipeline.implementation, "UnexpectedTargetsError")
    assert_rejected(pipeline, lora_factory(pipeline, rank=8, targets="all", seed=21), error)


def test_text_encoder_keys(hotswap_pipeline, lora_factory, discard_after):
    if getattr(hotswap_pipeline.pipe, "text_encoder", None) is None:
        pytest.skip(f"n/a: {hotswap_pipeline.name} has no text encoder")
    discard_after(hotswap_pipeline)
    lora = lora_factory(hotswap_pipeline, rank=8, text_encoder=True, seed=22)
    error = _rejection(hotswap_pipeline.implementation, "TextEncoderLoraError")
    assert_rejected(hotswap_pipeline, lora, error)
