"""``prepare_for_hotswap``: pad a loaded LoRA to ``max_rank`` and index it, before compiling."""

from __future__ import annotations

from typing import Any

import torch

from pytest_hotswap.reference.components import find_denoiser, is_compiled
from pytest_hotswap.reference.errors import (
    AdapterNotFoundError,
    AlreadyCompiledError,
    HotswapError,
    NotPreparedError,
    RankTooLargeError,
)
from pytest_hotswap.reference.index import AdapterIndex, LoraSlot, lookup, rank_blocks, register


def prepare_for_hotswap(
    model_or_pipeline: Any, max_rank: int = 128, adapter_name: str = "default"
) -> AdapterIndex:
    """Make the loaded adapter ``adapter_name`` hotswappable without recompiling; call before compile.

    Every Linear / Conv2d (grouped too) LoRA layer of the denoiser gets ``lora_A`` / ``lora_B``
    zero-padded to ``max_rank`` and its scaling turned into a 0-dim tensor on the weight's device;
    outputs are unchanged. Calling it again with the same ``max_rank`` is a no-op, unless the
    adapter was unloaded, deleted or re-loaded since: then the one loaded now is prepared. Text-encoder
    LoRA layers of a pipeline are left as they are: only the denoiser is hotswapped.
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise HotswapError(f"max_rank must be an integer >= 1, got {max_rank!r}")
    _, stored = find_denoiser(model_or_pipeline)
    if is_compiled(stored):
        raise AlreadyCompiledError(
            "the model is already compiled: padding now would change tensor shapes under the "
            "compiled code; call prepare_for_hotswap before torch.compile"
        )
    model = stored
    existing = lookup(model, adapter_name)
    if existing is not None:
        if existing.max_rank == max_rank:
            return existing
        raise HotswapError(
            f"adapter {adapter_name!r} is already prepared with max_rank={existing.max_rank}; "
            f"re-load the model to prepare it for max_rank={max_rank}"
        )

    layers = _lora_layers(model, adapter_name)
    padded = [_padded(name, layer, adapter_name, max_rank) for name, layer in layers]
    # Everything is validated and built: only now touch the model.
    slots = []
    for (name, layer), (lora_A, lora_B) in zip(layers, padded, strict=True):
        slots.append(_install(name, layer, adapter_name, lora_A, lora_B))
    index = AdapterIndex(adapter_name=adapter_name, max_rank=max_rank, slots=slots)
    register(model, index)
    return index


def _lora_layers(model: torch.nn.Module, adapter_name: str) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    all_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not all_layers:
        raise NotPreparedError(
            f"{type(model).__name__} has no LoRA loaded: load the first adapter with "
            "pipe.load_lora_weights(path, adapter_name=...) before prepare_for_hotswap"
        )
    layers = [(n, m) for n, m in all_layers if adapter_name in m.lora_A]
    if not layers:
        loaded = sorted({name for _, m in all_layers for name in m.lora_A})
        raise AdapterNotFoundError(
            f"no adapter named {adapter_name!r} is loaded (names match exactly); loaded: {loaded}; "
            "pass one of them as adapter_name"
        )
    for name, layer in layers:
        problem = _unsupported(layer, adapter_name)
        if problem:
            raise HotswapError(f"cannot prepare LoRA layer {name!r}: {problem}")
    return layers


def _unsupported(layer: Any, adapter_name: str) -> str | None:
    base = layer.get_base_layer()
    if not isinstance(layer.lora_A[adapter_name], (torch.nn.Linear, torch.nn.Conv2d)):
        return f"{type(base).__name__} LoRA layers are not supported (Linear and Conv2d only)"
    if layer.use_dora.get(adapter_name):
        return "DoRA adapters are not supported; load a plain LoRA"
    if layer.lora_bias.get(adapter_name):
        return "LoRA with lora_bias=True is not supported; load one without a LoRA bias"
    if adapter_name in layer.merged_adapters:
        return "the adapter is fused into the base weights; call unfuse_lora() first"
    return None


def _padded(
    name: str, layer: Any, adapter_name: str, max_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    lora_A = layer.lora_A[adapter_name].weight
    lora_B = layer.lora_B[adapter_name].weight
    groups = _groups(layer)
    rank = lora_A.shape[0]
    if rank > max_rank:
        raise RankTooLargeError(
            f"{name}: the loaded adapter has rank {rank}, above max_rank={max_rank}; "
            f"prepare with max_rank >= {rank}"
        )
    if max_rank % groups:
        raise HotswapError(
            f"{name}: a grouped Conv2d (groups={groups}) needs max_rank divisible by {groups}; "
            f"got {max_rank}"
        )
    new_A = lora_A.new_zeros((max_rank, *lora_A.shape[1:]))
    new_B = lora_B.new_zeros((lora_B.shape[0], max_rank // groups, *lora_B.shape[2:]))
    with torch.no_grad():
        for padded, unpadded in rank_blocks(max_rank, rank, groups):
            new_A[padded].copy_(lora_A[unpadded])
        new_B[:, : rank // groups].copy_(lora_B)
    return new_A, new_B


def _groups(layer: Any) -> int:
    base = layer.get_base_layer()
    return base.groups if isinstance(base, torch.nn.Conv2d) else 1


def _install(
    name: str, layer: Any, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> LoraSlot:
    """Put the padded weights into the layer and its scaling into a tensor; return its slot."""
    module_A, module_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    rank = module_A.weight.shape[0]
    requires_grad = module_A.weight.requires_grad
    module_A.weight = torch.nn.Parameter(lora_A, requires_grad=requires_grad)
    module_B.weight = torch.nn.Parameter(lora_B, requires_grad=requires_grad)
    # Keep the modules' own description of their shape true (repr, PEFT introspection).
    if isinstance(module_A, torch.nn.Conv2d):
        module_A.out_channels = module_B.in_channels = lora_A.shape[0]
    else:
        module_A.out_features = module_B.in_features = lora_A.shape[0]
    scaling = layer.scaling[adapter_name]
    value = float(scaling)
    if not isinstance(scaling, torch.Tensor):
        scaling = torch.tensor(value, device=lora_A.device)
        layer.scaling[adapter_name] = scaling
    return LoraSlot(
        name=name,
        lora_A=module_A.weight,
        lora_B=module_B.weight,
        scaling=scaling,
        groups=_groups(layer),
        rank=rank,
        base_scaling=value,
    )
