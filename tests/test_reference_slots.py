"""Issue 16, slots: ``prepare_for_hotswap(..., slots=N)`` gives every LoRA layer N adapter slots,
all active, each weighted by a scaling tensor. Filling a slot, weighting it and switching it off
(weight 0) never recompile, and outputs equal diffusers' eager ``set_adapters`` with the same
adapters and weights."""

from __future__ import annotations

import pytest
import torch
from reference_support import (
    ARCHS,
    Arch,
    model_checksum,
    parameter_identity,
    tensor_layout,
)

from pytest_hotswap.adapters import lora_targets, make_lora
from pytest_hotswap.reference import HotswapError, hotswap, prepare_for_hotswap, set_lora_scale
from pytest_hotswap.watch import CompileWatcher

MAX_RANK = 8
# diffusers' own loads of a second adapter into a model (the expected outputs) make PEFT warn.
pytestmark = [
    pytest.mark.usefixtures("reference_compile_environment"),
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute"),
    pytest.mark.xdist_group("reference_slots"),  # module fixtures: built once, on one worker
]


def _adapters(arch: Arch, directory) -> dict[str, object]:
    model = arch.build()
    names = lora_targets(model)
    return {
        "a": make_lora(
            model, directory / "a.safetensors", rank=4, alpha=8, targets=names[::2], seed=1
        ),
        "b": make_lora(
            model, directory / "b.safetensors", rank=8, alpha=4, targets=names[1::3], seed=2
        ),
        "c": make_lora(
            model, directory / "c.safetensors", rank=2, alpha=2, targets=names[::2], seed=3
        ),
    }


def _set_adapters(arch: Arch, loaded: dict[str, object]):
    """diffusers' eager multi-adapter model: each adapter loaded; ``run(names, weights)`` calls
    ``set_adapters(names, weights)`` and returns the output."""
    model = arch.build()
    for name, path in loaded.items():
        model.load_lora_adapter(
            str(path), prefix=arch.prefix, adapter_name=name, use_safetensors=True
        )

    def run(names: list[str], weights: list[float]) -> torch.Tensor:
        model.set_adapters(names, weights)
        return arch.run(model)

    return run


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS.values()), ids=list(ARCHS))
def test_two_weighted_slots_equal_set_adapters(arch: Arch, tmp_path) -> None:
    files = _adapters(arch, tmp_path)
    model = arch.with_lora(files["a"])
    before = arch.run(model)
    index = prepare_for_hotswap(model, MAX_RANK, targets=[files["b"]], slots=2)
    assert index.adapter_names == ["default", "default_slot1"]
    torch.testing.assert_close(arch.run(model), before, rtol=0, atol=0)  # empty slot: no change
    identity = parameter_identity(model)
    compiled = torch.compile(model, backend="eager")
    expected = _set_adapters(arch, files)

    with CompileWatcher() as watch:
        with watch.warmup(arch.name):
            arch.run(compiled)
        watch.step("b into slot 1")
        hotswap(compiled, files["b"], slot=1)
        for wa, wb in ((1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (1.3, 0.0)):
            watch.step(f"weights {wa}, {wb}")
            set_lora_scale(compiled, wa, slot=0)
            set_lora_scale(compiled, wb, slot=1)
            torch.testing.assert_close(arch.run(compiled), expected(["a", "b"], [wa, wb]))
        watch.step("c into slot 0, weights kept")
        hotswap(compiled, files["c"], slot=0)
        torch.testing.assert_close(arch.run(compiled), expected(["c", "b"], [1.3, 0.0]))
        watch.step("every slot 0.5")
        set_lora_scale(compiled, 0.5)  # slot=None: every slot
        torch.testing.assert_close(arch.run(compiled), expected(["c", "b"], [0.5, 0.5]))
    watch.assert_no_recompile()
    assert parameter_identity(model) == identity
    assert index.weights == [0.5, 0.5]


def test_a_slot_switched_off_and_on(tmp_path) -> None:
    arch = ARCHS["flux"]
    files = _adapters(arch, tmp_path)
    model = arch.with_lora(files["a"])
    index = prepare_for_hotswap(model, MAX_RANK, targets=[files["b"]], slots=2)
    compiled = torch.compile(model, backend="eager")
    only_a = arch.run(arch.with_lora(files["a"]))
    with CompileWatcher() as watch:
        with watch.warmup("flux"):
            assert torch.equal(arch.run(compiled), arch.run(model))
        hotswap(compiled, files["b"], slot=1)
        both = arch.run(compiled)
        slot_0 = [(s.lora_A.clone(), s.lora_B.clone()) for s in index.by_slot[0]]
        watch.step("slot 1 off")
        set_lora_scale(compiled, 0.0, slot=1)
        torch.testing.assert_close(arch.run(compiled), only_a)
        watch.step("slot 1 swapped while off: stays off")
        hotswap(compiled, files["c"], slot=1)
        torch.testing.assert_close(arch.run(compiled), only_a)
        watch.step("slot 1 back on")
        hotswap(compiled, files["b"], slot=1)
        set_lora_scale(compiled, 1.0, slot=1)
        assert torch.equal(arch.run(compiled), both)  # bit for bit: nothing was lost at weight 0
    watch.assert_no_recompile()
    # Swapping slot 1 never touched slot 0.
    for slot, (a, b) in zip(index.by_slot[0], slot_0, strict=True):
        assert torch.equal(slot.lora_A, a) and torch.equal(slot.lora_B, b)


def test_slot_arguments_are_checked(tmp_path) -> None:
    arch = ARCHS["flux"]
    files = _adapters(arch, tmp_path)
    model = arch.with_lora(files["a"])
    for slots in (0, 65, True, 1.5):
        with pytest.raises(HotswapError, match="slots must be an integer from 1 to 64"):
            prepare_for_hotswap(model, MAX_RANK, slots=slots)
    model.load_lora_adapter(
        str(files["c"]), prefix=arch.prefix, adapter_name="default_slot1", use_safetensors=True
    )
    checksum, layout = model_checksum(model), tensor_layout(model)
    with pytest.raises(HotswapError, match=r"needs the adapter names \['default_slot1'\]"):
        prepare_for_hotswap(model, MAX_RANK, slots=2)
    assert model_checksum(model) == checksum and tensor_layout(model) == layout

    model = arch.with_lora(files["a"])
    prepare_for_hotswap(model, MAX_RANK, slots=2)
    checksum = model_checksum(model)
    for call in (
        lambda: hotswap(model, files["c"], slot=2),
        lambda: hotswap(model, files["c"], slot=-1),
        lambda: set_lora_scale(model, 0.5, slot=2),
        lambda: set_lora_scale(model, 0.5, slot=True),
    ):
        with pytest.raises(HotswapError, match=r"slot must be an integer from 0 to 1 .*slots=2"):
            call()
    with pytest.raises(HotswapError, match="already prepared with max_rank=8, slots=2"):
        prepare_for_hotswap(model, MAX_RANK, slots=3)
    assert model_checksum(model) == checksum
