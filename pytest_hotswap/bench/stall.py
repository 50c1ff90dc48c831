"""Measurement 2: the first call after a swap, with hotswap against a swap that recompiles.

Per backend, on the tiny Flux transformer: a model padded to ``max_rank`` swapped with PEFT's
hotswap, and an unpadded one swapped by unload + reload (new tensors of a new rank, so dynamo's
guards fail and the frame recompiles). Dynamo's caches are reset before each model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pytest_hotswap import pipelines
from pytest_hotswap.bench import models
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result
from pytest_hotswap.bench.timing import median_ms, time_ms
from pytest_hotswap.watch import CompileWatcher

SWAPS = {"hotswap": models.peft_hotswap, "recompiling swap": models.reload}


def run(config: BenchConfig, workdir: Path) -> Result:
    result = Result("recompile_stall", "Recompile stall: first call after a swap, tiny Flux (ms)")
    for backend in config.backends:
        for label, swap in SWAPS.items():
            torch.compiler.reset()
            row = _measure(backend, swap, label == "hotswap", config, workdir)
            result.rows.append({"backend": backend, "swap": label, **row})
    torch.compiler.reset()
    return result


def _measure(
    backend: str, swap: models.Swap, padded: bool, config: BenchConfig, workdir: Path
) -> dict[str, float]:
    model = models.build_flux(models.TINY, config)
    forward = models.forward(model, models.flux_call(models.TINY, config))
    first, second = (
        models.make_adapter(model, rank, config.seed + rank, workdir, config) for rank in (8, 16)
    )
    models.load_adapter(model, first, config.max_rank if padded else None)
    pipelines.quantize_denoiser(model, config.quantize)
    pipelines.compile_denoiser(model, backend, config.mode)
    compile_ms = time_ms(forward, config.device)
    steady_ms = median_ms(forward, config.device, config.repeats)
    with CompileWatcher() as watch:
        swap(model, second)
        first_call_ms = time_ms(forward, config.device)
    return {
        "compile_ms": compile_ms,
        "steady_call_ms": steady_ms,
        "first_call_ms": first_call_ms,
        "recompiles": watch.recompiles,
        "stall_x_steady": first_call_ms / steady_ms,
    }
