"""Measurement 1: swap latency of the reference, PEFT and diffusers, against two copy floors.

* padded floor: one ``torch._foreach_copy_`` of every padded LoRA tensor (``max_rank`` rows of
  ``lora_A``, columns of ``lora_B``) from same-shaped sources: what a swap that rewrites whole
  tensors must at least cost;
* written floor: one ``torch._foreach_copy_`` into exactly the views the reference writes for the
  new adapter (``pytest_hotswap.reference.swap.written_tensors``: the rank rows of ``lora_A``,
  columns of ``lora_B``, and what it zeroes, here nothing: the swaps alternate two adapters of the
  same rank), so the reference can beat the padded floor on wide layers;
* reference: ``pytest_hotswap.reference.hotswap`` from a diffusers state dict;
* PEFT function: ``peft.utils.hotswap.hotswap_adapter_from_state_dict`` alone, with the keys
  already converted to PEFT's (the conversion is not timed: this is PEFT at its cheapest);
* diffusers: ``load_lora_adapter(..., hotswap=True)`` (its key conversion, two ``state_dict()``
  calls, then PEFT's function): what ``pipe.load_lora_weights(..., hotswap=True)`` runs;
* unload + load: a swap without hotswap (new tensors, so a compiled model recompiles).

All but the last are timed interleaved on one model (none changes a tensor's shape or object),
``repeats`` swaps each; ratios are per round. Adapters are state dicts already on the device (no
file is read); the base weights stay unquantized, since quantization does not touch what a swap
writes. Goals: ``pytest_hotswap.bench.goals``.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pytest_hotswap.bench import goals, models
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result, Stat
from pytest_hotswap.bench.timing import interleaved, pooled, ratio, samples_ms
from pytest_hotswap.reference import hotswap, prepare_for_hotswap
from pytest_hotswap.reference.swap import written_tensors

#: Column -> what the table calls it, in the order they are timed (and plotted).
CANDIDATES = {
    "padded_floor": "copy of all padded LoRA tensors",
    "written_floor": "copy of the views the reference writes",
    "reference": "pytest_hotswap.reference.hotswap",
    "peft_fn": "peft.utils.hotswap.hotswap_adapter_from_state_dict",
    "diffusers": "diffusers load_lora_adapter(hotswap=True)",
}


def _alternating(swap: Callable[[Any], None], adapters: Sequence[Any]) -> Callable[[], None]:
    sources = itertools.cycle(adapters)
    return lambda: swap(next(sources))


@torch.no_grad()
def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    torch._foreach_copy_(targets, sources)


def _mib(tensors: Sequence[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def run(config: BenchConfig, workdir: Path) -> Result:
    rounds = "interleaved" if config.repeats > 1 else "one each"
    result = Result(
        "swap_latency",
        f"Swap latency, LoRA padded to {config.max_rank}, swapped for rank {config.swap_rank}: "
        f"ms per swap, {config.repeats} swaps each ({rounds}), {config.samples} reloads; "
        "median [IQR]; x = ratio per round",
        note="written floor: the rank rows/columns the reference writes (the swaps alternate two "
        "adapters of one rank: nothing to zero); peft_fn: PEFT's function alone (keys converted "
        "untimed); diffusers: load_lora_adapter(hotswap=True); no swap reads a file",
    )
    for shape in models.flux_shapes(config.smoke):
        result.rows.append(_measure(shape, config, workdir))
        gc.collect()
    result.targets = goals.evaluate(result)
    return result


def _measure(shape: models.FluxShape, config: BenchConfig, workdir: Path) -> dict[str, Any]:
    model = models.build_flux(shape, config)
    first = models.make_adapter(model, 8, config.seed, workdir, config)
    loras = [
        models.make_adapter(model, config.swap_rank, config.seed + i, workdir, config)
        for i in (1, 2)
    ]
    peft_loras = [models.peft_adapter(lora) for lora in loras]
    models.load_adapter(model, first, config.max_rank)  # diffusers pads the first adapter
    padded = models.lora_parameters(model)
    padded_sources = [t.detach().clone() for t in padded]
    # On the tensors diffusers padded: every candidate writes into the very same tensors.
    prepare_for_hotswap(model, max_rank=config.max_rank)
    hotswap(model, loras[0])
    written = written_tensors(model, loras[1])
    written_sources = [view.clone() for view in written]

    timings = interleaved(
        {
            "padded_floor": lambda: _copy(padded, padded_sources),
            "written_floor": lambda: _copy(written, written_sources),
            "reference": _alternating(lambda lora: hotswap(model, lora), loras),
            "peft_fn": _alternating(
                lambda adapter: models.peft_function_hotswap(model, adapter), peft_loras
            ),
            "diffusers": _alternating(lambda lora: models.diffusers_hotswap(model, lora), loras),
        },
        config.device,
        config.repeats,
    )
    row: dict[str, Any] = {
        "model": shape.name,
        "shape": shape.label,
        "lora_layers": len(padded) // 2,
        "padded_mib": _mib(padded),
        "written_mib": _mib(written),
    }
    for name in CANDIDATES:
        row[f"{name}_ms"] = pooled(timings[name])
    # Last: it leaves the model with unpadded layers, and each reload re-injects every layer.
    reload = _alternating(lambda lora: models.reload(model, lora), loras)
    row["reload_ms"] = Stat.of(samples_ms(reload, config.device, config.samples))

    reference = timings["reference"]
    row["reference_x_padded_floor"] = ratio(reference, timings["padded_floor"])
    row["reference_x_written_floor"] = ratio(reference, timings["written_floor"])
    row["peft_fn_x_reference"] = ratio(timings["peft_fn"], reference)
    row["diffusers_x_reference"] = ratio(timings["diffusers"], reference)
    return row
