"""Measurement 1: swap latency of the reference, PEFT's hotswap and unload + reload, and the floor.

The floor is one ``torch._foreach_copy_`` of all padded LoRA tensors from same-shaped sources: the
bytes every swap must write, with no validation and no Python per layer. Each swap alternates
between two rank-``swap_rank`` adapters so every timed swap really changes the weights. Adapters
are state dicts already on the device (no file read is timed); the base weights stay unquantized,
since quantization does not touch the LoRA tensors a swap writes.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pytest_hotswap.bench import models
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.models import Swap
from pytest_hotswap.bench.results import Result, Target
from pytest_hotswap.bench.timing import median_ms
from pytest_hotswap.reference import hotswap, prepare_for_hotswap

#: The issue's targets, for the Flux-shaped models (the tiny one is reported, not judged).
REFERENCE_FLOOR_MAX = 3.0
PEFT_OVER_REFERENCE_MIN = 3.0


def _alternating(
    swap: Swap, model: torch.nn.Module, loras: Sequence[Mapping]
) -> Callable[[], None]:
    sources = itertools.cycle(loras)
    return lambda: swap(model, next(sources))


@torch.no_grad()
def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    torch._foreach_copy_(targets, sources)


def run(config: BenchConfig, workdir: Path) -> Result:
    result = Result(
        "swap_latency",
        f"Swap latency, LoRA padded to {config.max_rank}, swapped for rank {config.swap_rank} "
        "(median ms; x = ratio)",
    )
    for shape in models.flux_shapes(config.smoke):
        row = _measure(shape, config, workdir)
        result.rows.append(row)
        gc.collect()
        if shape is not models.TINY:
            result.targets += [
                Target(
                    f"{shape.name} reference/floor",
                    row["reference_x_floor"],
                    REFERENCE_FLOOR_MAX,
                    at_least=False,
                ),
                Target(
                    f"{shape.name} PEFT/reference",
                    row["peft_x_reference"],
                    PEFT_OVER_REFERENCE_MIN,
                    at_least=True,
                ),
            ]
    return result


def _measure(shape: models.FluxShape, config: BenchConfig, workdir: Path) -> dict[str, Any]:
    model = models.build_flux(shape, config)
    first = models.make_adapter(model, 8, config.seed, workdir, config)
    loras = [
        models.make_adapter(model, config.swap_rank, config.seed + i, workdir, config)
        for i in (1, 2)
    ]
    models.load_adapter(model, first, config.max_rank)
    targets = models.lora_parameters(model)
    sources = [t.detach().clone() for t in targets]
    repeats = config.repeats
    row: dict[str, Any] = {
        "model": shape.label,
        "lora_layers": len(targets) // 2,
        "padded_mb": sum(t.numel() * t.element_size() for t in targets) / 2**20,
        "copy_floor_ms": median_ms(lambda: _copy(targets, sources), config.device, repeats),
    }
    # On the tensors diffusers padded: both implementations then write the very same bytes.
    prepare_for_hotswap(model, max_rank=config.max_rank)
    swap = _alternating(hotswap, model, loras)
    row["reference_ms"] = median_ms(swap, config.device, repeats)
    swap = _alternating(models.peft_hotswap, model, loras)
    row["peft_ms"] = median_ms(swap, config.device, repeats)
    # Last: it leaves the model with unpadded layers, and each reload re-injects every layer.
    swap = _alternating(models.reload, model, loras)
    row["reload_ms"] = median_ms(swap, config.device, max(3, repeats // 2))

    floor = row["copy_floor_ms"]
    row["reference_x_floor"] = row["reference_ms"] / floor
    row["peft_x_reference"] = row["peft_ms"] / row["reference_ms"]
    row["peft_x_floor"] = row["peft_ms"] / floor
    row["reload_x_floor"] = row["reload_ms"] / floor
    return row
