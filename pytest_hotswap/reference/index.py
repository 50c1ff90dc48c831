"""The hotswap index: for one prepared adapter, every LoRA layer's padded tensors, built once.

A swap looks keys up here instead of walking modules or rebuilding ``state_dict()``, which is
where PEFT's hotswap spends its time on deep models.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from pytest_hotswap.reference.errors import AdapterNotFoundError, NotPreparedError


@dataclass(eq=False)
class LoraSlot:
    """One LoRA layer: its padded ``lora_A`` / ``lora_B`` weights and its 0-dim scaling tensor.

    ``rank`` and ``base_scaling`` describe the adapter currently written into the slot
    (``rank == 0``: the current adapter does not target this layer, the weights are zero).
    Everything outside the rows / columns of ``rank`` is zero, so a swap zeroes only what the
    current adapter wrote and the new one does not overwrite (see :meth:`stale_blocks`).
    """

    name: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: torch.Tensor
    groups: int
    rank: int
    base_scaling: float
    key_A: str = field(init=False)
    key_B: str = field(init=False)
    path: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.key_A, self.key_B = f"{self.name}.lora_A.weight", f"{self.name}.lora_B.weight"
        self.path = tuple(self.name.split(".")) if self.name else ()

    def is_live(self, model: torch.nn.Module, adapter_name: str) -> bool:
        """True while ``model`` holds this slot's tensors at ``name``: identity checks only.

        It walks ``_modules`` / ``_parameters`` directly: ``nn.Module.__getattr__`` would cost
        about a microsecond per hop, several times the rest of the check on a deep model.
        """
        try:
            layer = model
            for part in self.path:
                layer = layer._modules[part]
            return (
                layer._modules["lora_A"]._modules[adapter_name]._parameters["weight"] is self.lora_A
                and layer._modules["lora_B"]._modules[adapter_name]._parameters["weight"]
                is self.lora_B
                and layer.scaling[adapter_name] is self.scaling
            )
        except (AttributeError, KeyError):
            return False

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[0]

    def rank_blocks(self, rank: int) -> list[tuple[slice, slice]]:
        return rank_blocks(self.max_rank, rank, self.groups)

    def stale_blocks(self, rank: int) -> list[slice]:
        """Slices of ``lora_A``'s rank dimension that the current adapter wrote and a
        rank-``rank`` one does not: what a swap must zero (nothing when ``rank >= self.rank``)."""
        if rank >= self.rank:
            return []
        per_group, old_per_group = rank // self.groups, self.rank // self.groups
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
class AdapterIndex:
    """Everything a swap of ``adapter_name`` needs; ``strength`` is the ``set_lora_scale`` factor."""

    adapter_name: str
    max_rank: int
    slots: list[LoraSlot]
    strength: float = 1.0
    by_key: dict[str, tuple[LoraSlot, str]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_key = {}
        for slot in self.slots:
            self.by_key[slot.key_A] = (slot, "A")
            self.by_key[slot.key_B] = (slot, "B")


# Keyed by the eager denoiser module, so the index lives exactly as long as the model.
_INDEXES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, AdapterIndex]] = (
    weakref.WeakKeyDictionary()
)


def register(model: torch.nn.Module, index: AdapterIndex) -> None:
    _INDEXES.setdefault(model, {})[index.adapter_name] = index


def lookup(model: torch.nn.Module, adapter_name: str) -> AdapterIndex | None:
    """The live index of ``adapter_name``, or ``None`` (never prepared, or gone stale)."""
    index = _INDEXES.get(model, {}).get(adapter_name)
    return index if index is not None and stale_layer(model, index) is None else None


def require(model: torch.nn.Module, adapter_name: str) -> AdapterIndex:
    """The live index of ``adapter_name`` (exact name), or an error saying what to call first."""
    prepared = _INDEXES.get(model, {})
    if adapter_name in prepared:
        index = prepared[adapter_name]
        stale = stale_layer(model, index)
        if stale is not None:
            raise NotPreparedError(
                f"adapter {adapter_name!r} changed since prepare_for_hotswap: LoRA layer {stale!r} "
                "no longer holds the prepared tensors (the adapter was unloaded, deleted or loaded "
                "again, or its scaling replaced, e.g. by set_adapters), so a swap would write into "
                "tensors the model does not use; call prepare_for_hotswap again on the eager "
                "(uncompiled) model, then compile it"
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


def stale_layer(model: torch.nn.Module, index: AdapterIndex) -> str | None:
    """The first indexed layer whose module, ``lora_A`` / ``lora_B`` weight or scaling is not the
    object the model holds now, else ``None``.

    ``delete_adapters`` / ``unload_lora_weights`` followed by a new load leave the index pointing
    at detached tensors, which a swap would fill with no effect on the model.
    """
    for slot in index.slots:
        if not slot.is_live(model, index.adapter_name):
            return slot.name
    return None
