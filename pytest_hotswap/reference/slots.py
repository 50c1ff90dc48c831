"""Writing a prepared adapter's slots into the model: padding, PEFT injection, tensor scalings.

The slot design: slot ``k > 0`` is one more PEFT adapter (``<adapter_name>_slot<k>``) on every
indexed layer, injected with PEFT's own ``inject_adapter_in_model`` and left active next to slot 0,
each with its own 0-dim scaling tensor (``alpha / r * weight``). PEFT's layers then compute
``base(x) + sum_k B_k A_k x * scaling_k`` in slot order, exactly what diffusers' eager
``set_adapters([a, b], adapter_weights=[wa, wb])`` computes for two loaded adapters, so equivalence
is by construction, weights are scalar writes (no recompile, weight 0 switches a slot off
exactly, and turning it back on needs no copy of its weights), and PEFT's layer types are used as
they are. The alternative, one LoRA of rank ``N * max_rank`` holding all slots, saves kernel
launches on the forward but must bake each weight into ``B`` (a weight change rewrites weights,
weight 0 loses them) and sums in another order than diffusers. The cost: each slot is a full
padded LoRA branch on the forward. Measured eager, 1 thread, padded to 128, forward time relative
to one slot for N = 2 / 4: 1.39x / 2.19x on the Flux-depth shape (19+38 blocks, hidden 128, where
one slot already costs 1.7x the LoRA-free forward), 1.05x / 1.15x on Flux widths (hidden 3072),
1.23x / 1.74x on the tiny Flux.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pytest_hotswap.reference.formats import text_encoder_spec
from pytest_hotswap.reference.index import (
    AdapterIndex,
    Layout,
    Liveness,
    LoraSlot,
    SlotState,
    rank_blocks,
)


@dataclass
class PlannedLayer:
    """One layer of the index: where it lives and what each slot will hold."""

    component: str
    name: str
    module: torch.nn.Module  # the LoraLayer, or the plain layer a union target wraps
    groups: int
    loaded: bool  # the prepared adapter already has a LoRA here
    padded: tuple[torch.Tensor, torch.Tensor] | None = None  # slot 0, when loaded
    rank: int = 0
    scaling: float = 0.0


def write_slots(
    components: Mapping[str, torch.nn.Module],
    layers_all: list[PlannedLayer],
    inject: Mapping[str, list[str]],
    base_config: Any,
    names: list[str],
    max_rank: int,
) -> AdapterIndex:
    """Write a validated plan into the model, the only step that changes it: inject the zero
    LoRAs of union targets (``inject``, per component) and of slots ``names[1:]``, activate them,
    install every layer's padded weights and tensor scalings, and index them."""
    with torch.no_grad(), _quiet_peft():
        for component, root in components.items():
            layers = [layer for layer in layers_all if layer.component == component]
            if not layers:
                continue
            with _kept_flags(root) as flags:
                flags.lora = _lora_requires_grad(layers, names[0])
                if inject.get(component):
                    _inject(root, inject[component], names[0], base_config, max_rank)
                for slot_name in names[1:]:
                    paths = [layer.name for layer in layers]
                    _inject(root, paths, slot_name, base_config, max_rank)
            modules = dict(root.named_modules())
            for layer in layers:
                layer.module = modules[layer.name]
                _activate(layer, names)
        by_slot: list[list[LoraSlot]] = [[] for _ in names]
        for position, layer in enumerate(layers_all):
            for k, slot_name in enumerate(names):
                by_slot[k].append(_install(layer, position, k, slot_name, max_rank))
    index = AdapterIndex(
        adapter_name=names[0],
        max_rank=max_rank,
        by_slot=by_slot,
        components=tuple(
            c for c in components if any(layer.component == c for layer in layers_all)
        ),
        text_encoders=tuple(
            text_encoder_spec(c, components[c])
            for c in components
            if c and any(layer.component == c for layer in layers_all)
        ),
    )
    first = Layout(ranks=tuple(layer.rank for layer in layers_all))
    empty = Layout(ranks=(0,) * len(layers_all))
    index.states = [
        SlotState(first, [layer.scaling for layer in layers_all])
        if k == 0
        else SlotState(empty, [0.0] * len(layers_all))
        for k in range(len(names))
    ]
    for k, entries in enumerate(by_slot):
        for slot in entries:
            slot.state = index.states[k]
    roots = {c: components[c] for c in index.components}
    index.liveness = Liveness(roots, [slot for entries in by_slot for slot in entries])
    return index


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def padded(
    layer: PlannedLayer, adapter_name: str, max_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    module = layer.module
    lora_A = module.lora_A[adapter_name].weight
    lora_B = module.lora_B[adapter_name].weight
    rank = lora_A.shape[0]
    groups = layer.groups
    new_A = lora_A.new_zeros((max_rank, *lora_A.shape[1:]))
    new_B = lora_B.new_zeros((lora_B.shape[0], max_rank // groups, *lora_B.shape[2:]))
    with torch.no_grad():
        for padded, unpadded in rank_blocks(max_rank, rank, groups):
            new_A[padded].copy_(lora_A[unpadded])
        new_B[:, : rank // groups].copy_(lora_B)
    layer.rank = rank
    layer.scaling = float(module.scaling[adapter_name])
    return new_A, new_B


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message="LoRA adapter added to ConvNd layer")
        yield


class _Flags:
    lora: bool = False


@contextlib.contextmanager
def _kept_flags(root: torch.nn.Module) -> Iterator[_Flags]:
    """Keep what PEFT's injection changes besides adding layers: the model's config of the
    prepared adapter, every existing parameter's ``requires_grad`` and every LoRA layer's active
    adapters. New LoRA parameters get the prepared adapter's ``requires_grad`` (``flags.lora``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    flags = _Flags()
    configs = dict(getattr(root, "peft_config", {}) or {})
    requires_grad = {id(p): p.requires_grad for p in root.parameters()}
    active = {
        id(m): list(m.active_adapters) for m in root.modules() if isinstance(m, BaseTunerLayer)
    }
    yield flags
    peft_config = getattr(root, "peft_config", None)
    if isinstance(peft_config, dict):
        peft_config.update(configs)
    for module in root.modules():
        before = active.get(id(module)) if isinstance(module, BaseTunerLayer) else None
        if before is not None and list(module.active_adapters) != before:
            module._active_adapter = before
    for param in root.parameters():
        param.requires_grad_(requires_grad.get(id(param), flags.lora))


def _lora_requires_grad(layers: list[PlannedLayer], adapter_name: str) -> bool:
    for layer in layers:
        if layer.loaded:
            return bool(layer.module.lora_A[adapter_name].weight.requires_grad)
    return False


def _inject(
    root: torch.nn.Module, paths: list[str], adapter_name: str, base: Any, max_rank: int
) -> None:
    """Add a zero-weight (meta, filled by :func:`_install`) LoRA of ``adapter_name`` at exactly
    ``paths``, with PEFT's own injection."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=max_rank,
        lora_alpha=max_rank,
        target_modules="^(?:" + "|".join(re.escape(p) for p in paths) + ")$",
        lora_dropout=getattr(base, "lora_dropout", 0.0),
        use_rslora=getattr(base, "use_rslora", False),
        inference_mode=getattr(base, "inference_mode", False),
    )
    inject_adapter_in_model(config, root, adapter_name=adapter_name, low_cpu_mem_usage=True)


def _activate(layer: PlannedLayer, names: list[str]) -> None:
    """Slot adapters become active next to slot 0 (zero weights: outputs do not change). On a
    layer that had the adapter loaded, whether slot 0 is active stays as the user left it."""
    module = layer.module
    active = list(module.active_adapters) if layer.loaded else []
    wanted = [*active, *(n for n in names[0 if not layer.loaded else 1 :] if n not in active)]
    if wanted != list(module.active_adapters):
        module._active_adapter = wanted


def _install(
    layer: PlannedLayer, position: int, k: int, adapter_name: str, max_rank: int
) -> LoraSlot:
    """Put slot ``k``'s padded weights into the layer and its scaling into a tensor."""
    module = layer.module
    module_A, module_B = module.lora_A[adapter_name], module.lora_B[adapter_name]
    requires_grad = module_A.weight.requires_grad
    if k == 0 and layer.padded is not None:
        lora_A, lora_B = layer.padded
    else:
        lora_A, lora_B = _zeros_like_layer(layer, module_A, module_B, max_rank)
    module_A.weight = torch.nn.Parameter(lora_A, requires_grad=requires_grad)
    module_B.weight = torch.nn.Parameter(lora_B, requires_grad=requires_grad)
    # Keep the modules' own description of their shape true (repr, PEFT introspection).
    if isinstance(module_A, torch.nn.Conv2d):
        module_A.out_channels = module_B.in_channels = lora_A.shape[0]
    else:
        module_A.out_features = module_B.in_features = lora_A.shape[0]
    scaling = module.scaling[adapter_name]
    if not (k == 0 and layer.loaded and isinstance(scaling, torch.Tensor)):
        value = layer.scaling if k == 0 else 0.0
        scaling = torch.tensor(value, device=lora_A.device)
        module.scaling[adapter_name] = scaling
    return LoraSlot(
        name=layer.name,
        lora_A=module_A.weight,
        lora_B=module_B.weight,
        scaling=scaling,
        groups=layer.groups,
        component=layer.component,
        slot=k,
        adapter=adapter_name,
        position=position,
    )


def _zeros_like_layer(
    layer: PlannedLayer, module_A: torch.nn.Module, module_B: torch.nn.Module, max_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero ``lora_A`` / ``lora_B`` of the shapes PEFT gave a rank-``max_rank`` adapter here, in
    the dtype of the layer's loaded LoRA (else its base weight) and on its base weight's device."""
    base_weight = base_layer(layer.module).weight
    like = layer.padded[0] if layer.padded is not None else base_weight
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    shape_A, shape_B = module_A.weight.shape, module_B.weight.shape
    assert shape_A[0] == max_rank, (layer.name, shape_A)
    return (
        torch.zeros(shape_A, dtype=dtype, device=base_weight.device),
        torch.zeros(shape_B, dtype=dtype, device=base_weight.device),
    )
