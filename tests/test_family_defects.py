"""Known defects per family: a defect some pipelines show, chosen by what the pipeline's components
are, never by its name. Chroma's T5 text encoder is outside diffusers' text-encoder key tables,
so a plain load of a text-encoder adapter through its loader (FluxLoraLoaderMixin) fails, and its
``text-encoder hotswap (opt-in)`` cell is an upstream defect; Flux's CLIP text encoder, through
the same loader, is the negative control. Expected verdicts are written out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_hotswap.adapters.loading import (
    TEXT_ENCODER_OUTSIDE_KEY_TABLES,
    AdapterLoadError,
    load_first_adapter,
    pipeline_traits,
)
from pytest_hotswap.implementations import Implementation, ReferenceImplementation
from pytest_hotswap.options import HotswapOptions
from pytest_hotswap.stacks import KnownDefect

OPTIONS = HotswapOptions(device="cpu", dtype="float32", backend="eager")


def test_a_defect_that_needs_a_trait_shows_only_on_pipelines_with_it():
    class Upstream(Implementation):
        name = "upstream"
        known_defects = (
            KnownDefect("same_rank", "everywhere", KnownDefect.RECOMPILES),
            KnownDefect("conv2d", "some", KnownDefect.LOAD_FAILS, only_with="a trait"),
        )

    impl = Upstream()
    assert impl.defect("conv2d") is None  # a pipeline without the trait
    assert impl.defect("conv2d", frozenset({"another"})) is None
    assert impl.defect("conv2d", frozenset({"a trait"})).reason == "some"
    assert impl.defect("same_rank").reason == "everywhere"  # needs no trait
    # the stack's verdict counts every defect, whatever it needs
    assert [d.scenario for d in impl.defects_for()] == ["same_rank", "conv2d"]


def test_the_reference_declares_the_text_encoder_defect_by_trait_not_by_name():
    defect = ReferenceImplementation().defect(
        "text_encoder_hotswap", frozenset({TEXT_ENCODER_OUTSIDE_KEY_TABLES})
    )
    assert defect is not None
    assert (defect.failure, defect.only_with) == (
        KnownDefect.LOAD_FAILS,
        TEXT_ENCODER_OUTSIDE_KEY_TABLES,
    )
    assert "_load_lora_into_text_encoder" in defect.reason
    assert ReferenceImplementation().defect("text_encoder_hotswap") is None  # without the trait


def _build(name: str):
    from pytest_hotswap.pipelines import build_spec

    return build_spec(name, OPTIONS)


def test_chroma_t5_text_encoder_has_the_trait_and_its_plain_load_fails(tmp_path: Path):
    """Chroma's text-encoder adapter, written by the pipeline's own save_lora_weights, is not
    read back by its loader: one AdapterLoadError naming the loader and diffusers' error."""
    from pytest_hotswap.adapters import make_lora

    chroma = _build("chroma")
    assert pipeline_traits(chroma) == frozenset({TEXT_ENCODER_OUTSIDE_KEY_TABLES})
    lora = make_lora(chroma.pipe, tmp_path / "chroma", rank=4, text_encoder=True, seed=1)
    with pytest.raises(AdapterLoadError) as failed:
        load_first_adapter(chroma, lora)
    message = str(failed.value)
    assert message.startswith(
        "ChromaPipeline's LoRA loader (FluxLoraLoaderMixin.load_lora_weights) could not load "
    )
    assert message.endswith("ValueError: Could not automatically infer state dict type")


def test_flux_clip_text_encoder_has_no_trait_and_loads(tmp_path: Path):
    """The negative control: the same loader (FluxLoraLoaderMixin) reads a CLIP text encoder's
    adapter."""
    from pytest_hotswap.adapters import make_lora

    flux = _build("flux")
    assert pipeline_traits(flux) == frozenset()
    lora = make_lora(flux.pipe, tmp_path / "flux", rank=4, text_encoder=True, seed=1)
    load_first_adapter(flux, lora)
    assert flux.pipe.text_encoder.peft_config["default"].r == 4


@pytest.mark.slow
def test_the_matrix_shows_chroma_text_encoder_hotswap_as_an_upstream_defect(
    pytester: pytest.Pytester,
) -> None:
    """The conformance suite's cells: chroma's a strict xfail (an upstream defect on this stack,
    so a fixed diffusers turns the run red), flux's a pass (negative control)."""
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        "--pyargs",
        "pytest_hotswap.conformance",
        "--hotswap-backend=eager",
        "-p",
        "no:cacheprovider",
        "--hotswap-pipelines=flux,chroma",
        "--hotswap-implementations=reference",
        f"--hotswap-report={report}",
        "-k",
        "text_encoder_hotswap",
        "-rx",
    )
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=1, xfailed=1)
    matrix = json.loads(report.read_text())["conformance"]
    assert matrix["columns"] == ["flux-reference", "chroma-reference"]
    assert matrix["rows"] == [
        {
            "scenario": "text-encoder hotswap (opt-in)",
            "results": {"flux-reference": "pass", "chroma-reference": "upstream defect"},
        }
    ]
    result.stdout.fnmatch_lines(
        ["XFAIL *test_text_encoder_hotswap[[]chroma-reference[]] - diffusers' text-encoder loader*"]
    )
