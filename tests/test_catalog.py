"""Your pipeline, your adapters: a saved pipeline folder, an adapter catalog, max rank ``auto``.

The tiny SD pipeline is saved with ``save_pretrained`` and a catalog of every key style and limit
is generated for it (``make_catalog``); the fixtures and the conformance suite then run on them
through the path forms of the options, as a team's CI job does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("catalog")

USES_THEM = """
import pytest


def test_the_catalog_fixture(hotswap_catalog, hotswap_options):
    plan = hotswap_catalog.plan(hotswap_options.max_rank)
    verdicts = ",".join(f["verdict"].split(":")[0] for f in plan["files"])
    print("PLAN", plan["max_rank"], len(plan["union_targets"]), verdicts)


@pytest.mark.no_recompile
def test_swap(hotswap_pipeline, lora_factory):
    before = hotswap_pipeline.run()
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=4, seed=1))
    assert not (hotswap_pipeline.run() == before).all()
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A saved tiny SD pipeline folder, and a generated catalog folder for it."""
    from pytest_hotswap.adapters import make_catalog
    from pytest_hotswap.pipelines import build_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("saved")
    pipe = build_tiny_sd_pipeline()
    pipe.save_pretrained(root / "my_sd")
    make_catalog(pipe, root / "loras")
    return root / "my_sd", root / "loras"


def test_fixtures_on_a_saved_folder_with_a_catalog_and_auto_max_rank(
    pytester: pytest.Pytester, saved: tuple[Path, Path]
) -> None:
    folder, loras = saved
    pytester.makepyfile(test_mine=USES_THEM)
    result = pytester.runpytest_subprocess(
        f"--hotswap-pipelines={folder}",
        f"--hotswap-adapters={loras}",
        "--hotswap-max-rank=auto",
        "--hotswap-backend=eager",
        "-p",
        "no:cacheprovider",
        "-s",
        "-v",
    )
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines_random(
        [
            f"hotswap: * | max_rank=64 (auto: {loras}/05-pattern-r4-64.safetensors) backend=eager*",
            f"hotswap catalog: {loras}",
            # 8 files: 64 is the largest rank; three refused (PEFT-native keys, text encoder, DoRA).
            "*PLAN 64 83 ok,ok,ok,ok,ok,refused,refused,refused*",
            "*test_swap?my_sd-diffusers? PASSED*",
            "*test_swap?my_sd-reference? PASSED*",
        ]
    )


def test_conformance_on_a_saved_folder_and_its_catalog(
    pytester: pytest.Pytester, saved: tuple[Path, Path]
) -> None:
    folder, loras = saved
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        "--pyargs",
        "pytest_hotswap.conformance",
        f"--hotswap-pipelines={folder}",
        f"--hotswap-adapters={loras}",
        "--hotswap-max-rank=auto",
        "--hotswap-backend=eager",
        f"--hotswap-report={report}",
        "-k",
        "same_rank or (catalog and (01 or 02 or 04 or 05 or 06))",
        "-p",
        "no:cacheprovider",
    )
    assert result.ret == 0, result.stdout.str()
    matrix = json.loads(report.read_text())["conformance"]
    assert matrix["columns"] == ["my_sd-diffusers", "my_sd-reference"]
    rows = {row["scenario"]: tuple(row["results"].values()) for row in matrix["rows"]}
    defect, refused = "upstream defect", "refused: "
    assert rows == {
        "same rank": ("pass", "pass"),
        "catalog: 01-even-r8.safetensors": ("pass", "pass"),
        "catalog: 02-odd-r8.safetensors": (defect, "pass"),  # disjoint: only the union takes it
        "catalog: 04-r16.safetensors": (defect, "pass"),  # kohya keys, every layer
        "catalog: 05-pattern-r4-64.safetensors": (defect, "pass"),  # max rank auto: 64
        "catalog: 06-peft-keys-r8.safetensors": (
            "not supported",
            refused + "PEFT-native keys (base_model.model.)",
        ),
    }


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "is not a saved diffusers pipeline (no model_index.json)"),
        (
            lambda p: (
                p.mkdir(),
                (p / "model_index.json").write_text('{"vae": ["diffusers", "AutoencoderKL"]}'),
            ),
            "has no denoiser (no transformer or unet component in model_index.json)",
        ),
    ],
    ids=["no model_index.json", "no denoiser"],
)
def test_a_folder_that_is_not_a_pipeline_is_a_usage_error(
    pytester: pytest.Pytester, make, message
) -> None:
    folder = pytester.path / "not_a_pipeline"
    make(folder)
    result = pytester.runpytest_subprocess(f"--hotswap-pipelines={folder}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --hotswap-pipelines: '{folder}': *{message}*"])
