"""Measurement 2: the first call after a swap, with hotswap against a swap that recompiles.

Per backend, on the tiny Flux transformer: a model padded to ``max_rank`` and swapped with
diffusers' hotswap, and an unpadded one swapped by unload + reload (new tensors of a new rank, so
dynamo's guards fail and the frame recompiles). Each model is compiled once (its own cache
entries: ``isolate_recompiles``), then takes ``samples`` swaps, each followed by one timed call:
the hotswaps alternate two adapters, the reloads go through distinct ranks so that every one of
them recompiles (at most ``recompile_limit - 2``: a margin under the limit, past which
``fullgraph`` raises). ``compile_ms`` is the model's one first compile (n = 1).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from pytest_hotswap import pipelines
from pytest_hotswap.bench import models
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result, Stat
from pytest_hotswap.bench.timing import stat_ms, time_ms
from pytest_hotswap.watch import CompileWatcher

HOTSWAP, RECOMPILING = "hotswap", "recompiling swap"


def run(config: BenchConfig, workdir: Path) -> Result:
    samples = _samples(config)
    result = Result(
        "recompile_stall",
        f"Recompile stall: first call after a swap, tiny Flux, {samples} swaps per row "
        "(ms, median [IQR])",
    )
    for backend in config.backends:
        for label in (HOTSWAP, RECOMPILING):
            row = _measure(backend, label, samples, config, workdir)
            result.rows.append({"backend": backend, "swap": label, **row})
    torch.compiler.reset()  # the compiled models go with their entries
    return result


def _samples(config: BenchConfig) -> int:
    """Every reload must be a new rank, and the frame's entries stay within recompile_limit."""
    limit = int(torch._dynamo.config.recompile_limit)
    return max(1, min(config.samples, limit - 2))


def _measure(
    backend: str, label: str, samples: int, config: BenchConfig, workdir: Path
) -> dict[str, object]:
    model = models.build_flux(models.TINY, config)
    forward = models.forward(model, models.flux_call(models.TINY, config))
    if label == HOTSWAP:
        ranks = [8, *itertools.islice(itertools.cycle((16, 24)), samples)]
    else:
        ranks = [8 * (i + 1) for i in range(samples + 1)]  # a new rank per swap
    adapters = {
        rank: models.make_adapter(model, rank, config.seed + rank, workdir, config)
        for rank in set(ranks)
    }
    swap = models.diffusers_hotswap if label == HOTSWAP else models.reload
    models.load_adapter(model, adapters[ranks[0]], config.max_rank if label == HOTSWAP else None)
    pipelines.quantize_denoiser(model, config.quantize)
    pipelines.compile_denoiser(model, backend, config.mode)
    compile_ms = time_ms(forward, config.device)
    steady = stat_ms(forward, config.device, config.repeats)
    first_calls = []
    with CompileWatcher() as watch:
        for rank in ranks[1:]:
            swap(model, adapters[rank])
            first_calls.append(time_ms(forward, config.device))
    return {
        "compile_ms": Stat.of([compile_ms]),
        "steady_call_ms": steady,
        "first_call_ms": Stat.of(first_calls),
        "swaps": samples,
        "recompiles": watch.recompiles,
        "stall_x_steady": Stat.of(ms / steady.median for ms in first_calls),
    }
