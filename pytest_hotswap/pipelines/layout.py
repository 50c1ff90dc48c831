"""The layout of a pipeline's LoRA tensors, and what a swap changed in it.

A hotswap writes into the LoRA tensors the compiled code was traced with. A swap that replaces,
re-shapes or moves one of them guards the compiled code out (or reads freed memory), so
:class:`~pytest_hotswap.pipelines.ready.HotswapPipeline` takes the layout before and after each
swap, and a difference is a ``layout change`` event for an active ``CompileWatcher``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from pytest_hotswap.reference.components import unwrap_compiled
from pytest_hotswap.watch import KIND_LAYOUT_CHANGE, CompileEvent, CompileWatcher

#: (object id, shape, dtype, device, storage pointer) of one LoRA tensor.
TensorLayout = tuple[int, tuple[int, ...], torch.dtype, torch.device, int]


def lora_layout(
    modules: Iterable[torch.nn.Module], owners: Mapping[int, str] | None = None
) -> dict[str, TensorLayout]:
    """Every LoRA tensor of ``modules`` (compiled or not): object, shape, dtype, device, storage.
    ``owners`` names modules by ``id``: their tensors are named ``<owner>.<parameter>``."""
    owners = owners or {}
    layout: dict[str, TensorLayout] = {}
    for module in modules:
        prefix = f"{owners[id(module)]}." if id(module) in owners else ""
        module = unwrap_compiled(module)
        for name, tensor in module.named_parameters():
            if ".lora_" in name:
                layout[prefix + name] = (
                    id(tensor),
                    tuple(tensor.shape),
                    tensor.dtype,
                    tensor.device,
                    tensor.untyped_storage().data_ptr(),
                )
    return layout


def record_layout_change(
    before: dict[str, TensorLayout], now: dict[str, TensorLayout], frame: str, label: str
) -> None:
    """A ``layout change`` event of ``frame`` at step ``label`` for the active watcher, when the
    layout changed from ``before`` to ``now``."""
    if now == before:
        return
    reasons = layout_differences(before, now)
    watcher = CompileWatcher.current()
    if watcher is not None:
        watcher.record(
            CompileEvent(
                compile_id="-",
                frame=frame,
                filename="",
                lineno=0,
                kind=KIND_LAYOUT_CHANGE,
                reasons=tuple(reasons),
                step=label,
                seconds=0.0,
            )
        )


def layout_differences(
    before: dict[str, TensorLayout], now: dict[str, TensorLayout], limit: int = 5
) -> list[str]:
    """What changed, one line per LoRA tensor, at most ``limit`` lines and a count of the rest."""
    changes = []
    for name in sorted(before.keys() | now.keys()):
        old, new = before.get(name), now.get(name)
        if old == new:
            continue
        if old is None or new is None:
            changes.append(f"{name}: {'added' if old is None else 'removed'}")
            continue
        what = [
            f"{label} {_show(a)} -> {_show(b)}"
            for label, a, b in zip(("shape", "dtype", "device"), old[1:4], new[1:4], strict=True)
            if a != b
        ]
        if not what:
            what = ["replaced by another tensor" if old[0] != new[0] else "moved to other storage"]
        changes.append(f"{name}: {', '.join(what)}")
    if len(changes) > limit:
        changes = [*changes[:limit], f"... and {len(changes) - limit} more LoRA tensors"]
    return changes


def _show(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, tuple) else str(value)
