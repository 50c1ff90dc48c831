"""Regional compilation (``--hotswap-compile=regional``): diffusers' ``compile_repeated_blocks``.

The conformance scenarios give the same verdicts regionally as whole; a rank grown past the
padding in one block of Wan (two blocks sharing one compiled code) is caught and named by block,
and the same swap with a legal rank passes; a denoiser without ``_repeated_blocks`` (SD3) is
"not supported". Session runs are ``runpytest_subprocess`` runs with the eager backend; expected
values are written out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pytest_hotswap.implementations import UnsupportedFeatureError
from pytest_hotswap.pipelines.recipe import (
    check_compile_scope,
    compile_denoiser,
    share_region_per_class,
)
from pytest_hotswap.pipelines.registry import PipelineSpec
from pytest_hotswap.watch import CompileWatcher, relevant_first
from pytest_hotswap.watch.caches import region_of

pytest_plugins = ["pytester"]

SELECTION = (
    "--pyargs",
    "pytest_hotswap.conformance",
    "--hotswap-backend=eager",
    "--hotswap-pipelines=flux,wan",
    "-p",
    "no:cacheprovider",
    "-k",
    "same_rank or lower_rank or rank_over_max or a_b_a",
)
# Written out: the cells of the selection on this stack, whole or regional alike.
EXPECTED_ROWS = {
    "same rank": ("pass", "pass", "pass", "not supported"),
    "lower rank": ("pass", "pass", "pass", "not supported"),
    "rank > max rank (rejected)": ("upstream defect", "pass", "upstream defect", "not supported"),
    "A -> B -> A identical": ("pass", "pass", "pass", "not supported"),
}
EXPECTED_COLUMNS = ["flux-diffusers", "flux-reference", "wan-diffusers", "wan-reference"]


def _matrix(report: Path) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    matrix = json.loads(report.read_text())["conformance"]
    rows = {row["scenario"]: tuple(row["results"].values()) for row in matrix["rows"]}
    return matrix["columns"], rows


@pytest.mark.slow
def test_conformance_verdicts_are_the_same_regional_and_whole(pytester: pytest.Pytester) -> None:
    runs = {}
    for scope in ("whole", "regional"):
        report = pytester.path / f"{scope}.json"
        result = pytester.runpytest_subprocess(
            *SELECTION, f"--hotswap-compile={scope}", f"--hotswap-report={report}"
        )
        result.assert_outcomes(passed=10, skipped=4, xfailed=2)
        result.stdout.fnmatch_lines(
            [
                f"hotswap: * quantize=none compile={scope} pipelines=flux,wan *",
                "*hotswap conformance matrix*",
                f"max_rank=128 backend=eager mode=default device=* quantize=none compile={scope}",
            ]
        )
        runs[scope] = _matrix(report)
    assert runs["whole"] == (EXPECTED_COLUMNS, EXPECTED_ROWS)
    assert runs["regional"] == runs["whole"]


GROWN_IN_ONE_BLOCK = """
import pytest

@pytest.mark.no_recompile
@pytest.mark.hotswap(max_rank=8, compile_scope="regional")
@pytest.mark.parametrize("rank", [4, 16])
def test_one_block(hotswap_pipeline_factory, lora_factory, rank):
    pipe = hotswap_pipeline_factory("wan", "diffusers")
    # Rank 8 everywhere but in blocks.1's to_q: 4 fits the padding (8), 16 grows past it.
    lora = lora_factory(pipe, rank=8, seed=1, rank_pattern={"blocks.1.attn1.to_q": rank})
    pipe.run()
    pipe.swap(lora)
    pipe.run()
"""


@pytest.mark.slow
def test_a_rank_grown_past_the_padding_in_one_block_is_caught_and_named(
    pytester: pytest.Pytester,
) -> None:
    """Wan's two blocks share one compiled block code (one region per denoiser): rank 16 in
    ``blocks.1`` only fails, named by block, with the recompile of the shared block frame and
    its LoRA guard; rank 4 there (within the padding) passes: the negative control."""
    pytester.makepyfile(test_grown=GROWN_IN_ONE_BLOCK)
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        "--hotswap-backend=eager", "-p", "no:cacheprovider", f"--hotswap-report={report}"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_one_block[[]16[]] _*",
            "no_recompile: 1 recompile (none allowed)",
            "layout change (a LoRA tensor changed under the compiled code) after step *(rank 16)*",
            "   tensor: transformer.blocks.1.attn1.to_q.lora_A.default.weight: shape (8, 24) -> "
            "(16, 24)",
            "   tensor: transformer.blocks.1.attn1.to_q.lora_B.default.weight: shape (24, 8) -> "
            "(24, 16)",
            "   then recompile * of forward (diffusers/models/transformers/transformer_wan.py:*)",
            # The LoRA guard of the entry block 1 ran, before block 0's input-stride guard.
            "   guard: expected type of 'self.attn1.to_q.lora_A.default.weight' to be a tensor *",
        ]
    )
    assert "blocks.0." not in result.stdout.str().split("short test summary")[0]
    tests = {t["nodeid"].split("::")[-1]: t for t in json.loads(report.read_text())["tests"]}
    assert [e["kind"] for e in tests["test_one_block[4]"]["events"]] == []
    (event,) = tests["test_one_block[16]"]["events"]
    assert event["kind"] == "layout_change"
    assert event["caused"].startswith("recompile ")
    assert sorted(event["reasons"]) == [
        "transformer.blocks.1.attn1.to_q.lora_A.default.weight: shape (8, 24) -> (16, 24)",
        "transformer.blocks.1.attn1.to_q.lora_B.default.weight: shape (24, 8) -> (24, 16)",
        "transformer_2.blocks.1.attn1.to_q.lora_A.default.weight: shape (8, 24) -> (16, 24)",
        "transformer_2.blocks.1.attn1.to_q.lora_B.default.weight: shape (24, 8) -> (24, 16)",
    ]


@pytest.mark.slow
def test_regional_on_a_denoiser_without_repeated_blocks_is_not_supported(
    pytester: pytest.Pytester,
) -> None:
    """SD3's transformer declares ``_repeated_blocks = []``: each sd3 cell is "not supported",
    saying why and what to use, rather than a silent whole compile labelled regional."""
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        "--pyargs",
        "pytest_hotswap.conformance",
        "--hotswap-backend=eager",
        "--hotswap-pipelines=sd3",
        "--hotswap-implementations=diffusers",
        "--hotswap-compile=regional",
        "-p",
        "no:cacheprovider",
        "-k",
        "same_rank",
        "-rs",
        f"--hotswap-report={report}",
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED * not supported: SD3Transformer2DModel (transformer) declares no "
            "_repeated_blocks, so it cannot be compiled regionally (--hotswap-compile=regional); "
            "use --hotswap-compile=whole",
        ]
    )
    assert _matrix(report)[1] == {"same rank": ("not supported",)}


# --- in process: the check, the shared region, the order of reasons --------------------------


def _tiny_wan(num_layers: int = 3) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def _wan_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, 1, 8, 8, generator=generator),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, 7, 32, generator=generator),
    }


def test_check_compile_scope_refuses_only_models_without_repeated_blocks() -> None:
    from diffusers import SD3Transformer2DModel

    sd3 = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    spec = PipelineSpec("sd3", sd3, run=lambda: torch.zeros(1))
    with pytest.raises(
        UnsupportedFeatureError, match=r"SD3Transformer2DModel \(denoiser\) declares"
    ):
        check_compile_scope(spec, "regional")
    check_compile_scope(spec, "whole")  # whole compiles anything
    wan = PipelineSpec("wan", _tiny_wan(1), run=lambda: torch.zeros(1))
    check_compile_scope(wan, "regional")  # declares WanTransformerBlock and holds one
    bare = PipelineSpec("net", torch.nn.Linear(2, 2), run=lambda: torch.zeros(1))
    with pytest.raises(UnsupportedFeatureError, match=r"Linear \(denoiser\) declares no _repeated"):
        check_compile_scope(bare, "regional")


def test_blocks_of_one_class_share_one_isolated_region() -> None:
    """Three Wan blocks: one region, one first compile, output equal to eager; a second model
    gets its own region and compiles afresh (no entry of the first one reused)."""
    eager = _tiny_wan()
    with torch.no_grad():
        expected = eager(**_wan_inputs())[0]
    model = _tiny_wan()
    compile_denoiser(model, "eager", scope="regional")
    regions = {region_of(block) for block in model.blocks}
    assert len(regions) == 1 and None not in regions
    assert region_of(model) is None  # the model itself is not compiled
    with CompileWatcher() as watcher, torch.no_grad():
        assert torch.equal(model(**_wan_inputs())[0], expected)
    assert (watcher.compiles, watcher.recompiles) == (1, 0)

    other = _tiny_wan()
    compile_denoiser(other, "eager", scope="regional")
    assert {region_of(block) for block in other.blocks}.isdisjoint(regions)
    with CompileWatcher() as watcher, torch.no_grad():
        other(**_wan_inputs())
    assert (watcher.compiles, watcher.recompiles) == (1, 0)


def test_without_sharing_each_block_is_its_own_region() -> None:
    """What ``compile_repeated_blocks`` with ``isolate_recompiles=True`` gives alone: a region
    and a first compile per block (the reason for :func:`share_region_per_class`)."""
    model = _tiny_wan()
    model.compile_repeated_blocks(backend="eager", fullgraph=True, isolate_recompiles=True)
    assert len({region_of(block) for block in model.blocks}) == 3
    with CompileWatcher() as watcher, torch.no_grad():
        model(**_wan_inputs())
    assert (watcher.compiles, watcher.recompiles) == (3, 0)
    assert share_region_per_class(_tiny_wan()) is True  # nothing compiled: nothing to share


def test_a_lora_guard_comes_before_another_block_positions_input_guard() -> None:
    reasons = [
        "0/0: tensor 'hidden_states' stride mismatch at index 1. expected 1, actual 24",
        "0/1: expected type of 'self._modules['attn1']._modules['to_q']._modules['lora_A']"
        "._modules['default']._parameters['weight']' to be a tensor type",
    ]
    assert relevant_first(reasons) == (reasons[1], reasons[0])
    assert relevant_first(reasons[:1]) == (reasons[0],)  # negative control: nothing to move
