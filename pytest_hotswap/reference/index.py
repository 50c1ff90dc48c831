"""The hotswap index: for one prepared adapter, every LoRA layer's padded tensors, built once.

A swap looks keys up here instead of walking modules or rebuilding ``state_dict()``, which is
where PEFT's hotswap spends its time on deep models. The index also proves, on every swap, that
the model still holds those tensors (:class:`Liveness`), and caches what a swap plans per adapter
layout (:class:`Layout`).
"""

from __future__ import annotations

import operator
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pytest_hotswap.reference.errors import AdapterNotFoundError, NotPreparedError

#: How many adapter layouts (key set and shapes) an index keeps planned swaps for.
LAYOUT_CACHE_SIZE = 16


@dataclass(eq=False)
class SlotState:
    """What adapter slot ``k`` holds now: its layout's ranks and the base scaling of every layer."""

    layout: Layout
    base_scalings: list[float]
    weight: float = 1.0


@dataclass(eq=False)
class LoraSlot:
    """One adapter slot of one LoRA layer: its padded ``lora_A`` / ``lora_B`` weights and its
    0-dim scaling tensor.

    ``rank`` and ``base_scaling`` describe the adapter currently written into the slot
    (``rank == 0``: the current adapter does not target this layer, the weights are zero).
    Everything outside the rows / columns of ``rank`` is zero, so a swap zeroes only what the
    current adapter wrote and the new one does not overwrite (see :meth:`stale_blocks`).
    """

    name: str  # the module path inside its component
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: torch.Tensor
    groups: int
    component: str = ""  # "" for the denoiser, else the pipeline attribute: "text_encoder", ...
    slot: int = 0
    adapter: str = "default"  # the PEFT adapter name holding this slot's tensors
    position: int = 0  # the layer's position in the index, the same for every slot
    state: SlotState | None = field(default=None, repr=False)
    key_A: str = field(init=False)
    key_B: str = field(init=False)
    qualified_name: str = field(init=False)

    def __post_init__(self) -> None:
        self.qualified_name = f"{self.component}.{self.name}" if self.component else self.name
        self.key_A = f"{self.qualified_name}.lora_A.weight"
        self.key_B = f"{self.qualified_name}.lora_B.weight"

    @property
    def rank(self) -> int:
        assert self.state is not None
        return self.state.layout.ranks[self.position]

    @property
    def base_scaling(self) -> float:
        assert self.state is not None
        return self.state.base_scalings[self.position]

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[0]

    def rank_blocks(self, rank: int) -> list[tuple[slice, slice]]:
        return rank_blocks(self.max_rank, rank, self.groups)

    def stale_blocks(self, rank: int, current: int | None = None) -> list[slice]:
        """Slices of ``lora_A``'s rank dimension that the current adapter (of rank ``current``,
        by default the slot's) wrote and a rank-``rank`` one does not: what a swap must zero."""
        current = self.rank if current is None else current
        if rank >= current:
            return []
        per_group, old_per_group = rank // self.groups, current // self.groups
        padded_per_group = self.max_rank // self.groups
        return [
            slice(g * padded_per_group + per_group, g * padded_per_group + old_per_group)
            for g in range(self.groups)
        ]


def rank_blocks(max_rank: int, rank: int, groups: int) -> list[tuple[slice, slice]]:
    """``(padded, unpadded)`` slices of the rank dimension holding a rank-``rank`` adapter.

    With ``groups`` > 1 (grouped conv), ``lora_B`` reads the rank dimension in ``groups``
    contiguous blocks, so each block of ``lora_A`` rows is padded separately.
    """
    per_group, padded_per_group = rank // groups, max_rank // groups
    return [
        (
            slice(g * padded_per_group, g * padded_per_group + per_group),
            slice(g * per_group, (g + 1) * per_group),
        )
        for g in range(groups)
    ]


@dataclass(eq=False)
class Layout:
    """A validated swap plan for one adapter layout (its keys and shapes) into one slot.

    Everything here depends only on the keys and shapes, so it is computed once per layout and
    reused by every later swap of an adapter with the same layout: the views to copy into, the
    rank of every layer, and (per previous layout) the views to zero. Values, dtypes, devices and
    finiteness are checked on every swap.
    """

    ranks: tuple[int, ...]  # per layer position of the index; 0: the layout does not target it
    destinations: list[torch.Tensor] = field(default_factory=list)
    #: ``None``: destination ``i`` takes the adapter's ``i``-th tensor. Else, per destination, the
    #: adapter tensor's position and the block of it (grouped convs split ``lora_A`` per group).
    gather: list[tuple[int, slice | None]] | None = None
    #: Per destination, the adapter key it is written from (for messages).
    keys: list[str] = field(default_factory=list)
    #: The dtype and device of the destinations, when all share them (the common case).
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    #: Layer positions the layout targets (in index order).
    targeted: list[int] = field(default_factory=list)
    #: Zero views, per the layout that was written before (bounded, most recent last).
    zeros: OrderedDict[Layout, list[torch.Tensor]] = field(default_factory=OrderedDict)
    #: Base scalings per layer position, per adapter config signature; and the checked values
    #: (base x slot weight) per signature and weight.
    scalings: dict[Any, list[float]] = field(default_factory=dict)
    values: dict[Any, Any] = field(default_factory=dict)


class Liveness:
    """Proves with identity checks that the model still holds every tensor of the index.

    The checked edges are the union of the module paths from each component's root to every LoRA
    layer (so a replaced ancestor module is found), each slot's ``lora_A`` / ``lora_B`` module and
    weight, and each scaling tensor. Each edge is ``(container dict, key, object)``: a module's
    ``_modules`` or ``_parameters`` dict or a LoRA layer's ``scaling`` dict, held directly (nn.Module
    never rebinds the first two, PEFT never rebinds ``scaling``; items are what changes), so the
    whole check is one ``map`` over flat lists: no ``getattr``, no Python per layer.
    """

    def __init__(self, roots: Mapping[str, torch.nn.Module], slots: list[LoraSlot]) -> None:
        self._roots = {name: weakref.ref(root) for name, root in roots.items()}
        self._root_edges: dict[str, tuple[list[str], list[torch.nn.Module]]] = {}
        dicts: list[dict[str, Any]] = []
        keys: list[str] = []
        objects: list[Any] = []
        seen: set[tuple[int, str]] = set()

        def edge(container: dict[str, Any], key: str) -> Any:
            child = container[key]
            if (id(container), key) not in seen:
                seen.add((id(container), key))
                dicts.append(container)
                keys.append(key)
                objects.append(child)
            return child

        for slot in slots:
            root = roots[slot.component]
            parts = slot.name.split(".") if slot.name else []
            root_names, root_children = self._root_edges.setdefault(slot.component, ([], []))
            layer = root
            if parts:
                # The root's own edges are checked through the root passed in (held weakly).
                layer = root._modules[parts[0]]
                if parts[0] not in root_names:
                    root_names.append(parts[0])
                    root_children.append(layer)
            for part in parts[1:]:
                layer = edge(layer._modules, part)
            for part in ("lora_A", "lora_B"):
                adapted = edge(edge(layer._modules, part)._modules, slot.adapter)
                edge(adapted._parameters, "weight")
            edge(layer.scaling, slot.adapter)
        self._dicts, self._keys, self._objects = dicts, keys, objects
        self._slots = slots

    def roots(self) -> dict[str, torch.nn.Module | None]:
        return {name: ref() for name, ref in self._roots.items()}

    def is_live(self, roots: Mapping[str, torch.nn.Module | None]) -> bool:
        """True while every checked edge holds the very object it held at prepare time."""
        is_ = operator.is_
        for component, (names, children) in self._root_edges.items():
            root = roots.get(component)
            if root is None or root is not self._roots[component]():
                return False
            if not all(map(is_, map(root._modules.get, names), children)):
                return False
        return all(map(is_, map(dict.get, self._dicts, self._keys), self._objects))

    def first_stale(self, roots: Mapping[str, torch.nn.Module | None]) -> str | None:
        """The qualified name of the first layer the model no longer holds, else ``None``."""
        for slot in self._slots:
            root = roots.get(slot.component)
            if root is None or root is not self._roots[slot.component]():
                return slot.component or "<denoiser>"
            if not _slot_is_live(root, slot):
                return slot.qualified_name
        return None


def _slot_is_live(root: torch.nn.Module, slot: LoraSlot) -> bool:
    try:
        layer = root
        for part in slot.name.split(".") if slot.name else []:
            layer = layer._modules[part]
        return (
            layer._modules["lora_A"]._modules[slot.adapter]._parameters["weight"] is slot.lora_A
            and layer._modules["lora_B"]._modules[slot.adapter]._parameters["weight"] is slot.lora_B
            and layer.scaling[slot.adapter] is slot.scaling
        )
    except (AttributeError, KeyError, TypeError):
        return False


@dataclass(eq=False)
class AdapterIndex:
    """Everything a swap of ``adapter_name`` needs, for every component and adapter slot.

    ``by_slot[k]`` lists slot ``k``'s :class:`LoraSlot` per layer, in the same layer order for
    every slot; ``slots`` is slot 0's list. ``components`` are the prepared components: ``""``
    for the denoiser, then the pipeline's text encoders by attribute name.
    """

    adapter_name: str
    max_rank: int
    by_slot: list[list[LoraSlot]]
    components: tuple[str, ...] = ("",)
    text_encoders: tuple[Any, ...] = ()  # formats.TextEncoderSpec of each prepared text encoder
    liveness: Liveness | None = field(default=None, repr=False)
    states: list[SlotState] = field(default_factory=list, repr=False)
    by_key: dict[str, tuple[int, str]] = field(init=False, repr=False)
    layouts: OrderedDict[tuple[Any, ...], Layout] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    #: Per slot: its scaling tensors grouped by device and dtype (see swap._scaling_groups).
    scaling_groups: dict[int, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_key = {}
        for slot in self.by_slot[0]:
            self.by_key[slot.key_A] = (slot.position, "A")
            self.by_key[slot.key_B] = (slot.position, "B")

    @property
    def slots(self) -> list[LoraSlot]:
        """Slot 0's entry for every LoRA layer (the only slot unless prepared with ``slots=N``)."""
        return self.by_slot[0]

    @property
    def layer_names(self) -> set[str]:
        """Qualified names of the indexed layers (``text_encoder.<path>`` for a text encoder)."""
        return {slot.qualified_name for slot in self.by_slot[0]}

    @property
    def n_slots(self) -> int:
        return len(self.by_slot)

    @property
    def adapter_names(self) -> list[str]:
        """The PEFT adapter name of each slot (slot 0 is ``adapter_name``)."""
        return [entries[0].adapter if entries else self.adapter_name for entries in self.by_slot]

    @property
    def strength(self) -> float:
        """Slot 0's weight (the ``set_lora_scale`` factor)."""
        return self.states[0].weight

    @property
    def weights(self) -> list[float]:
        return [state.weight for state in self.states]

    def layout(self, key: tuple[Any, ...]) -> Layout | None:
        layout = self.layouts.get(key)
        if layout is not None:
            self.layouts.move_to_end(key)
        return layout

    def remember(self, key: tuple[Any, ...], layout: Layout) -> None:
        self.layouts[key] = layout
        while len(self.layouts) > LAYOUT_CACHE_SIZE:
            self.layouts.popitem(last=False)


# Keyed by the eager denoiser module, so the index lives exactly as long as the model. An index
# holds no strong reference to any component's root module (see Liveness), so no cycle keeps
# the key alive.
_INDEXES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, AdapterIndex]] = (
    weakref.WeakKeyDictionary()
)


def register(model: torch.nn.Module, index: AdapterIndex) -> None:
    _INDEXES.setdefault(model, {})[index.adapter_name] = index


def _roots(
    model: torch.nn.Module, index: AdapterIndex, text_encoders: Mapping[str, torch.nn.Module] | None
) -> dict[str, torch.nn.Module | None]:
    """The component roots to check: the model, and the pipeline's text encoders when given
    (a bare denoiser call checks the text encoders the index was prepared on)."""
    assert index.liveness is not None
    roots = index.liveness.roots() if text_encoders is None else dict(text_encoders)
    roots[""] = model
    return roots


def lookup(
    model: torch.nn.Module,
    adapter_name: str,
    text_encoders: Mapping[str, torch.nn.Module] | None = None,
) -> AdapterIndex | None:
    """The live index of ``adapter_name``, or ``None`` (never prepared, or gone stale)."""
    index = _INDEXES.get(model, {}).get(adapter_name)
    if index is None or stale_layer(model, index, text_encoders) is not None:
        return None
    return index


def require(
    model: torch.nn.Module,
    adapter_name: str,
    text_encoders: Mapping[str, torch.nn.Module] | None = None,
) -> AdapterIndex:
    """The live index of ``adapter_name`` (exact name), or an error saying what to call first."""
    prepared = _INDEXES.get(model, {})
    if adapter_name in prepared:
        index = prepared[adapter_name]
        stale = stale_layer(model, index, text_encoders)
        if stale is not None:
            raise NotPreparedError(
                f"adapter {adapter_name!r} changed since prepare_for_hotswap: LoRA layer {stale!r} "
                "no longer holds the prepared tensors (the adapter was unloaded, deleted or loaded "
                "again, a module or text encoder replaced, or a scaling replaced, e.g. by "
                "set_adapters), so a swap would write into tensors the model does not use; call "
                "prepare_for_hotswap again on the eager (uncompiled) model, then compile it"
            )
        return index
    if not prepared:
        raise NotPreparedError(
            f"{type(model).__name__} is not prepared for hotswapping: load the first adapter "
            "(pipe.load_lora_weights(path, adapter_name=...)), then call "
            "prepare_for_hotswap(model_or_pipeline, max_rank, adapter_name=...) before torch.compile"
        )
    raise AdapterNotFoundError(
        f"no adapter named {adapter_name!r} is prepared for hotswapping (names match exactly); "
        f"prepared: {sorted(prepared)}; pass one of them as adapter_name"
    )


def stale_layer(
    model: torch.nn.Module,
    index: AdapterIndex,
    text_encoders: Mapping[str, torch.nn.Module] | None = None,
) -> str | None:
    """The first indexed layer whose module (or an ancestor), ``lora_A`` / ``lora_B`` weight or
    scaling is not the object the model holds now, else ``None``.

    ``delete_adapters`` / ``unload_lora_weights`` followed by a new load leave the index pointing
    at detached tensors, which a swap would fill with no effect on the model.
    """
    assert index.liveness is not None
    roots = _roots(model, index, text_encoders)
    if index.liveness.is_live(roots):
        return None
    return index.liveness.first_stale(roots) or "<unknown>"
