"""``hotswap`` and ``set_lora_scale``: validate everything, then write in place.

A swap is planned against the index first: every key, shape, rank, dtype, value and scaling is
checked and every source tensor is cast to its destination's device and dtype. Only a complete
plan is committed, with batched ``torch._foreach_copy_`` / ``_foreach_zero_`` into views of the
padded weights, so no tensor object, shape, dtype or device changes and compiled code keeps
running. Only the rows the previous adapter wrote and the new one does not are zeroed: the rest of
the padding is zero already (the invariant of :class:`LoraSlot`).

What depends only on an adapter's layout (its keys and shapes) is planned once per layout and
cached on the index (:class:`Layout`): the sliced views to copy into, each layer's rank, the views
to zero after each previous layout, and the base scalings per adapter config. Every swap still
checks the model holds the index's tensors, each tensor's dtype and device, finiteness of every
value and of every scaling in its stored dtype. On a GPU a swap is a handful of kernel launches
(foreach ops over all layers) and one host sync, for the finiteness verdict.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pytest_hotswap.reference.components import (
    denoiser_prefix,
    find_denoiser,
    find_text_encoders,
    lora_loader,
    unwrap_compiled,
)
from pytest_hotswap.reference.errors import (
    HotswapError,
    InvalidAdapterError,
    RankTooLargeError,
    ShapeMismatchError,
    UnexpectedTargetsError,
)
from pytest_hotswap.reference.formats import Adapter, read_adapter
from pytest_hotswap.reference.index import AdapterIndex, Layout, LoraSlot, require

#: How many previous layouts a layout keeps its zero views for.
_ZERO_CACHE_SIZE = 8

LoraSource = str | os.PathLike[str] | Mapping[str, torch.Tensor]
_DTYPE_DEVICE = operator.attrgetter("dtype", "device")


def hotswap(
    model_or_pipeline: Any,
    lora: LoraSource,
    adapter_name: str = "default",
    *,
    slot: int = 0,
) -> None:
    """Replace the adapter in slot ``slot`` of the prepared ``adapter_name`` by ``lora``, in place,
    without recompiling.

    ``lora`` is a ``.safetensors`` path or a state dict in any format diffusers reads. It may
    target a subset of the prepared layers (the others are zeroed) at any rank <= max_rank; on a
    pipeline prepared with ``text_encoder=True`` it may carry text-encoder keys, and the swap is
    one transaction across the denoiser and every text encoder. The slot's weight set by
    :func:`set_lora_scale` is kept across swaps. On any error (a ``HotswapError`` subclass) the
    whole model or pipeline is left bit-for-bit unchanged.
    """
    _planned(model_or_pipeline, lora, adapter_name, slot).commit()


def written_tensors(
    model_or_pipeline: Any,
    lora: LoraSource,
    adapter_name: str = "default",
    *,
    slot: int = 0,
) -> list[torch.Tensor]:
    """The views of the padded LoRA weights that ``hotswap`` with the same arguments would write:
    those it copies the adapter into, then those it zeroes. Nothing is written; the adapter is
    validated as by ``hotswap`` (same errors). A copy into these views is the swap's floor."""
    plan = _planned(model_or_pipeline, lora, adapter_name, slot)
    return [*plan.layout.destinations, *plan.zeros]


def set_lora_scale(
    model_or_pipeline: Any,
    scale: float,
    adapter_name: str = "default",
    *,
    slot: int | None = None,
) -> None:
    """Set an adapter slot's weight (``slot=None``: every slot's): each of its scalings becomes
    ``alpha / r * scale``, written in place. A weight of 0 switches the slot off.

    Unlike diffusers' ``scale`` call argument this changes no Python value the compiled code was
    specialized on, so it costs no recompile. The weight stays in force for later hotswaps. A scale
    that makes any scaling non-finite in its dtype is refused before anything is written.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise HotswapError(f"scale must be a finite number, got {scale!r}")
    try:
        weight = float(scale)
    except OverflowError:
        weight = math.inf
    if not math.isfinite(weight):
        raise HotswapError(f"scale must be a finite number, got {scale!r}")
    model, encoders = _components(model_or_pipeline)
    index = require(model, adapter_name, encoders)
    chosen = range(index.n_slots) if slot is None else [_checked_slot(index, slot)]
    writes = []
    for k in chosen:
        state = index.states[k]
        values = _scaling_values(index, k, state.base_scalings, weight, scale_changed=True)
        writes.append((k, values))
    with torch.no_grad():
        for k, values in writes:
            _write_scalings(index, k, values)
            index.states[k].weight = weight


# -- planning -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Swap:
    """A validated swap of one slot: commit writes it, nothing before does."""

    index: AdapterIndex
    slot: int
    layout: Layout
    sources: list[torch.Tensor]
    zeros: list[torch.Tensor]
    base_scalings: list[float]
    values: _Values

    def commit(self) -> None:
        with torch.no_grad():
            if self.layout.destinations:
                torch._foreach_copy_(self.layout.destinations, self.sources)
            if self.zeros:
                torch._foreach_zero_(self.zeros)
            _write_scalings(self.index, self.slot, self.values)
        state = self.index.states[self.slot]
        state.layout, state.base_scalings = self.layout, self.base_scalings


def _components(
    model_or_pipeline: Any,
) -> tuple[torch.nn.Module, dict[str, torch.nn.Module] | None]:
    """The eager denoiser and, for a pipeline, its eager text encoders (``None`` for a model)."""
    model = unwrap_compiled(find_denoiser(model_or_pipeline)[1])
    if isinstance(model_or_pipeline, torch.nn.Module):
        return model, None
    encoders = find_text_encoders(model_or_pipeline)
    return model, {name: unwrap_compiled(module) for name, module in encoders.items()}


def _checked_slot(index: AdapterIndex, slot: Any) -> int:
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < index.n_slots:
        raise HotswapError(
            f"slot must be an integer from 0 to {index.n_slots - 1} (adapter "
            f"{index.adapter_name!r} was prepared with slots={index.n_slots}), got {slot!r}"
        )
    return slot


def _planned(model_or_pipeline: Any, lora: LoraSource, adapter_name: str, slot: Any) -> _Swap:
    model, encoders = _components(model_or_pipeline)
    index = require(model, adapter_name, encoders)
    k = _checked_slot(index, slot)
    adapter = read_adapter(
        lora,
        lora_loader(model_or_pipeline),
        denoiser_prefix(model_or_pipeline),
        index.text_encoders,
    )
    key = (k, adapter.keys, adapter.shapes)
    layout = index.layout(key)
    if layout is None:
        layout = _new_layout(index, k, adapter)
        index.remember(key, layout)
    sources = _sources(layout, adapter)
    signature, base = _base_scalings(index, k, layout, adapter)
    weight = index.states[k].weight
    values = layout.values.get((signature, weight))
    if values is None:
        values = _scaling_values(index, k, base, weight, scale_changed=False)
        if len(layout.values) >= _ZERO_CACHE_SIZE:
            layout.values.clear()
        layout.values[(signature, weight)] = values
    _check_finite(layout, sources)
    return _Swap(index, k, layout, sources, _zeros(index, k, layout), base, values)


def _new_layout(index: AdapterIndex, k: int, adapter: Adapter) -> Layout:
    """Validate an adapter's keys and shapes against slot ``k`` and plan its views."""
    unexpected = sorted(key for key in adapter.keys if key not in index.by_key)
    if unexpected:
        raise UnexpectedTargetsError(
            f"{len(unexpected)} keys of the new adapter have no prepared LoRA layer: "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}; hotswap only adapters that "
            f"target the layers of the first one ({len(index.slots)} layers) or a subset, or "
            "prepare with targets=[...] naming every adapter (or layer) you will swap in"
        )
    positions: dict[int, dict[str, int]] = {}
    for i, key in enumerate(adapter.keys):
        position, part = index.by_key[key]
        positions.setdefault(position, {})[part] = i

    entries = index.by_slot[k]
    shapes = adapter.shapes
    ranks = [0] * len(entries)
    by_source: list[list[tuple[torch.Tensor, slice | None]]] = [[] for _ in adapter.keys]
    for position in sorted(positions):
        entry = entries[position]
        parts = positions[position]
        if parts.keys() != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise InvalidAdapterError(
                f"{entry.qualified_name}: the adapter has no {missing}.weight for this layer; every "
                "layer needs both"
            )
        i_A, i_B = parts["A"], parts["B"]
        rank = _checked_rank(entry, shapes[i_A], shapes[i_B], index.max_rank)
        if entry.groups == 1:  # the common case: one view, no per-group blocks
            by_source[i_A].append((entry.lora_A[:rank], None))
        else:
            for padded, unpadded in entry.rank_blocks(rank):
                by_source[i_A].append((entry.lora_A[padded], unpadded))
        by_source[i_B].append((entry.lora_B[:, : rank // entry.groups], None))
        ranks[position] = rank

    layout = Layout(ranks=tuple(ranks), targeted=sorted(positions))
    simple = all(len(views) == 1 and views[0][1] is None for views in by_source)
    layout.gather = None if simple else []
    for i, views in enumerate(by_source):
        for view, block in views:
            layout.destinations.append(view)
            layout.keys.append(adapter.keys[i])
            if layout.gather is not None:
                layout.gather.append((i, block))
    dtypes = {view.dtype for view in layout.destinations}
    devices = {view.device for view in layout.destinations}
    layout.dtype = dtypes.pop() if len(dtypes) == 1 else None
    layout.device = devices.pop() if len(devices) == 1 else None
    return layout


def _checked_rank(slot: LoraSlot, shape_A: torch.Size, shape_B: torch.Size, max_rank: int) -> int:
    """The new adapter's rank for this layer, after checking every dimension of both tensors."""
    key_A, key_B = slot.key_A, slot.key_B
    if len(shape_A) != slot.lora_A.ndim or shape_A[1:] != slot.lora_A.shape[1:]:
        raise ShapeMismatchError(
            f"{key_A}: expected shape (rank, {', '.join(map(str, slot.lora_A.shape[1:]))}), "
            f"got {tuple(shape_A)}; the adapter was made for a different model"
        )
    rank = shape_A[0]
    if rank > max_rank:
        raise RankTooLargeError(
            f"{key_A}: rank {rank} is above max_rank={max_rank}; prepare the model with "
            f"max_rank >= {rank} (before compiling), or use a lower-rank adapter"
        )
    if rank == 0 or rank % slot.groups:
        raise ShapeMismatchError(
            f"{key_A}: rank {rank} must be >= 1 and divisible by the layer's groups ({slot.groups})"
        )
    expected_B = (slot.lora_B.shape[0], rank // slot.groups, *slot.lora_B.shape[2:])
    if tuple(shape_B) != expected_B:
        raise ShapeMismatchError(
            f"{key_B}: expected shape {expected_B} (rank {rank} from lora_A), got "
            f"{tuple(shape_B)}; the adapter was made for a different model or is corrupt"
        )
    return rank


def _sources(layout: Layout, adapter: Adapter) -> list[torch.Tensor]:
    """The adapter's tensors in destination order, cast to each destination's dtype and device;
    LoRA weights must be floating point."""
    values = list(adapter.tensors.values())
    kinds = adapter.kinds or set(map(_DTYPE_DEVICE, values))
    not_float = [dtype for dtype, _ in kinds if not dtype.is_floating_point]
    if not_float:
        key = next(k for k, v in adapter.tensors.items() if v.dtype in not_float)
        layer, _, part = key.rpartition(".lora_")
        raise InvalidAdapterError(
            f"{layer}.lora_{part} has dtype {not_float[0]}; LoRA weights are floating point"
        )
    if layout.gather is not None:
        values = [values[i] if block is None else values[i][block] for i, block in layout.gather]
    if kinds == {(layout.dtype, layout.device)}:
        return values
    return [
        value.to(device=destination.device, dtype=destination.dtype)
        for value, destination in zip(values, layout.destinations, strict=True)
    ]


def _check_finite(layout: Layout, sources: list[torch.Tensor]) -> None:
    """Refuse NaN, inf, or overflow in the model's dtype in any cast source, before any write.

    One fused 2-norm over all sources (the inf-norm is ~13x slower on CPU) and one host sync per
    device. A 2-norm within the dtype's largest value proves every element finite; a non-finite
    norm is NaN or inf, or a finite tensor whose squares overflow (large fp16 values), so only
    those tensors get the exact check.
    """
    if not sources:
        return
    norms = torch._foreach_norm(sources)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    if layout.device is not None and layout.dtype is not None:
        groups[(layout.device, norms[0].dtype)] = list(range(len(norms)))
    else:
        for i, norm in enumerate(norms):
            groups.setdefault((norm.device, norm.dtype), []).append(i)
    suspects: list[int] = []
    for (_, dtype), members in groups.items():
        chosen = norms if len(members) == len(norms) else [norms[i] for i in members]
        within = torch.stack(chosen) <= torch.finfo(dtype).max
        if bool(within.all()):
            continue
        suspects += [members[i] for i in (~within).nonzero().flatten().tolist()]
    for i in sorted(suspects):
        if not bool(sources[i].isfinite().all()):
            raise InvalidAdapterError(
                f"{layout.keys[i]} has non-finite values (NaN or inf, or too large for "
                f"{layout.destinations[i].dtype}); refusing to load a broken adapter"
            )


def _zeros(index: AdapterIndex, k: int, layout: Layout) -> list[torch.Tensor]:
    """Views of what the slot's current adapter wrote and ``layout`` does not overwrite."""
    previous = index.states[k].layout
    if previous is layout:
        return []
    zeros = layout.zeros.get(previous)
    if zeros is not None:
        layout.zeros.move_to_end(previous)
        return zeros
    zeros = []
    for entry, new, old in zip(index.by_slot[k], layout.ranks, previous.ranks, strict=True):
        if new < old:
            zeros += [entry.lora_A[rows] for rows in entry.stale_blocks(new, current=old)]
            zeros.append(entry.lora_B[:, new // entry.groups : old // entry.groups])
    layout.zeros[previous] = zeros
    while len(layout.zeros) > _ZERO_CACHE_SIZE:
        layout.zeros.popitem(last=False)
    return zeros


# -- scalings -----------------------------------------------------------------------------------


def _config_signature(config: Any) -> tuple[Any, ...]:
    return (
        config.r,
        config.lora_alpha,
        config.use_rslora,
        tuple(config.rank_pattern.items()),
        tuple(config.alpha_pattern.items()),
    )


def _base_scalings(
    index: AdapterIndex, k: int, layout: Layout, adapter: Adapter
) -> tuple[tuple[Any, ...], list[float]]:
    """``alpha / r`` per layer position (0 where the layout targets nothing), cached per config;
    returned with the config signature it is cached under."""
    signature = tuple(
        (component, _config_signature(config)) for component, config in adapter.configs.items()
    )
    cached = layout.scalings.get(signature)
    if cached is not None:
        return signature, cached
    entries = index.by_slot[k]
    base = [0.0] * len(entries)
    for position in layout.targeted:
        entry = entries[position]
        base[position] = _scaling(entry, layout.ranks[position], adapter.configs[entry.component])
    if len(layout.scalings) >= _ZERO_CACHE_SIZE:
        layout.scalings.clear()
    layout.scalings[signature] = base
    return signature, base


def _scaling(slot: LoraSlot, rank: int, config: Any) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) from the adapter's config, as PEFT computes it."""
    configured_rank = _pattern_value(config.rank_pattern, slot.name, config.r)
    if configured_rank != rank:
        raise InvalidAdapterError(
            f"{slot.qualified_name}: the adapter's config says rank {configured_rank} but its "
            f"tensors have rank {rank}; fix the adapter's metadata"
        )
    alpha = _pattern_value(config.alpha_pattern, slot.name, config.lora_alpha)
    scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
    if not math.isfinite(scaling):
        raise InvalidAdapterError(
            f"{slot.qualified_name}: lora_alpha {alpha!r} gives a non-finite scaling"
        )
    return scaling


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's per-layer override of ``default`` for the layer ``name`` (most patterns are empty)."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(pattern.keys(), name), default)


@dataclass(eq=False)
class _Values:
    """Checked scaling values of a slot, and per scaling group (see :func:`_scaling_groups`) the
    same values as a tensor rounded to the group's dtype, on its device: what is written."""

    values: list[float]
    rounded: list[torch.Tensor]


def _scaling_values(
    index: AdapterIndex, k: int, base: list[float], weight: float, *, scale_changed: bool
) -> _Values:
    """``base * weight`` per layer, refused when any is not finite in its scaling's dtype.

    A value is rounded as it will be written: ``torch.tensor(values)`` (float32, or float64 for
    float64 scalings), then cast to the scaling's dtype.
    """
    values = [b * weight for b in base] if weight != 1.0 else base
    rounded = []
    for _, positions, device, dtype in _scaling_groups(index, k):
        chosen = values if positions is None else [values[p] for p in positions]
        group = torch.tensor(
            chosen, dtype=torch.float64 if dtype == torch.float64 else torch.float32
        ).to(dtype)
        if dtype.is_floating_point and not bool(group.isfinite().all()):
            bad = int((~group.isfinite()).nonzero()[0])
            position = bad if positions is None else positions[bad]
            entry = index.by_slot[k][position]
            if scale_changed:
                raise HotswapError(
                    f"scale {weight!r} makes the scaling of {entry.qualified_name} "
                    f"{base[position]!r} x {weight!r} = {values[position]!r}, which is not "
                    f"finite in its dtype {dtype} (largest: {torch.finfo(dtype).max:.4g}); "
                    "use a smaller scale"
                )
            raise InvalidAdapterError(
                f"{entry.qualified_name}: the adapter's alpha / rank gives a scaling of "
                f"{base[position]!r} (x weight {weight!r}), which is not finite in the "
                f"scaling's dtype {dtype} (largest: {torch.finfo(dtype).max:.4g}); the "
                "adapter's lora_alpha is broken"
            )
        # On a GPU: transferred now, while planning, so the commit is kernels only.
        rounded.append(group if device.type == "cpu" else group.to(device))
    return _Values(values, rounded)


def _write_scalings(index: AdapterIndex, k: int, values: _Values) -> None:
    """Write checked values into slot ``k``'s 0-dim scalings, one ``_foreach_copy_`` per device
    and dtype. On the CPU, where a foreach op over 0-dim tensors costs microseconds per tensor,
    the current values are read first (one stack) and an unchanged group is not written again;
    on a GPU the write is a few kernel launches and no host sync, so it is always done."""
    for (tensors, _, device, _), rounded in zip(
        _scaling_groups(index, k), values.rounded, strict=True
    ):
        if device.type == "cpu" and torch.equal(torch.stack(tensors), rounded):
            continue
        torch._foreach_copy_(tensors, list(rounded.unbind()))


def _scaling_groups(
    index: AdapterIndex, k: int
) -> list[tuple[list[torch.Tensor], list[int] | None, torch.device, torch.dtype]]:
    """Slot ``k``'s scaling tensors per device and dtype, with their layer positions (``None``:
    one group holding every layer, in order)."""
    cache = index.scaling_groups
    groups = cache.get(k)
    if groups is None:
        by_kind: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]] = {}
        for entry in index.by_slot[k]:
            scaling = entry.scaling
            tensors, positions = by_kind.setdefault((scaling.device, scaling.dtype), ([], []))
            tensors.append(scaling)
            positions.append(entry.position)
        groups = [
            (tensors, None if len(by_kind) == 1 else positions, device, dtype)
            for (device, dtype), (tensors, positions) in by_kind.items()
        ]
        cache[k] = groups
    return groups
