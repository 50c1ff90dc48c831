"""Your pipeline, your adapters: a saved pipeline folder, an adapter catalog, max rank ``auto``.

The tiny SD and Flux pipelines are saved with ``save_pretrained`` and a catalog of every key style
and limit is generated for each (``make_catalog``); the fixtures and the conformance suite then run
on them through the path forms of the options, as a team's CI job does.
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


def _first_even_then_odd(factory, catalog, options, implementation):
    # 01 targets every second layer, 02 the others: only a pipeline padded onto the catalog's
    # union of targets takes 02 after 01 (the reference, by default with a catalog).
    files = {entry.name: entry.path for entry in catalog.entries}
    first = files["01-even-r8.safetensors"]
    pipeline = factory(options.pipelines[0], implementation, first_lora=first)
    return pipeline, files["02-odd-r8.safetensors"]


@pytest.mark.no_recompile
def test_disjoint_catalog_files_swap_in(hotswap_pipeline_factory, hotswap_catalog, hotswap_options):
    pipeline, odd = _first_even_then_odd(
        hotswap_pipeline_factory, hotswap_catalog, hotswap_options, "reference"
    )
    before = pipeline.run()
    pipeline.swap(odd)
    assert not (pipeline.run() == before).all()


def test_without_the_union_a_disjoint_file_is_refused(
    hotswap_pipeline_factory, hotswap_catalog, hotswap_options
):
    pipeline, odd = _first_even_then_odd(
        hotswap_pipeline_factory, hotswap_catalog, hotswap_options, "diffusers"
    )
    with pytest.raises((ValueError, RuntimeError)):
        pipeline.swap(odd)
"""

#: Per saved pipeline: the catalog plan line the fixture test prints (max rank, layers in the
#: union of targets, each file's verdict), and the conformance rows of a short run (-k).
DEFECT, PASS = "upstream defect", "pass"
SAVED = {
    "sd": (
        # SD UNet: 83 Linear / Conv2d layers; 8 files, three refused (PEFT keys, text encoder,
        # DoRA).
        "*PLAN 64 83 ok,ok,ok,ok,ok,refused,refused,refused*",
        "same_rank or (catalog and (01 or 02 or 04 or 05 or 06))",
        {
            "same rank": (PASS, PASS),
            "catalog: 01-even-r8.safetensors": (PASS, PASS),
            "catalog: 02-odd-r8.safetensors": (DEFECT, PASS),  # disjoint: only the union takes it
            "catalog: 04-r16.safetensors": (DEFECT, PASS),  # kohya keys, every layer
            "catalog: 05-pattern-r4-64.safetensors": (DEFECT, PASS),  # max rank auto: 64
            "catalog: 06-peft-keys-r8.safetensors": (
                "not supported",
                "refused: PEFT-native keys (base_model.model.)",
            ),
        },
    ),
    "flux": (
        # Flux transformer: 28 Linear layers; the same eight files.
        "*PLAN 64 28 ok,ok,ok,ok,ok,refused,refused,refused*",
        "same_rank or (catalog and (01 or 02))",
        {
            "same rank": (PASS, PASS),
            "catalog: 01-even-r8.safetensors": (PASS, PASS),
            "catalog: 02-odd-r8.safetensors": (DEFECT, PASS),
        },
    ),
}


@pytest.fixture(scope="module", params=sorted(SAVED))
def saved(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A saved tiny pipeline folder (``my_sd``, ``my_flux``), and a generated catalog for it."""
    from pytest_hotswap.adapters import make_catalog
    from pytest_hotswap.pipelines import build_tiny_flux_pipeline, build_tiny_sd_pipeline

    build = {"sd": build_tiny_sd_pipeline, "flux": build_tiny_flux_pipeline}[request.param]
    root = tmp_path_factory.mktemp(f"saved-{request.param}")
    pipe = build()
    pipe.save_pretrained(root / f"my_{request.param}")
    make_catalog(pipe, root / "loras")
    return root / f"my_{request.param}", root / "loras"


@pytest.mark.slow
def test_fixtures_on_a_saved_folder_with_a_catalog_and_auto_max_rank(
    pytester: pytest.Pytester, saved: tuple[Path, Path]
) -> None:
    folder, loras = saved
    plan_line = SAVED[folder.name.removeprefix("my_")][0]
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
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines_random(
        [
            f"hotswap: * | max_rank=64 (auto: {loras}/05-pattern-r4-64.safetensors) backend=eager*",
            f"hotswap catalog: {loras}",
            # 8 files: 64 is the largest rank; three refused (PEFT-native keys, text encoder, DoRA).
            plan_line,
            f"*test_swap?{folder.name}-diffusers? PASSED*",
            f"*test_swap?{folder.name}-reference? PASSED*",
            "*test_disjoint_catalog_files_swap_in PASSED*",
            "*test_without_the_union_a_disjoint_file_is_refused PASSED*",
        ]
    )


@pytest.mark.slow
def test_conformance_on_a_saved_folder_and_its_catalog(
    pytester: pytest.Pytester, saved: tuple[Path, Path]
) -> None:
    folder, loras = saved
    _, chosen, expected = SAVED[folder.name.removeprefix("my_")]
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
        chosen,
        "-p",
        "no:cacheprovider",
    )
    assert result.ret == 0, result.stdout.str()
    matrix = json.loads(report.read_text())["conformance"]
    assert matrix["columns"] == [f"{folder.name}-diffusers", f"{folder.name}-reference"]
    rows = {row["scenario"]: tuple(row["results"].values()) for row in matrix["rows"]}
    assert rows == expected


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "is not a saved diffusers pipeline (no model_index.json)"),
        (
            lambda p: (
                p.mkdir(),
                (p / "model_index.json").write_text('{"vae": ["diffusers", "AutoencoderKL"]}'),
            ),
            "has no denoiser (no unet or transformer component in model_index.json)",
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
