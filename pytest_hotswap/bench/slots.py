"""Measurement 6: what adapter slots cost (issue 16), with the reference.

For N = 1, 2, 4 slots (``prepare_for_hotswap(..., slots=N)``), on the tiny Flux transformer and
the flux-deep shape: the eager forward with every slot filled and weighted 1 (each slot is a
padded LoRA of ``max_rank`` computed on every call), and a swap into the last slot
(``hotswap(..., slot=N-1)``), next to the normal swap of the one-slot model. Every N is its own
model on the same base weights, so forwards and swaps are timed interleaved, ``repeats`` each;
``x_one_slot`` is a ratio per round against N = 1.
"""

from __future__ import annotations

import gc
import itertools
from pathlib import Path
from typing import Any

from pytest_hotswap.bench import models
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result
from pytest_hotswap.bench.timing import interleaved, pooled, ratio
from pytest_hotswap.reference import hotswap, prepare_for_hotswap, set_lora_scale

SLOTS = (1, 2, 4)


def run(config: BenchConfig, workdir: Path) -> Result:
    result = Result(
        "slots",
        f"Adapter slots (reference): eager forward with N slots filled, and a swap into slot N-1, "
        f"LoRA padded to {config.max_rank}, swapped for rank {config.swap_rank}, "
        f"{config.repeats} each, interleaved (ms, median [IQR]; x = ratio per round vs N=1)",
    )
    shapes = models.flux_shapes(config.smoke)
    for shape in (shapes[0], shapes[2]):  # tiny and deep: the forward's cost per LoRA layer
        result.rows += _measure(shape, config, workdir)
        gc.collect()
    return result


def _measure(shape: models.FluxShape, config: BenchConfig, workdir: Path) -> list[dict[str, Any]]:
    base = models.build_flux(shape, config)
    call = models.flux_call(shape, config)
    loras = [
        models.make_adapter(base, config.swap_rank, config.seed + i, workdir, config)
        for i in range(2)
    ]
    by_slots = {n: base if n == SLOTS[0] else models.sharing_weights(base, shape) for n in SLOTS}
    forwards, swaps = {}, {}
    for n, model in by_slots.items():
        models.load_adapter(model, loras[0], None)
        prepare_for_hotswap(model, max_rank=config.max_rank, slots=n)
        for slot in range(1, n):
            hotswap(model, loras[slot % 2], slot=slot)
        set_lora_scale(model, 1.0)  # every slot on
        forwards[n] = models.forward(model, call)
        swaps[n] = _alternating_swap(model, loras, slot=n - 1)
    forward_times = interleaved(forwards, config.device, config.repeats)
    swap_times = interleaved(swaps, config.device, config.repeats)
    return [
        {
            "model": shape.name,
            "shape": shape.label,
            "slots": n,
            "forward_ms": pooled(forward_times[n]),
            "forward_x_one_slot": ratio(forward_times[n], forward_times[SLOTS[0]]),
            "swap_into_slot": n - 1,
            "swap_ms": pooled(swap_times[n]),
            "swap_x_one_slot": ratio(swap_times[n], swap_times[SLOTS[0]]),
        }
        for n in SLOTS
    ]


def _alternating_swap(model: Any, loras: list[Any], slot: int) -> Any:
    sources = itertools.cycle(loras)
    return lambda: hotswap(model, next(sources), slot=slot)
