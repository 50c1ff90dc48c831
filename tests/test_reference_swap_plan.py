"""Issue 15: the swap planned once per layout. What the cached plans write is bit-identical to a
fresh padding of each adapter (what the per-layer implementation wrote), the liveness check still
finds any replaced module on the way to a LoRA tensor, and a swap dispatches the same handful of
ops whatever the layer count (foreach ops, one host sync), so a GPU runs a few kernels per swap."""

from __future__ import annotations

import copy

import pytest
import torch
from reference_support import ARCHS

from pytest_hotswap.adapters import lora_targets, make_lora
from pytest_hotswap.reference import NotPreparedError, hotswap, prepare_for_hotswap, set_lora_scale
from pytest_hotswap.reference.components import denoiser_prefix, lora_loader
from pytest_hotswap.reference.formats import read_adapter
from pytest_hotswap.reference.index import rank_blocks
from pytest_hotswap.reference.swap import written_tensors

MAX_RANK = 8


def _expected_slot(model, adapter, slot, strength: float):
    """A fresh zero padding of ``adapter``'s tensors for one layer, and its scaling as written:
    float32(alpha / r x strength); zeros and 0 for a layer the adapter does not target."""
    lora_A, lora_B = torch.zeros_like(slot.lora_A), torch.zeros_like(slot.lora_B)
    if slot.key_A not in adapter.tensors:
        return lora_A, lora_B, 0.0
    source_A, source_B = adapter.tensors[slot.key_A], adapter.tensors[slot.key_B]
    rank = source_A.shape[0]
    for padded, unpadded in rank_blocks(slot.max_rank, rank, slot.groups):
        lora_A[padded] = source_A[unpadded]
    lora_B[:, : rank // slot.groups] = source_B
    config = adapter.config  # one alpha for every layer (make_lora), no rsLoRA
    assert not config.alpha_pattern and not config.use_rslora
    scaling = config.lora_alpha / rank
    return lora_A, lora_B, float(torch.tensor(scaling * strength, dtype=torch.float32))


@pytest.mark.parametrize("arch", list(ARCHS.values()), ids=list(ARCHS))
def test_cached_plans_write_exactly_a_fresh_padding(arch, tmp_path) -> None:
    model = arch.build()
    names = lora_targets(model)
    adapters = [
        make_lora(model, tmp_path, rank=4, alpha=4, seed=0),
        make_lora(model, tmp_path, rank=8, alpha=2, seed=1),  # a new layout, higher rank
        make_lora(model, tmp_path, rank=8, alpha=2, seed=2),  # same layout: a cached plan
        make_lora(model, tmp_path, rank=2, alpha=5, targets=names[1::2], seed=3),  # down, subset
        make_lora(model, tmp_path, rank=8, alpha=2, seed=4),  # back to a cached layout
        make_lora(model, tmp_path, rank=6, alpha=3, targets=names[::3], seed=5),
    ]
    model = arch.with_lora(adapters[0])
    index = prepare_for_hotswap(model, MAX_RANK)
    loader, prefix = lora_loader(model), denoiser_prefix(model)
    for step, path in enumerate(adapters[1:] + adapters[:1]):
        strength = 1.0 if step < 3 else 0.5
        set_lora_scale(model, strength)
        hotswap(model, path)
        adapter = read_adapter(path, loader, prefix)
        for slot in index.slots:
            lora_A, lora_B, scaling = _expected_slot(model, adapter, slot, strength)
            assert torch.equal(slot.lora_A, lora_A), (step, slot.key_A)
            assert torch.equal(slot.lora_B, lora_B), (step, slot.key_B)
            assert float(slot.scaling) == scaling, (step, slot.name)
    assert len(index.layouts) == 4  # ranks 8 (twice cached), 2, 6, 4


def _model(tmp_path):
    arch = ARCHS["flux"]
    model = arch.with_lora(make_lora(arch.build(), tmp_path / "a.safetensors", rank=4))
    prepare_for_hotswap(model, MAX_RANK)
    return model, make_lora(arch.build(), tmp_path / "b.safetensors", rank=2, seed=1)


@pytest.mark.parametrize(
    ("change", "stale"),
    [
        ("ancestor", "transformer_blocks.0.norm1.linear"),
        ("root child", "x_embedder"),
        ("lora module dict", "x_embedder"),
        ("adapter module", "context_embedder"),
        ("weight", "proj_out"),
        ("scaling as a float", "proj_out"),
        ("deleted adapter", "norm_out.linear"),
    ],
)
def test_liveness_finds_any_replaced_object_on_the_way(tmp_path, change, stale) -> None:
    model, other = _model(tmp_path)
    hotswap(model, other)  # live: the check passes, and plans are cached
    if change == "ancestor":  # an equal copy of a whole block: its LoRA tensors are new objects
        model.transformer_blocks[0] = copy.deepcopy(model.transformer_blocks[0])
    elif change == "root child":
        model.x_embedder = copy.deepcopy(model.x_embedder)
    elif change == "lora module dict":
        model.x_embedder.lora_A = copy.deepcopy(model.x_embedder.lora_A)
    elif change == "adapter module":
        model.context_embedder.lora_B["default"] = copy.deepcopy(
            model.context_embedder.lora_B["default"]
        )
    elif change == "weight":
        layer = model.proj_out.lora_A["default"]
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    elif change == "scaling as a float":  # what diffusers' set_adapters does
        model.proj_out.scaling["default"] = 1.0
    else:
        del model.norm_out.linear.lora_A["default"]
    with pytest.raises(NotPreparedError, match=rf"LoRA layer '{stale}[.']"):
        hotswap(model, other)


def test_written_tensors_are_the_views_a_swap_writes(tmp_path) -> None:
    model, other = _model(tmp_path)
    index = prepare_for_hotswap(model, MAX_RANK)
    storages = {s.lora_A.untyped_storage().data_ptr() for s in index.slots} | {
        s.lora_B.untyped_storage().data_ptr() for s in index.slots
    }
    before = [(s.lora_A.clone(), s.lora_B.clone()) for s in index.slots]
    views = written_tensors(model, other)
    # Nothing written; rank-2 rows of lora_A and columns of lora_B, then the rows and columns
    # of the loaded rank-4 adapter the swap zeroes.
    assert all(
        torch.equal(s.lora_A, a) and torch.equal(s.lora_B, b)
        for s, (a, b) in zip(index.slots, before, strict=True)
    )
    assert {v.untyped_storage().data_ptr() for v in views} <= storages
    assert all(2 in tuple(v.shape[:2]) for v in views)
    assert len(views) == 4 * len(index.slots)
    hotswap(model, other)
    # Now the rank-2 rows are all the adapter wrote: another rank-2 swap zeroes nothing.
    assert len(written_tensors(model, other)) == 2 * len(index.slots)


def _dispatched_ops(call) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Count():
        call()
    return seen


def test_a_swap_dispatches_the_same_few_ops_whatever_the_depth(tmp_path) -> None:
    """Counted with a dispatch mode, which sees a foreach op once (on a GPU: one fused kernel
    per few dozen tensors) and would see any per-layer op once per layer."""
    from diffusers import FluxTransformer2DModel

    tiny = dict(ARCHS["flux"].build().config)
    counts = {}
    for depth in (1, 4):
        torch.manual_seed(0)
        config = {**tiny, "num_layers": depth, "num_single_layers": depth}
        model = FluxTransformer2DModel.from_config(config).eval()
        first, second = (
            make_lora(model, tmp_path / f"d{depth}_{seed}.safetensors", rank=4, seed=seed)
            for seed in (1, 2)
        )
        model.load_lora_adapter(str(first), prefix="transformer", adapter_name="default")
        prepare_for_hotswap(model, MAX_RANK)
        states = [
            read_adapter(p, lora_loader(model), "transformer").tensors for p in (first, second)
        ]
        states = [{f"transformer.{k}": v for k, v in s.items()} for s in states]
        hotswap(model, states[1])  # plans the layout
        ops = _dispatched_ops(lambda model=model, state=states[0]: hotswap(model, state))
        counts[depth] = ops
        assert len(ops) <= 12, ops
    assert counts[1] == counts[4]
    assert "aten._foreach_copy_" in counts[1] and "aten._foreach_norm" in counts[1]
