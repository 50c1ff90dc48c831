"""Measurement 4: K pipeline calls per adapter, with a swap between adapters of different ranks.

The tiny Flux pipeline, built by the plugin's own recipe (``pytest_hotswap.pipelines``), five ways:

* ``eager, reloads``: eager, unload + load per swap (the baseline);
* ``compiled, no swaps``: the diffusers-prepared compiled pipeline, never swapped;
* ``compiled, hotswap (diffusers)``: ``pipe.load_lora_weights(path, hotswap=True)`` per swap;
* ``compiled, hotswap (reference)``: ``pytest_hotswap.reference.hotswap(pipe, path)`` per swap;
* ``compiled, recompiling swaps``: compiled, unload + load per swap (each new rank recompiles).

Every swap of every row reads its adapter's ``.safetensors`` file from disk (the OS page cache
holds them), as a server swapping adapters by name does. Each row runs ``samples`` sequences,
interleaved (a sample runs every row once, in rotating order); the recompiling row builds and
compiles a new pipeline per sample (outside the timing; inductor's on-disk cache is warm after
the first), the others reuse theirs and start each sequence from the first adapter, swapped back
untimed. The seed result (Flux on an H100) is a 2.23x speed-up over eager with hotswap against
1.55x when swaps recompile; on a CPU the compiled gain is small, so read the ratio between the
hotswap and recompiling rows.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pytest_hotswap import pipelines
from pytest_hotswap.adapters import make_lora
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result, Stat
from pytest_hotswap.bench.timing import synchronize
from pytest_hotswap.options import HotswapOptions
from pytest_hotswap.watch import CompileWatcher

RANKS, SMOKE_RANKS = (8, 16, 32, 64), (8, 16)
#: Sequences per row, at most: each recompiling sample is a compile plus a recompile per swap.
MAX_SAMPLES = 3
SEED_SPEEDUP = {"hotswap": 2.23, "recompiling swaps": 1.55}
EAGER = "eager, reloads"


@dataclasses.dataclass
class Run:
    """One row: how its pipeline is built (``build`` is called per sample when ``rebuild``),
    how it swaps, and what it measured."""

    label: str
    swap_text: str
    build: Callable[[], tuple[Callable[[], object], Callable[[Path], None] | None]]
    rebuild: bool = False
    seconds: list[float] = dataclasses.field(default_factory=list)
    swap_ms: list[float] = dataclasses.field(default_factory=list)
    recompiles: int = 0
    _built: Any = None

    def pipeline(self) -> tuple[Callable[[], object], Callable[[Path], None] | None, bool]:
        """The call, the swap, and whether the pipeline was just built (first adapter loaded)."""
        fresh = self._built is None or self.rebuild
        if fresh:
            self._built = self.build()
        return (*self._built, fresh)


def _reload(spec: pipelines.PipelineSpec) -> Callable[[Path], None]:
    """A swap without hotswap: unload every LoRA, load the next one as a new adapter."""

    def swap(lora: Path) -> None:
        spec.pipe.unload_lora_weights()
        pipelines.load_first_adapter(spec, lora)

    return swap


def _unpadded(
    options: HotswapOptions, first: Path, backend: str | None
) -> tuple[Callable[[], object], Callable[[Path], None]]:
    spec = pipelines.flux_spec(options)
    pipelines.load_first_adapter(spec, first)
    pipelines.quantize_denoiser(spec.denoiser, options.quantize)
    if backend is not None:
        pipelines.compile_denoiser(spec.denoiser, backend, options.mode)
        spec.run()  # the first compile, not timed
    return spec.run, _reload(spec)


def _hotswapping(
    options: HotswapOptions, first: Path, implementation: str
) -> tuple[Callable[[], object], Callable[[Path], None]]:
    ready = pipelines.build_hotswap_pipeline(
        pipelines.flux_spec(options), implementation, first, options
    )

    def swap(lora: Path) -> None:  # the implementation's swap, without the test harness's checks
        ready.impl.swap(ready.spec, lora)

    return ready.run, swap


def _sequence(run: Run, loras: list[Path], calls: int, device: str) -> None:
    call, swap, fresh = run.pipeline()
    if swap is not None and not fresh:
        swap(loras[0])  # back to the first adapter, untimed
    with CompileWatcher() as watch:
        synchronize(device)
        start = time.perf_counter()
        for index, lora in enumerate(loras):
            if index and swap is not None:
                swap_start = time.perf_counter()
                swap(lora)
                synchronize(device)
                run.swap_ms.append((time.perf_counter() - swap_start) * 1e3)
            for _ in range(calls):
                call()
        synchronize(device)
        run.seconds.append(time.perf_counter() - start)
    run.recompiles += watch.recompiles


def run(config: BenchConfig, workdir: Path) -> Result:
    backend = config.backends[-1]
    calls = 1 if config.smoke else 4
    samples = max(1, min(config.samples, MAX_SAMPLES))
    ranks = sorted(
        {min(rank, config.max_rank) for rank in (SMOKE_RANKS if config.smoke else RANKS)}
    )
    result = Result(
        "end_to_end",
        f"End to end: tiny Flux pipeline, {len(ranks)} adapters x {calls} calls, {backend}, "
        f"{samples} sequences per row, interleaved (s, median [IQR])",
        note=f"every swap reads its .safetensors file; seed (Flux, H100): "
        f"{SEED_SPEEDUP['hotswap']}x over eager with hotswap, "
        f"{SEED_SPEEDUP['recompiling swaps']}x with recompiling swaps",
    )
    options = HotswapOptions(
        max_rank=config.max_rank,
        backend=backend,
        mode=config.mode,
        device=config.device,
        dtype=config.dtype,
        quantize=config.quantize,
    ).resolved()
    loras = [
        make_lora("flux", workdir / f"e2e_r{rank}.safetensors", rank=rank, seed=config.seed + i)
        for i, rank in enumerate(ranks)
    ]
    first = loras[0]
    reload_text = "unload_lora_weights + load_lora_weights(path)"
    diffusers = functools.cache(lambda: _hotswapping(options, first, "diffusers"))
    runs = [
        Run(EAGER, reload_text, lambda: _unpadded(options, first, None)),
        # The diffusers pipeline, never swapped: every adapter is padded to the same shapes.
        Run("compiled, no swaps", "-", lambda: (diffusers()[0], None)),
        Run("compiled, hotswap (diffusers)", "load_lora_weights(path, hotswap=True)", diffusers),
        Run(
            "compiled, hotswap (reference)",
            "reference hotswap(pipe, path)",
            lambda: _hotswapping(options, first, "reference"),
        ),
        Run(
            "compiled, recompiling swaps",
            reload_text,
            lambda: _unpadded(options, first, backend),
            rebuild=True,
        ),
    ]
    for sample in range(samples):
        shift = sample % len(runs)
        for one in runs[shift:] + runs[:shift]:
            _sequence(one, loras, calls, config.device)
    torch.compiler.reset()

    eager = runs[0].seconds
    for one in runs:
        result.rows.append(
            {
                "run": one.label,
                "swap": one.swap_text,
                "reads_file_per_swap": one.swap_text != "-",
                "seconds": Stat.of(one.seconds),
                "per_call_ms": Stat.of(s * 1e3 / (calls * len(loras)) for s in one.seconds),
                "swap_ms": Stat.of(one.swap_ms) if one.swap_ms else "-",
                "sequences": samples,
                "recompiles": one.recompiles,
                "speedup_vs_eager": Stat.of(e / s for e, s in zip(eager, one.seconds, strict=True)),
            }
        )
    return result
