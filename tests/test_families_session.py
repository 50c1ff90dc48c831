"""The families in a pytest session: saved folders driven by absolute path from elsewhere, refused
at session start when the driver cannot drive them, identified by their resolved path, and the
quantized base "not supported" without torchao unless asked for.

Each run is a ``runpytest_subprocess`` of the conformance suite (eager backend); expected verdicts
and columns are written out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_hotswap.pipelines.families import build_family

SUITE = (
    "--pyargs",
    "pytest_hotswap.conformance",
    "--hotswap-backend=eager",
    "-p",
    "no:cacheprovider",
)

#: A -p plugin that makes ``import torchao`` fail, as in a virtualenv without the [quant] extra.
NO_TORCHAO = 'import sys\n\nsys.modules["torchao"] = None\n'


def _matrix(report: Path) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    matrix = json.loads(report.read_text())["conformance"]
    rows = {row["scenario"]: tuple(row["results"].values()) for row in matrix["rows"]}
    return matrix["columns"], rows


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sdxl and flux saved with their tokenizers, and sd saved twice as ``pipe`` in two parents."""
    root = tmp_path_factory.mktemp("saved-families")
    folders = {
        "sdxl": root / "my_sdxl",
        "flux": root / "my_flux",
        "a": root / "a" / "pipe",
        "b": root / "b" / "pipe",
    }
    build_family("sdxl").save_pretrained(folders["sdxl"])
    build_family("flux").save_pretrained(folders["flux"])
    build_family("sd", seed=0).save_pretrained(folders["a"])
    build_family("sd", seed=5).save_pretrained(folders["b"])
    return folders


@pytest.mark.slow
def test_saved_folders_by_absolute_path_from_another_directory(
    pytester: pytest.Pytester, saved: dict[str, Path]
) -> None:
    """An SDXL folder (once taken for SD 1.x) and a Flux folder run from a directory that holds
    neither, through scenarios that build a second configuration of the same pipeline (once
    looked up again by the folder's name: "no registered pipeline of that name")."""
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        *SUITE,
        f"--hotswap-pipelines={saved['sdxl']},{saved['flux']}",
        "--hotswap-implementations=reference",
        f"--hotswap-report={report}",
        "-k",
        "same_rank or disjoint_targets",
    )
    assert result.ret == 0, result.stdout.str()
    columns, rows = _matrix(report)
    assert columns == ["my_flux-reference", "my_sdxl-reference"]
    assert rows == {
        "same rank": ("pass", "pass"),
        "disjoint targets (union padding)": ("pass", "pass"),
    }


@pytest.mark.slow
def test_two_folders_of_one_name_are_two_pipelines(
    pytester: pytest.Pytester, saved: dict[str, Path]
) -> None:
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        *SUITE,
        f"--hotswap-pipelines={saved['a']},{saved['b']}",
        "--hotswap-implementations=reference",
        f"--hotswap-report={report}",
        "-k",
        "same_rank",
    )
    assert result.ret == 0, result.stdout.str()
    columns, rows = _matrix(report)
    assert columns == ["a/pipe-reference", "b/pipe-reference"]
    assert rows == {"same rank": ("pass", "pass")}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("index", "message"),
    [
        (
            {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtX"]},
            "PixArtAlphaPipeline has no diffusers LoRA loader*pytest_hotswap_build_pipeline hook",
        ),
        (
            {"_class_name": "StableDiffusionImg2ImgPipeline", "unet": ["diffusers", "UNet2D"]},
            "StableDiffusionImg2ImgPipeline.__call__ needs input the driver cannot make: image*"
            "pytest_hotswap_build_pipeline hook",
        ),
    ],
    ids=["no LoRA loader", "needs an input image"],
)
def test_a_folder_the_driver_cannot_drive_is_one_usage_error_at_start(
    pytester: pytest.Pytester, index: dict[str, object], message: str
) -> None:
    """Only model_index.json is read: the refusal comes before any test or build."""
    folder = pytester.path / "theirs"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    result = pytester.runpytest_subprocess(*SUITE, f"--hotswap-pipelines={folder}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --hotswap-pipelines: '{folder}': {message}*"])
    assert "collected" not in result.stdout.str()


@pytest.mark.slow
def test_the_quantized_base_without_torchao_is_not_supported_unless_asked(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(no_torchao=NO_TORCHAO)
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        *SUITE,
        "-p",
        "no_torchao",
        "-rs",
        "--hotswap-pipelines=sd",
        "--hotswap-implementations=reference",
        f"--hotswap-report={report}",
        "-k",
        "quantized_base",
    )
    assert result.ret == 0, result.stdout.str()
    assert _matrix(report)[1] == {"quantized base": ("not supported",)}
    result.stdout.fnmatch_lines(
        ["SKIPPED *not supported: *pip install 'pytest-hotswap[[]quant[]]'"]
    )

    asked = pytester.runpytest_subprocess(
        *SUITE, "-p", "no_torchao", "--hotswap-quantize=int8-weight-only", "-k", "quantized_base"
    )
    assert asked.ret == pytest.ExitCode.USAGE_ERROR
    asked.stderr.fnmatch_lines(
        [
            "ERROR: --hotswap-quantize=int8-weight-only needs torchao, which is not installed: "
            "pip install 'pytest-hotswap[[]quant[]]'"
        ]
    )


WAN_TESTS = """
import pytest
import torch


@pytest.mark.no_recompile
def test_one_swap_reaches_both_experts(hotswap_pipeline_factory, lora_factory):
    pipeline = hotswap_pipeline_factory("wan", "diffusers")
    assert sorted({key.split(".", 1)[0] for key in pipeline.lora_layout()}) == [
        "transformer",
        "transformer_2",
    ]
    before = pipeline.run()
    pipeline.swap(lora_factory(pipeline, rank=4, seed=3))
    layer = "blocks.0.attn1.to_q"
    first = pipeline.pipe.transformer.get_submodule(layer).lora_A["default"].weight
    second = pipeline.pipe.transformer_2.get_submodule(layer).lora_A["default"].weight
    assert first.shape[0] == pipeline.max_rank
    assert torch.equal(first, second) and first[:4].any() and not first[4:].any()
    assert not torch.equal(pipeline.run(), before)


@pytest.mark.no_recompile
def test_a_grown_rank_is_caught(hotswap_pipeline_factory, lora_factory):
    pipeline = hotswap_pipeline_factory("wan", "diffusers", max_rank=8)
    pipeline.swap(lora_factory(pipeline, rank=16, seed=4))
    pipeline.run()


def test_the_reference_refuses_two_denoisers(hotswap_pipeline_factory):
    from pytest_hotswap.implementations import UnsupportedFeatureError

    with pytest.raises(UnsupportedFeatureError, match="wan has 2 [(]transformer, transformer_2[)]"):
        hotswap_pipeline_factory("wan", "reference")
"""


@pytest.mark.slow
def test_wan_22_swaps_both_experts_in_one_swap(pytester: pytest.Pytester) -> None:
    """The diffusers implementation pads, compiles and swaps both experts; a rank grown past
    the padding is caught (negative control), with the layout change named by expert."""
    pytester.makepyfile(test_wan=WAN_TESTS)
    result = pytester.runpytest_subprocess(
        "--hotswap-backend=eager", "--hotswap-max-rank=16", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_a_grown_rank_is_caught _*",
            "no_recompile: 1 recompile (none allowed)",
            "*tensor: transformer.blocks.0.attn1.to_k.lora_A.default.weight: shape (8, 24) -> (16, 24)",
        ]
    )
