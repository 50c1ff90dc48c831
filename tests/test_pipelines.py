"""The tiny pipelines and the prepare -> load -> quantize -> compile -> warm-up recipe (no plugin)."""

from __future__ import annotations

import pytest
import torch

from pytest_hotswap.adapters import make_lora
from pytest_hotswap.options import HotswapOptions
from pytest_hotswap.pipelines import (
    PipelineSpec,
    build_hotswap_pipeline,
    build_spec,
    check_quantization,
    describe_adapter,
    quiet_diffusers,
)
from pytest_hotswap.watch import CompileWatcher

# Its module fixtures are built once, on one worker.
pytestmark = pytest.mark.xdist_group("pipelines")

MAX_RANK = 32
OPTIONS = HotswapOptions(max_rank=MAX_RANK, backend="eager")
PAIRS = [(name, impl) for name in ("sd", "flux") for impl in ("diffusers", "reference")]


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], object]:
    """Adapters per pipeline: the first one, ranks 4 / 16 / max, other alphas, a subset, too big,
    one with text-encoder keys."""
    folder = tmp_path_factory.mktemp("loras")
    made = {}
    for name in ("sd", "flux"):
        made[name, "first"] = make_lora(name, folder, rank=8, seed=0)
        made[name, "r4"] = make_lora(name, folder, rank=4, alpha=2, seed=1)
        made[name, "r16"] = make_lora(name, folder, rank=16, alpha=64, seed=2)
        made[name, "max"] = make_lora(name, folder, rank=MAX_RANK, alpha=8, seed=3)
        made[name, "half"] = make_lora(name, folder, rank=4, targets="half", seed=4)
        made[name, "too big"] = make_lora(name, folder, rank=2 * MAX_RANK, seed=5)
        made[name, "text encoder"] = make_lora(name, folder, rank=8, text_encoder=True, seed=6)
    return made


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{n}-{i}" for n, i in PAIRS])
def built(request: pytest.FixtureRequest, loras: dict) -> object:
    """A compiled pipeline per (pipeline, implementation), built once for the module."""
    name, impl = request.param
    return build_hotswap_pipeline(build_spec(name, OPTIONS), impl, loras[name, "first"], OPTIONS)


@pytest.fixture
def ready(built: object) -> object:
    """The module's pipeline, back on its first adapter."""
    built.restore_first_adapter()
    return built


def _fresh_output(name: str, lora: object) -> torch.Tensor:
    """What an uncompiled pipeline gives with ``lora`` loaded the plain diffusers way."""
    spec = build_spec(name, OPTIONS)
    with quiet_diffusers():
        spec.pipe.load_lora_weights(str(lora))
    with torch.no_grad():
        return spec.run()


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_tiny_pipeline_builds_runs_and_is_deterministic_for_a_seed(name: str) -> None:
    spec = build_spec(name, OPTIONS)
    with torch.no_grad():
        first, again = spec.run(), spec.run()
        other_seed = spec.run(generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other_seed)
    rebuilt = build_spec(name, OPTIONS)
    with torch.no_grad():
        assert torch.equal(rebuilt.run(), first)


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_factory_adapter_loads_with_plain_diffusers_and_changes_output(
    name: str, loras: dict
) -> None:
    spec = build_spec(name, OPTIONS)
    with torch.no_grad():
        base = spec.run()
    with quiet_diffusers():
        spec.pipe.load_lora_weights(str(loras[name, "r4"]))
    with torch.no_grad():
        adapted = spec.run()
    assert adapted.shape == base.shape
    assert (adapted - base).abs().max() > 1e-3


@pytest.mark.slow
def test_swap_sequence_does_not_recompile(ready: object, loras: dict) -> None:
    name = ready.name
    sequence = ["r4", "r16", "max", "half", "first"]
    with CompileWatcher() as watcher:
        before = ready.run()
        outputs = {}
        for key in sequence:
            ready.swap(loras[name, key])
            outputs[key] = ready.run()
    watcher.assert_no_recompile()
    assert watcher.compiles == 0  # warmed up at build: the exact call compiled already
    assert len(watcher.steps) == len(sequence)
    assert all(step.label.startswith("hotswap #") for step in watcher.steps)
    assert all(step.swap_ms is not None and step.swap_ms > 0 for step in watcher.steps)
    assert watcher.steps[1].label.endswith(f"{loras[name, 'r16'].stem} (rank 16)")
    assert torch.equal(outputs["first"], before)  # A -> ... -> A gives A's output again
    assert len({round(float(t.abs().sum()), 4) for t in outputs.values()}) == len(sequence)


@pytest.mark.parametrize("key", ["r16", "half"])
def test_swapped_output_equals_a_fresh_plain_load(ready: object, loras: dict, key: str) -> None:
    ready.swap(loras[ready.name, key])
    expected = _fresh_output(ready.name, loras[ready.name, key])
    torch.testing.assert_close(ready.run(), expected, atol=1e-4, rtol=1e-4)  # padded math


def test_restore_undoes_a_swap_that_raised_half_way(ready: object, loras: dict) -> None:
    """diffusers swaps the denoiser, then refuses the text-encoder keys: the restore that every
    test starts with must not take the first adapter for still loaded."""
    before = ready.run()
    with pytest.raises(ValueError, match=r"text.encoder"):
        ready.swap(loras[ready.name, "text encoder"])
    assert ready.current_lora is None
    ready.restore_first_adapter()
    assert ready.current_lora is ready.first_lora
    assert torch.equal(ready.run(), before)


@pytest.mark.slow
def test_rank_above_max_recompiles_and_is_caught(loras: dict) -> None:
    """Negative control: PEFT replaces a too-large adapter's tensors, so dynamo must recompile."""
    spec = build_spec("flux", OPTIONS)
    pipeline = build_hotswap_pipeline(spec, "diffusers", loras["flux", "first"], OPTIONS)
    # Earlier tests in this process may have filled the shared frame's cache up to dynamo's
    # recompile_limit; raise it so the recompile is recorded rather than refused.
    with torch._dynamo.config.patch(recompile_limit=64), CompileWatcher() as watcher:
        pipeline.run()
        pipeline.swap(loras["flux", "too big"])
        pipeline.run()
    assert watcher.recompiles >= 1
    recompile = next(event for event in watcher.events if event.is_recompile)
    assert recompile.step.startswith("hotswap #1: ")
    assert "(rank 64)" in recompile.step
    assert any("lora" in reason for reason in recompile.reasons)
    with pytest.raises(AssertionError, match="hotswap #1"):
        watcher.assert_no_recompile()


def test_reference_refuses_rank_above_max_without_touching_the_model(
    loras: dict,
) -> None:
    from pytest_hotswap.reference import RankTooLargeError

    spec = build_spec("flux", OPTIONS)
    pipeline = build_hotswap_pipeline(spec, "reference", loras["flux", "first"], OPTIONS)
    before = pipeline.run()
    with pytest.raises(RankTooLargeError):
        pipeline.swap(loras["flux", "too big"])
    assert torch.equal(pipeline.run(), before)


class TinyDenoiser(torch.nn.Module):
    """A plain module, not diffusers: the downstream case, adapters through PEFT."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = torch.nn.Linear(8, 64)  # wider than MAX_RANK: padding to it means something
        self.proj_out = torch.nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(torch.relu(self.proj_in(x)))


@pytest.mark.parametrize("impl", ["diffusers", "reference"])
def test_plain_module_with_peft_lora_swaps_without_recompile(impl: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyDenoiser()
    x = torch.ones(2, 8)
    spec = PipelineSpec(name="tiny", denoiser=model, run=lambda: model(x))
    first = make_lora(model, tmp_path, rank=8)
    others = [
        make_lora(model, tmp_path, rank=4, alpha=2, seed=1),
        make_lora(model, tmp_path, rank=MAX_RANK, alpha=3, seed=2),
        make_lora(model, tmp_path, rank=4, targets=["proj_out"], seed=3),
    ]
    with CompileWatcher() as watcher:
        pipeline = build_hotswap_pipeline(spec, impl, first, OPTIONS)
        before = pipeline.run()
        outputs = []
        for lora in others:
            pipeline.swap(lora)
            outputs.append(pipeline.run())
        pipeline.restore_first_adapter()
        after = pipeline.run()
    watcher.assert_no_recompile()
    assert torch.equal(before, after)
    assert all(not torch.allclose(before, out) for out in outputs)


class DirectCallDenoiser(TinyDenoiser):
    """Its own ``forward`` code object: no other test's compiles can be in its dynamo cache."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class GrowingDenoiser(TinyDenoiser):
    """Its own ``forward`` code object, like ``DirectCallDenoiser``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def _direct_call_pipeline(model_class: type[torch.nn.Module], tmp_path) -> object:
    torch.manual_seed(0)
    model = model_class()
    x = torch.ones(2, 8)
    spec = PipelineSpec("tiny", model, run=lambda: model(x), inputs=lambda: {"x": torch.ones(3, 8)})
    return build_hotswap_pipeline(spec, "diffusers", make_lora(model, tmp_path), OPTIONS)


def test_first_direct_denoiser_call_is_a_warm_up(tmp_path) -> None:
    """A direct call compiles a new graph (other inputs): its first call is a warm-up."""
    with CompileWatcher() as watcher:
        pipeline = _direct_call_pipeline(DirectCallDenoiser, tmp_path)
        first = pipeline.denoise()
        second = pipeline.denoise()
    watcher.assert_no_recompile()
    assert [event.step for event in watcher.events] == [
        "warmup: warm-up tiny-diffusers run",
        "warmup: warm-up tiny-diffusers denoise",
    ]
    assert torch.equal(first, second)
    assert first.shape == (3, 8)


def test_first_denoise_after_a_swap_is_refused(tmp_path) -> None:
    """That warm-up could hide a recompile the swap caused: it must come before any swap."""
    pipeline = _direct_call_pipeline(DirectCallDenoiser, tmp_path)
    pipeline.swap(make_lora(pipeline.denoiser, tmp_path, rank=4, seed=1))
    with pytest.raises(RuntimeError, match="must come before the first swap"):
        pipeline.denoise()
    pipeline.restore_first_adapter()
    pipeline.denoise()  # the first adapter is back: now it may warm up


def test_denoise_after_a_rank_growing_swap_is_a_recompile(tmp_path) -> None:
    """Negative control: PEFT grows the LoRA tensors past max_rank, so the next direct call
    recompiles and must be reported as such."""
    pipeline = _direct_call_pipeline(GrowingDenoiser, tmp_path)
    pipeline.denoise()
    with CompileWatcher() as watcher:
        pipeline.swap(make_lora(pipeline.denoiser, tmp_path, rank=2 * MAX_RANK, seed=1))
        pipeline.denoise()
    # The swap replaced the padded tensors (a layout change), and the next call recompiled: one
    # incident, one event carrying both the tensor and the guard.
    assert [event.kind for event in watcher.events] == ["layout_change"]
    (layout,) = watcher.events
    assert "(rank 64)" in layout.step
    assert layout.reasons[0] == "proj_in.lora_A.default.weight: shape (32, 8) -> (64, 8)"
    assert layout.caused is not None and layout.caused.startswith("recompile ")
    assert any("lora" in guard for guard in layout.guards)
    assert watcher.recompiles == 1 and not layout.stopped_at_guard


def test_plain_module_rank_above_max_recompiles_with_peft(tmp_path) -> None:
    """Negative control for the PEFT path: a rank above max_rank changes a parameter's shape."""
    torch.manual_seed(0)
    model = TinyDenoiser()
    x = torch.ones(2, 8)
    spec = PipelineSpec(name="tiny", denoiser=model, run=lambda: model(x))
    pipeline = build_hotswap_pipeline(spec, "diffusers", make_lora(model, tmp_path), OPTIONS)
    with CompileWatcher() as watcher:
        pipeline.swap(make_lora(model, tmp_path, rank=2 * MAX_RANK, seed=1))
        pipeline.run()
    assert watcher.recompiles >= 1
    assert all("rank 64" in event.step for event in watcher.events if event.is_recompile)


def test_restore_resets_the_reference_strength(tmp_path) -> None:
    """``set_lora_scale`` outlives swaps by design; a test must still start at full strength."""
    from pytest_hotswap.reference import set_lora_scale

    torch.manual_seed(0)
    model = TinyDenoiser()
    x = torch.ones(2, 8)
    spec = PipelineSpec(name="tiny", denoiser=model, run=lambda: model(x))
    pipeline = build_hotswap_pipeline(spec, "reference", make_lora(model, tmp_path), OPTIONS)
    full = pipeline.run()
    for other in (None, make_lora(model, tmp_path, rank=4, seed=1)):
        set_lora_scale(pipeline.denoiser, 0.25)
        if other is not None:
            pipeline.swap(other)
        assert not torch.allclose(pipeline.run(), full)
        pipeline.restore_first_adapter()
        assert torch.equal(pipeline.run(), full)


@pytest.mark.parametrize("impl", ["diffusers", "reference"])
def test_int8_quantized_base_swaps_without_recompile(impl: str, loras: dict) -> None:
    options = OPTIONS.replace(quantize="int8-weight-only")
    spec = build_spec("flux", options)
    inductor_settings = torch._inductor.config.save_config()
    pipeline = build_hotswap_pipeline(spec, impl, loras["flux", "first"], options)
    assert torch._inductor.config.save_config() == inductor_settings  # torchao left them alone
    to_q = pipeline.denoiser.transformer_blocks[0].attn.to_q
    assert type(to_q.base_layer.weight).__name__ == "Int8Tensor"
    assert type(to_q.lora_A["default"].weight) is torch.nn.Parameter  # the LoRA stays swappable
    with CompileWatcher() as watcher:
        before = pipeline.run()
        pipeline.swap(loras["flux", "r16"])
        swapped = pipeline.run()
        pipeline.swap(loras["flux", "half"])
        pipeline.run()
    watcher.assert_no_recompile()
    assert not torch.allclose(before, swapped)


def test_float8_dynamic_on_cpu_is_refused_before_building() -> None:
    with pytest.raises(ValueError, match=r"compute capability >= 8\.9.*int8-weight-only"):
        check_quantization("float8-dynamic", "cpu")
    spec = PipelineSpec(name="never", denoiser=TinyDenoiser(), run=lambda: torch.ones(1))
    options = OPTIONS.replace(quantize="float8-dynamic")
    with pytest.raises(ValueError, match="float8-dynamic"):
        build_hotswap_pipeline(spec, "diffusers", {}, options)
    assert not any("lora" in name for name, _ in spec.denoiser.named_modules())


def test_unknown_names_are_refused_with_the_known_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"'kandinsky': no registered pipeline of that name "
        r"\(sd, sdxl, sd3, flux, wan, qwenimage, chroma, zimage\)",
    ):
        build_spec("kandinsky", OPTIONS)
    spec = PipelineSpec(name="never", denoiser=TinyDenoiser(), run=lambda: torch.ones(1))
    with pytest.raises(
        ValueError,
        match="no hotswap implementation named 'nope'; known: diffusers, peft, reference",
    ):
        build_hotswap_pipeline(spec, "nope", {}, OPTIONS)


def test_a_given_preparation_is_not_mixed_with_other_preparation_arguments() -> None:
    from pytest_hotswap.implementations import Preparation

    spec = PipelineSpec(name="never", denoiser=TinyDenoiser(), run=lambda: torch.ones(1))
    with pytest.raises(ValueError, match="either preparation or targets / text_encoder / slots"):
        build_hotswap_pipeline(
            spec, "reference", {}, OPTIONS, slots=2, preparation=Preparation(MAX_RANK)
        )
    with pytest.raises(ValueError, match=r"preparation.max_rank=8 but options.max_rank=32"):
        build_hotswap_pipeline(spec, "reference", {}, OPTIONS, preparation=Preparation(8))
    assert not any("lora" in name for name, _ in spec.denoiser.named_modules())


def test_describe_adapter_names_file_and_rank(loras: dict) -> None:
    assert describe_adapter(loras["sd", "r16"]) == f"{loras['sd', 'r16'].stem} (rank 16)"
    assert describe_adapter({"a.lora_A.weight": torch.zeros(4, 8)}) == "state dict (rank 4)"
