"""Wan 2.2's two experts: an adapter for one of them only.

Wan's loader reads the same ``transformer.`` keys into either expert (``transformer_2`` with
``load_into_transformer_2=True``), so ``lora_factory(..., denoisers=["transformer_2"])`` says in
the file's metadata which expert it is for. Hotswapped through the ``diffusers`` implementation
into a pipeline whose experts both carry the first adapter, it goes into ``transformer_2`` by that
route and leaves ``transformer``'s LoRA at zero: zero recompiles, and the output of a fresh
pipeline that loaded the file into ``transformer_2`` alone with plain diffusers calls. Negative
controls: an adapter for both experts leaves non-zero B in both; diffusers' own route alone
(no zeroing) leaves the old adapter in ``transformer`` and another output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_hotswap import CompileWatcher
from pytest_hotswap.adapters import make_lora
from pytest_hotswap.adapters.header import read_header
from pytest_hotswap.options import HotswapOptions
from pytest_hotswap.pipelines import build_hotswap_pipeline, build_spec

#: The module builds and compiles Wan 2.2 once (10.8 s of setup after the imports, 29 s alone).
pytestmark = pytest.mark.slow

OPTIONS = HotswapOptions(max_rank=8, backend="eager", device="cpu", dtype="float32")
LAYER = "blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wan-experts")


@pytest.fixture(scope="module")
def wan(folder: Path) -> Any:
    """Wan 2.2 through the diffusers implementation: both experts padded to rank 8, the first
    adapter (rank 8) in both, compiled (eager backend), warmed up."""
    spec = build_spec("wan", OPTIONS)
    return build_hotswap_pipeline(spec, "diffusers", make_lora(spec.pipe, folder, seed=1), OPTIONS)


@pytest.fixture(scope="module")
def low_noise_only(wan: Any, folder: Path) -> Path:
    return make_lora(wan.pipe, folder, rank=4, seed=2, denoisers=["transformer_2"])


def _lora_b(module: torch.nn.Module) -> list[torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return [m.lora_B["default"].weight for m in module.modules() if isinstance(m, LoraLayer)]


def _fresh_output(lora: Path, **route: Any) -> torch.Tensor:
    """A fresh, uncompiled, unpadded Wan 2.2 with ``lora`` loaded by one plain diffusers call."""
    fresh = build_spec("wan", OPTIONS)
    fresh.pipe.load_lora_weights(str(lora), adapter_name="default", **route)
    with torch.no_grad():
        return fresh.run()


def _swap(wan: Any, lora: Path) -> torch.Tensor:
    with CompileWatcher() as watcher:
        wan.swap(lora)
        output = wan.run()
    watcher.assert_no_recompile()
    assert watcher.compiles == 0
    return output


def test_the_file_is_a_wan_file_that_names_its_expert(low_noise_only: Path):
    header = read_header(low_noise_only)
    assert header.denoisers == ("transformer_2",)
    assert {layer.name.split(".", 1)[0] for layer in header.layers.values()} == {"transformer"}
    assert header.rank == 4


def test_an_adapter_for_one_expert_leaves_the_other_at_zero(wan: Any, low_noise_only: Path):
    output = _swap(wan, low_noise_only)
    first_expert, second_expert = _lora_b(wan.pipe.transformer), _lora_b(wan.pipe.transformer_2)
    assert len(first_expert) == len(second_expert) == 26  # every Linear of the tiny expert
    assert all(b.shape[1] == 8 and not b.any() for b in first_expert)
    assert all(b[:, :4].any() and not b[:, 4:].any() for b in second_expert)  # rank 4 in 8
    expected = _fresh_output(low_noise_only, load_into_transformer_2=True)
    torch.testing.assert_close(output, expected, atol=1e-4, rtol=1e-3)


def test_negative_control_an_adapter_for_both_experts_leaves_both_non_zero(wan: Any, folder: Path):
    both = make_lora(wan.pipe, folder, rank=4, seed=3)
    assert read_header(both).denoisers is None
    _swap(wan, both)
    assert all(b.any() for b in _lora_b(wan.pipe.transformer))
    assert all(b.any() for b in _lora_b(wan.pipe.transformer_2))


def test_negative_control_diffusers_route_alone_keeps_the_other_experts_old_adapter(
    wan: Any, folder: Path, low_noise_only: Path
):
    """What zeroing is for: ``load_lora_weights(hotswap=True, load_into_transformer_2=True)``
    alone leaves ``transformer`` with the adapter before, so the output is not that of a fresh
    load of the file (the comparison above can fail)."""
    _swap(wan, make_lora(wan.pipe, folder, rank=4, seed=3))  # both experts non-zero
    before = wan.pipe.transformer.get_submodule(LAYER).lora_B["default"].weight.clone()
    wan.pipe.load_lora_weights(
        str(low_noise_only), hotswap=True, adapter_name="default", load_into_transformer_2=True
    )
    kept = wan.pipe.transformer.get_submodule(LAYER).lora_B["default"].weight
    assert kept.any() and torch.equal(kept, before)
    with torch.no_grad():
        output = wan.run()
    expected = _fresh_output(low_noise_only, load_into_transformer_2=True)
    assert not torch.allclose(output, expected, atol=1e-4, rtol=1e-3)


def test_a_file_for_an_expert_the_pipeline_lacks_is_refused_before_loading(
    wan: Any, low_noise_only: Path, folder: Path
):
    import safetensors.torch

    odd = folder / "odd.safetensors"
    tensors = safetensors.torch.load_file(str(low_noise_only))
    safetensors.torch.save_file(tensors, str(odd), metadata={"hotswap_denoisers": '["expert_3"]'})
    before = [b.clone() for b in _lora_b(wan.pipe.transformer_2)]
    with pytest.raises(
        ValueError,
        match=r"odd \(rank 4\) is for expert_3; wan has no expert_3 "
        r"\(its denoisers: transformer, transformer_2\)",
    ):
        wan.swap(odd)
    assert all(
        torch.equal(a, b) for a, b in zip(before, _lora_b(wan.pipe.transformer_2), strict=True)
    )
