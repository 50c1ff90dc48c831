"""The pipeline and adapter fixtures end to end, through pytester in fresh processes.

Each run is a subprocess: torch's compile caches are process-global, and every diffusers model
compiles the same frame, so only a fresh process shows what one session compiles. The session
cache's restore-or-rebuild runs through a downstream implementation object on a tiny module.
"""

from __future__ import annotations

import json

import pytest
import torch

from pytest_hotswap.options import HotswapOptions

SWAPS = """
import json
from pathlib import Path

import pytest
import torch

import torch


@pytest.fixture(autouse=True)
def record(request, compile_watcher):
    yield
    with open("records.jsonl", "a") as f:
        f.write(json.dumps({
            "test": request.node.name,
            "compiles": compile_watcher.compiles,
            "recompiles": compile_watcher.recompiles,
            "context": compile_watcher.context,
            "steps": [step.label for step in compile_watcher.steps],
        }) + "\\n")


@pytest.mark.no_recompile
def test_swap_sequence(hotswap_pipeline, lora_factory):
    max_rank = hotswap_pipeline.max_rank
    first = hotswap_pipeline.run()
    outputs = []
    for rank, alpha, targets in [(4, 2, "all"), (16, 64, "all"), (max_rank, 8, "all"), (4, 4, "half")]:
        hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank, alpha, targets, seed=rank))
        outputs.append(hotswap_pipeline.run())
    assert all(not torch.allclose(first, out) for out in outputs)


def test_a_failed_swap(hotswap_pipeline, lora_factory):
    # diffusers swaps the denoiser, then refuses the text-encoder keys: a half-swapped model.
    with pytest.raises(ValueError, match="text.encoder"):
        hotswap_pipeline.swap(lora_factory(hotswap_pipeline, text_encoder=True, seed=9))


@pytest.mark.no_recompile
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_each_test_starts_from_the_first_adapter(hotswap_pipeline, lora_factory, seed):
    out = hotswap_pipeline.run()
    torch.save(out, f"first-{hotswap_pipeline.name}-{hotswap_pipeline.implementation}-{seed}.pt")
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline.name, rank=4, seed=seed))
    assert not torch.equal(hotswap_pipeline.run(), out)
"""


def _records(pytester: pytest.Pytester) -> list[dict]:
    return [json.loads(line) for line in (pytester.path / "records.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_swaps_without_recompile_and_one_compile_per_configuration(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_swaps=SWAPS)
    result = pytester.runpytest_subprocess(
        "--hotswap-backend=eager", "--hotswap-max-rank=32", "-p", "no:cacheprovider", "-v"
    )
    result.assert_outcomes(passed=20)
    result.stdout.fnmatch_lines(
        [
            "*test_swap_sequence?sd-diffusers? PASSED*",
            "*test_swap_sequence?sd-reference? PASSED*",
            "*test_swap_sequence?flux-diffusers? PASSED*",
            "*test_swap_sequence?flux-reference? PASSED*",
        ]
    )
    records = _records(pytester)
    configs = {(r["context"]["pipeline"], r["context"]["implementation"]) for r in records}
    assert configs == {(p, i) for p in ("sd", "flux") for i in ("diffusers", "reference")}
    for pipeline, implementation in configs:
        # Built, compiled and warmed up in its first test's setup; all later tests reuse it. Each
        # configuration compiles its own entry (isolate_recompiles): none reuses another's.
        mine = [
            r
            for r in records
            if (r["context"]["pipeline"], r["context"]["implementation"])
            == (pipeline, implementation)
        ]
        assert len(mine) == 5
        assert mine[0]["compiles"] == 1, mine[0]
        assert sum(r["compiles"] for r in mine) == 1
    assert all(r["recompiles"] == 0 for r in records)
    assert records[0]["context"] == {
        "pipeline": "sd",
        "implementation": "diffusers",
        "backend": "eager",
        "device": "cuda" if torch.cuda.is_available() else "cpu",  # how `auto` resolves here
        "quantize": "none",
        "max_rank": 32,
    }
    swap_steps = [s for r in records for s in r["steps"] if s.startswith("hotswap #")]
    assert any("(rank 16)" in s for s in swap_steps)
    assert any(s.startswith("restore first adapter") for r in records for s in r["steps"])
    # Every test saw the first adapter's output, whatever the previous test swapped in, even
    # half-way (test_a_failed_swap runs just before the seed-1 tests).
    for pipeline, implementation in configs:
        first = [
            torch.load(pytester.path / f"first-{pipeline}-{implementation}-{s}.pt")
            for s in (1, 2, 3)
        ]
        assert torch.equal(first[0], first[1])
        assert torch.equal(first[0], first[2])


FAILURES = """
import pytest


@pytest.mark.no_recompile
def test_rank_above_max_recompiles(hotswap_pipeline, lora_factory):
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=2 * hotswap_pipeline.max_rank))
    hotswap_pipeline.run()


@pytest.mark.hotswap(max_rank=16)
def test_marker_overrides_max_rank(hotswap_pipeline, hotswap_options):
    assert hotswap_options.max_rank == 32
    assert hotswap_pipeline.max_rank == 16


@pytest.mark.hotswap(pipeline="kandinsky")
def test_unknown_pipeline(hotswap_pipeline):
    pass


@pytest.mark.hotswap(quantize="float8-dynamic")
def test_float8_dynamic_on_cpu(hotswap_pipeline):
    pass


def test_lora_factory_caches_per_arguments(lora_factory):
    first = lora_factory("flux", rank=4)
    written = first.stat().st_mtime_ns
    assert lora_factory("flux", rank=4) == first
    assert first.stat().st_mtime_ns == written
    other = lora_factory("flux", rank=4, seed=1)
    assert other != first and other.suffix == ".safetensors"
    assert other.read_bytes() != first.read_bytes()


def test_factory_refuses_unknown_override(hotswap_pipeline_factory):
    with pytest.raises(TypeError, match="unknown override.*rank"):
        hotswap_pipeline_factory("flux", "diffusers", rank=4)


def test_factory_refuses_a_bad_dtype(hotswap_pipeline_factory):
    hotswap_pipeline_factory("flux", "diffusers", dtype="bf16")


def test_factory_refuses_compiled_that_is_not_a_bool(hotswap_pipeline_factory):
    hotswap_pipeline_factory("flux", "diffusers", compiled="no")
"""

BAD_MARKER = """
import pytest


@pytest.mark.hotswap(pipelines="flux")
def test_typo(hotswap_pipeline):
    pass
"""


@pytest.mark.slow
def test_recompile_is_caught_and_bad_configurations_are_clear(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_failures=FAILURES, test_bad_marker=BAD_MARKER)
    result = pytester.runpytest_subprocess(
        "--hotswap-backend=eager",
        "--hotswap-max-rank=32",
        "--hotswap-pipelines=flux",
        "--hotswap-implementations=diffusers",
        "--continue-on-collection-errors",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=3, failed=3, errors=3)
    result.stdout.fnmatch_lines_random(
        [
            # The negative control: a real recompile, with the swap it followed and dynamo's guard.
            "*no_recompile*",
            "*after step*hotswap #1: *(rank 64)*",
            "*lora_A*",
            # Clear errors for what cannot be built.
            "*--hotswap-pipelines: 'kandinsky': no registered pipeline of that name (sd, sdxl, sd3, "
            "flux, wan, qwenimage, chroma, zimage)*",
            "*float8-dynamic*compute capability >= 8.9*",
            "*@pytest.mark.hotswap got unknown argument(s) pipelines; accepted: pipeline, max_rank*",
            "*UsageError: *test_factory_refuses_a_bad_dtype: dtype='bf16': expected one of auto, "
            "float32, bfloat16, float16; got 'bf16'",
            "*UsageError: *test_factory_refuses_compiled_that_is_not_a_bool: compiled must be True "
            "or False, got 'no'",
        ]
    )


def test_options_replace_validates_and_resolves_device_and_dtype() -> None:
    options = HotswapOptions(device="cpu")
    with pytest.raises(ValueError, match=r"^dtype='bf16': expected one of auto, float32, bfloat16"):
        options.replace(dtype="bf16")
    with pytest.raises(ValueError, match=r"^device='tpu': expected one of auto, cpu, cuda; got"):
        options.replace(device="tpu")
    assert options.replace(device="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert options.replace(device="cuda", dtype="auto").dtype == "bfloat16"
    assert options.replace(dtype="auto").dtype == "float32"  # on the options' own device, cpu
    assert options.replace(dtype="float16").dtype == "float16"


HALF_WAY_CONFTEST = """
import torch

from pytest_hotswap.implementations import ReferenceImplementation
from pytest_hotswap.pipelines import PipelineSpec


class Proj(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


BUILDS = []


class HalfWay(ReferenceImplementation):
    \"\"\"A downstream implementation whose swap of a file named *broken* writes, then fails.\"\"\"

    name = "halfway"

    def swap(self, spec, lora, *, slot=0):
        super().swap(spec, lora, slot=slot)
        if "broken" in str(lora):
            raise RuntimeError("failed half-way")


def pytest_hotswap_implementations(config):
    return [HalfWay()]


def pytest_hotswap_build_pipeline(name, options):
    torch.manual_seed(0)
    model = Proj()
    BUILDS.append(model)
    return PipelineSpec(name, model, run=lambda: model(torch.ones(1, 8)))
"""

HALF_WAY_TESTS = """
import shutil

import pytest
import torch

from conftest import BUILDS

FIRST = {}


def test_1_a_swap_fails_half_way(hotswap_pipeline_factory, lora_factory, tmp_path):
    pipeline = hotswap_pipeline_factory("tiny", "halfway", max_rank=8)
    FIRST["pipeline"], FIRST["output"] = pipeline, pipeline.run()
    broken = tmp_path / "broken.safetensors"
    shutil.copy(lora_factory(pipeline, rank=2, seed=1), broken)
    with pytest.raises(RuntimeError, match="half-way"):
        pipeline.swap(broken)
    assert not torch.equal(pipeline.run(), FIRST["output"])  # it did write


def test_2_the_next_test_gets_it_restored_not_rebuilt(hotswap_pipeline_factory):
    pipeline = hotswap_pipeline_factory("tiny", "halfway", max_rank=8)
    assert pipeline is FIRST["pipeline"] and len(BUILDS) == 1
    assert torch.equal(pipeline.run(), FIRST["output"])  # swapped back to the first adapter


def test_3_a_pipeline_that_cannot_be_restored_is_rebuilt(hotswap_pipeline_factory):
    pipeline = hotswap_pipeline_factory("tiny", "halfway", max_rank=8)
    pipeline.swap(pipeline.first_lora)
    with torch.no_grad():  # someone replaced a LoRA tensor: no swap can undo that
        lora_A = pipeline.denoiser.proj.lora_A["default"]
        lora_A.weight = torch.nn.Parameter(lora_A.weight.clone())


def test_4_gets_a_new_build_with_the_same_output(hotswap_pipeline_factory):
    pipeline = hotswap_pipeline_factory("tiny", "halfway", max_rank=8)
    assert pipeline is not FIRST["pipeline"] and len(BUILDS) == 2
    assert torch.equal(pipeline.run(), FIRST["output"])
"""


@pytest.mark.slow
def test_the_cache_restores_a_half_swapped_pipeline_and_rebuilds_one_it_cannot_restore(
    pytester: pytest.Pytester,
) -> None:
    """The cache's part of every test's start, through a downstream implementation object."""
    pytester.makeconftest(HALF_WAY_CONFTEST)
    pytester.makepyfile(test_half_way=HALF_WAY_TESTS)
    result = pytester.runpytest_subprocess(
        "--hotswap-backend=eager", "--hotswap-implementations=halfway", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=4)
