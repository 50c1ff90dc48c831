"""Measurement 4: K pipeline calls interleaved with swaps through adapters of different ranks.

The tiny Flux pipeline, built by the plugin's own recipe (``pytest_hotswap.pipelines``), four ways:
eager with plain reloads (the baseline), compiled without swaps, compiled with hotswaps, and compiled
with reloads that recompile. The seed result (Flux on an H100) is a 2.23x speed-up over eager with
hotswap against 1.55x when swaps recompile; on a CPU the compiled gain is small, so read the ratio
between the hotswap and recompiling rows. The compile of the first adapter is outside the timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from pytest_hotswap import pipelines
from pytest_hotswap.adapters import make_lora
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result
from pytest_hotswap.bench.timing import synchronize
from pytest_hotswap.options import HotswapOptions
from pytest_hotswap.watch import CompileWatcher

RANKS = (8, 16, 32, 64)
SEED_SPEEDUP = {"hotswap": 2.23, "recompiling swaps": 1.55}


def _reload(spec: pipelines.PipelineSpec) -> Callable[[Path], None]:
    """A swap without hotswap: unload every LoRA, load the next one as a new adapter."""

    def swap(lora: Path) -> None:
        spec.pipe.unload_lora_weights()
        pipelines.load_first_adapter(spec, lora)

    return swap


def _sequence(
    run: Callable[[], object],
    swap: Callable[[Path], None] | None,
    loras: list[Path],
    calls: int,
    device: str,
) -> tuple[float, int]:
    """Seconds for ``calls`` runs per adapter with a swap between adapters, and the recompiles."""
    with CompileWatcher() as watch:
        start = time.perf_counter()
        for index, lora in enumerate(loras):
            if index and swap is not None:
                swap(lora)
            for _ in range(calls):
                run()
        synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, watch.recompiles


def _unpadded(
    options: HotswapOptions, first: Path, *, compile_backend: str | None
) -> pipelines.PipelineSpec:
    spec = pipelines.flux_spec(options)
    pipelines.load_first_adapter(spec, first)
    pipelines.quantize_denoiser(spec.denoiser, options.quantize)
    if compile_backend is not None:
        pipelines.compile_denoiser(spec.denoiser, compile_backend, options.mode)
        spec.run()  # the first compile, not timed
    return spec


def run(config: BenchConfig, workdir: Path) -> Result:
    backend = config.backends[-1]
    calls = 1 if config.smoke else 4
    result = Result(
        "end_to_end",
        f"End to end: tiny Flux pipeline, {len(RANKS)} adapters x {calls} calls, {backend} (s)",
        note=f"seed (Flux, H100): {SEED_SPEEDUP['hotswap']}x over eager with hotswap, "
        f"{SEED_SPEEDUP['recompiling swaps']}x with recompiling swaps",
    )
    options = HotswapOptions(
        max_rank=config.max_rank,
        backend=backend,
        mode=config.mode,
        device=config.device,
        dtype=config.dtype,
        quantize=config.quantize,
    )
    ranks = sorted({min(rank, config.max_rank) for rank in RANKS})
    loras = [
        make_lora("flux", workdir / f"e2e_r{rank}.safetensors", rank=rank, seed=config.seed + i)
        for i, rank in enumerate(ranks)
    ]
    timings: dict[str, tuple[float, int]] = {}

    torch.compiler.reset()
    eager = _unpadded(options, loras[0], compile_backend=None)
    timings["eager, reloads"] = _sequence(eager.run, _reload(eager), loras, calls, config.device)

    torch.compiler.reset()
    ready = pipelines.build_hotswap_pipeline(
        pipelines.flux_spec(options), "diffusers", loras[0], options
    )
    timings["compiled, no swaps"] = _sequence(ready.run, None, loras, calls, config.device)
    timings["compiled, hotswap"] = _sequence(ready.run, ready.swap, loras, calls, config.device)

    torch.compiler.reset()
    recompiling = _unpadded(options, loras[0], compile_backend=backend)
    timings["compiled, recompiling swaps"] = _sequence(
        recompiling.run, _reload(recompiling), loras, calls, config.device
    )
    torch.compiler.reset()

    baseline = timings["eager, reloads"][0]
    for label, (seconds, recompiles) in timings.items():
        result.rows.append(
            {
                "run": label,
                "seconds": seconds,
                "per_call_ms": seconds * 1e3 / (calls * len(loras)),
                "recompiles": recompiles,
                "speedup_vs_eager": baseline / seconds,
            }
        )
    return result
