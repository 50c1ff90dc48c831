"""The reference hotswap on compiled tiny models: equal to a fresh eager load, and no recompile.

Compiles use backend="eager": guards alone decide recompiles, the same for every backend (the
inductor run is in test_reference_crosscheck.py). Zero recompiles are counted twice, by the
CompileWatcher and straight from dynamo's own guard-failure records.
"""

from __future__ import annotations

import pytest
import torch
from reference_support import ARCHS, Arch, parameter_identity

from pytest_hotswap.adapters import lora_targets, make_lora
from pytest_hotswap.reference import hotswap, prepare_for_hotswap, set_lora_scale
from pytest_hotswap.watch import CompileWatcher

# Its module fixtures are built once, on one worker.
pytestmark = [
    pytest.mark.usefixtures("reference_compile_environment"),
    pytest.mark.xdist_group("reference"),
]

MAX_RANK = 16


def test_the_module_compiles_in_the_reference_compile_environment() -> None:
    # reference_support.compile_environment raises it from dynamo's default of 8
    assert torch._dynamo.config.recompile_limit == 64


def _sequence(arch: Arch, directory) -> list[tuple[str, object]]:
    """(label, adapter file): ranks below, at and equal to max, other alphas, subsets, A again."""
    model = arch.build()
    if arch.name == "unet":
        convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        subset = ("conv2d only", {"targets": convs, "rank": 12, "alpha": 6})
    else:
        subset = ("three linears", {"targets": lora_targets(model)[6:9], "rank": 4, "alpha": 1})
    plan = [
        ("A: rank 4", {"rank": 4}),
        ("rank 8, alpha 2", {"rank": 8, "alpha": 2}),
        ("rank 16 = max, half the targets", {"rank": MAX_RANK, "alpha": 16, "targets": "half"}),
        ("rank 2, alpha 5", {"rank": 2, "alpha": 5}),
        subset,
        ("A again", {"rank": 4}),
    ]
    return [
        (label, make_lora(model, directory, seed=0 if label.startswith("A") else i, **kwargs))
        for i, (label, kwargs) in enumerate(plan)
    ]


def _guard_failures() -> int:
    return sum(len(reasons) for reasons in torch._dynamo.utils.guard_failures.values())


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS.values()), ids=list(ARCHS))
def test_swap_sequence_matches_eager_load_without_recompiling(arch: Arch, tmp_path) -> None:
    sequence = _sequence(arch, tmp_path)
    model = arch.with_lora(sequence[0][1])
    prepare_for_hotswap(model, MAX_RANK)
    before = parameter_identity(model)
    compiled = torch.compile(model, backend="eager")

    with CompileWatcher() as watch:
        with watch.warmup(arch.name):
            first = arch.run(compiled)
        guard_failures = _guard_failures()
        torch.testing.assert_close(first, arch.run(arch.with_lora(sequence[0][1])))
        for label, path in sequence[1:]:
            watch.step(label)
            hotswap(compiled, path)
            out = arch.run(compiled)
            expected = arch.run(arch.with_lora(path))
            torch.testing.assert_close(out, expected, msg=lambda m, label=label: f"{label}: {m}")
            assert not torch.allclose(out, first) or label == "A again"

    assert torch.equal(out, first), "A -> ... -> A must give the first A's output exactly"
    assert [e.step for e in watch.events if not (e.step or "").startswith("warmup")] == []
    assert _guard_failures() == guard_failures
    watch.assert_no_recompile()
    assert parameter_identity(model) == before


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS.values()), ids=list(ARCHS))
def test_negative_control_same_swaps_without_prepare_recompile(arch: Arch, tmp_path) -> None:
    """diffusers + PEFT hotswap on an unpadded model: rank and alpha changes reach dynamo's guards."""
    sequence = _sequence(arch, tmp_path)
    model = arch.with_lora(sequence[0][1])
    compiled = torch.compile(model, backend="eager")
    with CompileWatcher() as watch:
        with watch.warmup(arch.name):
            arch.run(compiled)
        watch.step(sequence[1][0])
        model.load_lora_adapter(
            str(sequence[1][1]),
            prefix=arch.prefix,
            adapter_name="default",
            hotswap=True,
            use_safetensors=True,
        )
        arch.run(compiled)
    assert watch.recompiles >= 1
    recompile = next(e for e in watch.events if e.kind == "recompile")
    assert recompile.step == "rank 8, alpha 2"
    reasons = "\n".join(recompile.reasons)
    # alpha 4 -> 2 fails the float guard on the scaling; rank 4 -> 8 fails the lora_A size guard,
    # or, where PEFT grew the parameter with torch.utils.swap_tensors, its tensor-type guard
    expected = (
        "scaling['default'] == 1.0",
        "size mismatch",
        "lora_A']._modules['default']._parameters['weight']' to be a tensor type",
    )
    assert any(text in reasons for text in expected), reasons


def test_set_lora_scale_matches_diffusers_scale_and_survives_a_swap(tmp_path) -> None:
    arch = ARCHS["flux"]
    first = make_lora(arch.build(), tmp_path, rank=4, alpha=8, seed=10)
    second = make_lora(arch.build(), tmp_path, rank=8, alpha=4, targets="half", seed=11)
    model = arch.with_lora(first)
    prepare_for_hotswap(model, MAX_RANK)
    compiled = torch.compile(model, backend="eager")
    with CompileWatcher() as watch:
        with watch.warmup(arch.name):
            arch.run(compiled)
        watch.step("strength 0.5")
        set_lora_scale(compiled, 0.5)
        torch.testing.assert_close(arch.run(compiled), arch.run(arch.with_lora(first), scale=0.5))
        watch.step("hotswap keeps strength 0.5")
        hotswap(compiled, second)
        torch.testing.assert_close(arch.run(compiled), arch.run(arch.with_lora(second), scale=0.5))
        watch.step("strength 1.0")
        set_lora_scale(compiled, 1.0)
        torch.testing.assert_close(arch.run(compiled), arch.run(arch.with_lora(second)))
    watch.assert_no_recompile()


def test_prepare_keeps_outputs_and_is_idempotent(tmp_path) -> None:
    arch = ARCHS["unet"]
    path = make_lora(arch.build(), tmp_path, rank=4, alpha=3)
    model = arch.with_lora(path)
    before = arch.run(model)
    index = prepare_for_hotswap(model, MAX_RANK)
    torch.testing.assert_close(arch.run(model), before)
    assert prepare_for_hotswap(model, MAX_RANK) is index
    layers = [m for m in model.modules() if "default" in getattr(m, "lora_A", {})]
    assert {m.lora_A["default"].weight.shape[0] for m in layers} == {MAX_RANK}
    assert all(isinstance(m.scaling["default"], torch.Tensor) for m in layers)
    assert all(m.scaling["default"].dim() == 0 for m in layers)
    assert len(index.slots) == len(layers) == len(lora_targets(model))


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1")
def test_grouped_conv_lora_is_padded_per_group_and_swaps_exactly(tmp_path) -> None:
    """PEFT's grouped-conv LoRA reads the rank dimension in per-group blocks."""
    import safetensors.torch
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    def grouped(rank: int, alpha: float, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1, groups=2))
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False)
        return inject_adapter_in_model(config, model).eval()

    x = torch.randn(1, 4, 6, 6)
    model = grouped(rank=2, alpha=2, seed=1)
    path = make_lora(grouped(rank=2, alpha=2), tmp_path, rank=4, alpha=3, seed=2)
    expected = grouped(rank=4, alpha=3)
    tensors = safetensors.torch.load_file(path)
    set_peft_model_state_dict(
        expected, {k.removeprefix("transformer."): v for k, v in tensors.items()}
    )
    with torch.no_grad():
        before = model(x)
        prepare_for_hotswap(model, 8)
        torch.testing.assert_close(model(x), before)
        hotswap(model, path)
        torch.testing.assert_close(model(x), expected(x))
        assert not torch.allclose(model(x), before)


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1")
def test_swaps_down_zero_exactly_the_rows_the_last_adapter_wrote(tmp_path) -> None:
    """A swap zeroes only the previous adapter's rows beyond the new rank (per group on a grouped
    conv): after 2 -> 6 -> 2 every padded row and column is zero again and outputs are exact."""
    from peft import LoraConfig, inject_adapter_in_model

    from pytest_hotswap.reference.index import rank_blocks

    def grouped(rank: int, seed: int) -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1, groups=2))
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"], init_lora_weights=False)
        return inject_adapter_in_model(config, model).eval()

    x = torch.randn(1, 4, 6, 6)
    model = grouped(rank=2, seed=1)
    first = model(x).detach()
    slot = prepare_for_hotswap(model, 8).slots[0]
    high = make_lora(grouped(rank=2, seed=0), tmp_path / "r6.safetensors", rank=6, seed=2)
    low = make_lora(grouped(rank=2, seed=0), tmp_path / "r2.safetensors", rank=2, seed=3)
    with torch.no_grad():
        hotswap(model, high)
        after_high = model(x)
        hotswap(model, low)
        written = torch.zeros_like(slot.lora_A, dtype=torch.bool)
        for padded, _ in rank_blocks(8, 2, groups=2):
            written[padded] = True
        assert slot.rank == 2
        assert not slot.lora_A[~written].any() and not slot.lora_B[:, 1:].any()
        hotswap(model, high)
        torch.testing.assert_close(model(x), after_high, rtol=0, atol=0)
        assert not torch.allclose(after_high, first)


def test_finite_values_whose_norm_overflows_are_accepted(tmp_path) -> None:
    """The finiteness check's fast 2-norm overflows for large fp16 values: those are still
    written exactly, and a real inf among them is still refused."""
    from peft import LoraConfig, inject_adapter_in_model

    from pytest_hotswap.reference import InvalidAdapterError

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["0"])
    model = inject_adapter_in_model(config, torch.nn.Sequential(torch.nn.Linear(8, 8))).half()
    prepare_for_hotswap(model, 8)
    large = {
        "transformer.0.lora_A.weight": torch.full((4, 8), 60000.0, dtype=torch.float16),
        "transformer.0.lora_B.weight": torch.full((8, 4), 1e-4, dtype=torch.float16),
    }
    assert not torch._foreach_norm([large["transformer.0.lora_A.weight"]])[0].isfinite()
    hotswap(model, large)
    assert torch.equal(model[0].lora_A["default"].weight[:4], large["transformer.0.lora_A.weight"])
    large["transformer.0.lora_A.weight"][1, 2] = float("inf")
    with pytest.raises(InvalidAdapterError, match=r"0\.lora_A\.weight has non-finite values"):
        hotswap(model, large)


@pytest.mark.slow
def test_pipeline_and_every_adapter_format_give_the_same_swap(tmp_path) -> None:
    """A pipeline finds its UNet; kohya files, diffusers files and PEFT state dicts all convert."""
    import safetensors.torch

    from pytest_hotswap import pipelines

    first = make_lora("sd", tmp_path / "first.safetensors", rank=4)
    kwargs = {"rank": 8, "alpha": 2, "targets": "half", "seed": 5}
    as_diffusers = make_lora("sd", tmp_path / "next.safetensors", **kwargs)
    as_kohya = make_lora("sd", tmp_path / "next_kohya.safetensors", fmt="kohya", **kwargs)
    # PEFT keys without a component prefix, as model.save_lora_adapter writes them (no alpha:
    # a state dict carries none, so this one is made with alpha = rank).
    peft_state = {
        k.removeprefix("unet."): v
        for k, v in safetensors.torch.load_file(
            make_lora("sd", tmp_path / "peft.safetensors", rank=8, targets="half", seed=5)
        ).items()
    }

    def fresh_output(path) -> torch.Tensor:
        pipe = pipelines.build_tiny_sd_pipeline()
        pipe.load_lora_weights(str(path), adapter_name="default")
        return pipe(**pipelines.sd_call_kwargs())[0]

    pipe = pipelines.build_tiny_sd_pipeline()
    pipe.load_lora_weights(str(first), adapter_name="default")
    prepare_for_hotswap(pipe, MAX_RANK)
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    # Zero padding (rank 8 -> 16) changes the inner dimension of every LoRA matmul and so the fp32
    # summation order: diffusers' own padding (enable_lora_hotswap(target_rank=16)) moves this
    # output by 1.4e-5 from the unpadded load. The latents are ~8 in magnitude (fp32 rounding
    # ~1e-6 each) after two denoising steps, so 1e-4 is 7x what padding alone does and still
    # 4e4 times below the difference between any two of these adapters (>= 4.4).
    tolerance = {"rtol": 1e-4, "atol": 1e-4}
    expected = fresh_output(as_diffusers)
    for adapter in (as_diffusers, as_kohya):
        hotswap(pipe, adapter)
        torch.testing.assert_close(pipe(**pipelines.sd_call_kwargs())[0], expected, **tolerance)
    hotswap(pipe, peft_state)
    torch.testing.assert_close(
        pipe(**pipelines.sd_call_kwargs())[0],
        fresh_output(tmp_path / "peft.safetensors"),
        **tolerance,
    )
