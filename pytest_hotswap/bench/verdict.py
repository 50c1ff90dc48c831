"""Measurement 8: what a failing ``no_recompile`` verdict costs (issue 22).

The call that fails a marked test, on tiny SD and tiny Flux built by the plugin's own recipe
(diffusers + PEFT, padded to ``MAX_RANK``, compiled, warmed up) under inductor (eager in a smoke
run). Each sample swaps in an adapter of a rank above the padding, a new rank per sample: PEFT
replaces the LoRA tensors (a layout change) and the next pipeline call recompiles. That call is
timed twice, in this order, inside a ``CompileWatcher`` as the marker runs it:

* ``fail at the guard`` (the default): ``fail_at_guard(0)``, so dynamo refuses the recompile at
  its guard and raises; the time runs until that error;
* ``compile on`` (``count_all=True`` / ``--hotswap-count-all``): the same call compiles the new
  graph and runs.

Inductor's FX graph and AOT autograd caches are off while it runs, so the recompile is the full
compile a first CI run pays (with them warm, ``compile on`` costs less). ``samples`` samples per
model, at most ``recompile_limit - 2`` (each new rank is a new cache entry of the same frame).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from pytest_hotswap import pipelines
from pytest_hotswap.adapters import make_lora
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result, Stat
from pytest_hotswap.bench.timing import synchronize, time_ms
from pytest_hotswap.options import HotswapOptions
from pytest_hotswap.watch import CompileWatcher, profile
from pytest_hotswap.watch.isolation import isolate_compiles

MODELS = ("sd", "flux")
MAX_RANK = 8
STOP, ON = "fail at the guard", "compile on"


def run(config: BenchConfig, workdir: Path) -> Result:
    backend = "eager" if config.smoke else "inductor"
    samples = max(1, min(config.samples, int(torch._dynamo.config.recompile_limit) - 2))
    result = Result(
        "verdict_cost",
        f"Verdict cost: the call that fails a no_recompile test (a rank past the padding, "
        f"diffusers + PEFT), {backend}, {samples} samples per row (ms, median [IQR])",
        note="fail at the guard: dynamo refuses the recompile and the test fails (default); "
        "compile on: the same call recompiles (count_all); inductor's FX graph and autograd "
        "caches off",
    )
    options = HotswapOptions(
        max_rank=MAX_RANK,
        backend=backend,
        mode=config.mode,
        device=config.device,
        dtype=config.dtype,
    ).resolved()
    undo = isolate_compiles()
    try:
        with _no_compile_caches():
            for name in MODELS:
                result.rows.extend(_measure(name, options, samples, config, workdir))
    finally:
        undo()
        torch.compiler.reset()  # the compiled pipelines go with their entries
    return result


def _measure(
    name: str, options: HotswapOptions, samples: int, config: BenchConfig, workdir: Path
) -> list[dict[str, object]]:
    first = make_lora(name, workdir / f"verdict_{name}_r4.safetensors", rank=4, seed=config.seed)
    pipeline = pipelines.build_hotswap_pipeline(
        pipelines.build_spec(name, options), "diffusers", first, options
    )
    times: dict[str, list[float]] = {STOP: [], ON: []}
    compiled = {STOP: 0, ON: 0}
    stopped = 0  # calls the watcher saw refused at the guard
    for sample in range(samples):
        rank = MAX_RANK * (sample + 2)  # above the padding, a new shape every sample
        lora = make_lora(
            name, workdir / f"verdict_{name}_r{rank}.safetensors", rank=rank, seed=config.seed
        )
        profile.reset()  # as a fresh test starts
        with CompileWatcher() as watch:
            pipeline.swap(lora)
            with watch.fail_at_guard(0):
                times[STOP].append(_until_refused(pipeline.run, config.device))
        compiled[STOP] += watch.compiles
        stopped += watch.stopped_at_guard
        with CompileWatcher() as watch:
            times[ON].append(time_ms(pipeline.run, config.device))
        compiled[ON] += watch.compiles
    if stopped != samples:
        raise RuntimeError(f"{name}: {samples - stopped} of {samples} calls were not refused")
    return [
        {
            "model": f"tiny-{name}",
            "verdict": label,
            "failing_call_ms": Stat.of(times[label]),
            "compiles": compiled[label],
            "samples": samples,
            # paired per sample: this row's call against the one refused at the guard
            "x_fail_at_guard": Stat.of(
                ms / stop for ms, stop in zip(times[label], times[STOP], strict=True)
            ),
        }
        for label in (STOP, ON)
    ]


def _until_refused(call: Callable[[], object], device: str) -> float:
    """Wall ms of ``call()`` until dynamo refuses its recompile (``RecompileError``)."""
    from torch._dynamo.exc import RecompileError

    synchronize(device)
    start = time.perf_counter()
    try:
        call()
    except RecompileError:
        return (time.perf_counter() - start) * 1000
    raise RuntimeError("the call after a rank past the padding did not recompile")


@contextlib.contextmanager
def _no_compile_caches() -> Iterator[None]:
    """Inductor's on-disk caches off: every recompile is a full compile, as on a cold CI run."""
    import torch._functorch.config
    import torch._inductor.config

    with (
        torch._inductor.config.patch(fx_graph_cache=False, fx_graph_remote_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield
