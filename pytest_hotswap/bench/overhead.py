"""Measurement 5: what pytest-hotswap's watching costs, one row per mechanism the marker uses.

On the tiny Flux transformer compiled with the ``eager`` backend (the watching cost does not
depend on the backend), in this process:

* a compiled call inside a ``CompileWatcher`` against the same call outside one (per call);
* ``CompileWatcher.step`` (per step: it reads dynamo's cache lists, ``watch.caches.snapshot``),
  with a compiled call between steps as in a test that swaps; again with ``EXTRA_FRAMES`` more
  compiled frames in the process, since every step reads every frame's list;
* a watcher scope's enter + exit (per test);
* a call of a model compiled with ``isolate_recompiles=True`` against one compiled without
  (per call);
* ``no_recompile(fresh=True)``: ``torch.compiler.reset()`` and the first call that recompiles
  the model, against a warm call (per test);

on the flux-deep shape (Flux's 19 + 38 blocks, every attention and MLP linear adapted: a real Flux
LoRA's count of LoRA tensors; the smoke run takes the tiny Flux), prepared by the reference, compiled as the fixtures compile
(``eager``) and wrapped in a ``HotswapPipeline``:

* ``HotswapPipeline.swap`` (the layout check the fixtures make around every swap:
  ``lora_layout()`` before, the comparison after) against the implementation's swap alone,
  interleaved (per swap);
* the cached-pipeline hand-out of the fixtures (``reusable``: layout unchanged, compiled
  entries as built, first adapter at full strength) on a pipeline as built, so no swap back
  is needed (per test; a test that swapped adds one swap back);

and in a pytest subprocess, whole tests (setup, call, teardown, timed with ``perf_counter`` by a
conftest around each test's protocol): a ``no_recompile`` test and a ``no_recompile(fresh=True)``
test against the same unmarked test, each making ``CALLS_PER_TEST`` calls; the three kinds
alternate in rotating order. Per-call rows time blocks of calls in alternating rounds and take the
overhead per round; the spread is over rounds.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pytest_hotswap import implementations, pipelines
from pytest_hotswap.bench import goals, models
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result, Stat
from pytest_hotswap.bench.timing import difference, interleaved, pooled, split, time_ms
from pytest_hotswap.options import HotswapOptions
from pytest_hotswap.reference import prepare_for_hotswap
from pytest_hotswap.watch import CompileWatcher, isolation, profile
from pytest_hotswap.watch.caches import snapshot

CALLS_PER_TEST = 20
#: Frames compiled besides the model for the second ``step`` row (a suite's worth of them).
EXTRA_FRAMES, SMOKE_EXTRA_FRAMES = 50, 5
#: Rounds of the per-call comparisons: a per-call difference is small next to a burst of load,
#: so many short rounds (2 x repeats calls in all) rather than a few long ones.
PER_CALL_ROUNDS = 20
#: Variants of the subprocess test: marker (None: unmarked).
TEST_VARIANTS = {
    "plain": None,
    "no_recompile": "pytest.mark.no_recompile",
    "fresh": "pytest.mark.no_recompile(fresh=True)",
}

_CONFTEST = """
import json
import time

import pytest

TIMES = {{}}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        TIMES[item.nodeid] = (time.perf_counter() - start) * 1e3


def pytest_sessionfinish(session):
    with open({times!r}, "w") as f:
        json.dump(TIMES, f)
"""

_TEST_FILE = """
import pytest
import torch

from pytest_hotswap.pipelines import build_tiny_flux_transformer, flux_inputs

DEVICE, DTYPE = {device!r}, {dtype!r}
CASES = {cases!r}
MARKS = {{"plain": (), "no_recompile": (pytest.mark.no_recompile,),
         "fresh": (pytest.mark.no_recompile(fresh=True),)}}


@pytest.fixture(scope="module")
def compiled():
    model = build_tiny_flux_transformer(device=DEVICE, dtype=DTYPE)
    model.compile(backend="eager")
    inputs = flux_inputs(device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        model(**inputs)
    return model, inputs


def test_warm_up(compiled):
    _calls(compiled)


@pytest.mark.parametrize(
    "variant", [pytest.param(v, marks=MARKS[v], id=f"{{i}}-{{v}}") for i, v in CASES]
)
def test_case(compiled, variant):
    _calls(compiled)


def _calls(compiled):
    model, inputs = compiled
    with torch.no_grad():
        for _ in range({calls}):
            model(**inputs)
"""


def run(config: BenchConfig, workdir: Path) -> Result:
    result = Result(
        "plugin_overhead",
        "Plugin overhead: without vs with each mechanism (ms, median [IQR]; overhead per round)",
        note=f"tiny Flux transformer, eager backend; pytest tests make {CALLS_PER_TEST} calls",
    )
    result.rows = [
        *_in_process(config),
        *_pipeline_checks(config, workdir),
        *_pytest_tests(config, workdir),
    ]
    result.targets = goals.evaluate(result)
    return result


def _row(
    case: str, unit: str, without: Stat | str, with_: Stat, overhead: Stat, detail: str = ""
) -> dict[str, Any]:
    return {
        "case": case,
        "unit": unit,
        "without_ms": without,
        "with_ms": with_,
        "overhead_ms": overhead,
        "detail": detail,
    }


def _compiled_tiny(config: BenchConfig, *, isolate: bool) -> Callable[[], None]:
    model = models.build_flux(models.TINY, config)
    call = models.flux_call(models.TINY, config)
    if isolate:
        pipelines.compile_denoiser(model, "eager")  # what the fixtures do: isolate_recompiles
    else:  # a torch without isolate_recompiles (< 2.13) compiles both alike: the row reads ~0
        shared = {"isolate_recompiles": False} if isolation.supported() else {}
        model.compile(backend="eager", fullgraph=True, **shared)
    forward = models.forward(model, call)
    forward()  # the first compile
    return forward


def _watched_blocks(
    forward: Callable[[], None], config: BenchConfig
) -> tuple[list[list[float]], list[list[float]]]:
    """Per round, calls timed one by one outside a watcher, then inside one (order alternates)."""
    rounds, per_round = split(max(config.repeats * 2, 10), max_rounds=PER_CALL_ROUNDS)

    def block(watched: bool) -> list[float]:
        scope = CompileWatcher() if watched else contextlib.nullcontext()
        with scope:
            return [time_ms(forward, config.device) for _ in range(per_round)]

    plain: list[list[float]] = []
    watched: list[list[float]] = []
    block(True)  # warm-up
    for r in range(rounds):
        for is_watched in (r % 2 == 0, r % 2 != 0):
            (watched if is_watched else plain).append(block(is_watched))
    return plain, watched


def _steps(case: str, forward: Callable[[], None], config: BenchConfig) -> dict[str, Any]:
    """``CompileWatcher.step`` inside a watcher, a compiled call between steps (as a swap)."""
    rounds, per_round = split(config.repeats)
    steps: list[list[float]] = []
    with CompileWatcher() as watcher:
        for r in range(rounds):
            one_round = []
            for i in range(per_round):
                forward()
                label = f"step {r}.{i}"
                one_round.append(time_ms(functools.partial(watcher.step, label), "cpu"))
            steps.append(one_round)
    frames = len(snapshot())
    detail = f"reads the cache lists of {frames} compiled frames"
    return _row(case, "per step", "-", pooled(steps), pooled(steps), detail)


def _compiled_frames(count: int) -> list[Callable[..., Any]]:
    """``count`` small functions, each its own code object, compiled and called once: the frames
    a suite that compiles many things leaves in dynamo's caches for every step to read."""
    compiled = []
    for i in range(count):
        namespace: dict[str, Any] = {}
        exec(f"def frame_{i}(x):\n    return x * {i} + 1\n", namespace)
        fn = torch.compile(namespace[f"frame_{i}"], backend="eager", fullgraph=True)
        fn(torch.ones(2))
        compiled.append(fn)
    return compiled


def _in_process(config: BenchConfig) -> list[dict[str, Any]]:
    torch.compiler.reset()
    isolated = _compiled_tiny(config, isolate=True)
    shared = _compiled_tiny(config, isolate=False)
    rows = []

    plain, watched = _watched_blocks(isolated, config)
    rows.append(
        _row(
            "compiled call in a watcher",
            "per call",
            pooled(plain),
            pooled(watched),
            difference(watched, plain),
        )
    )

    rows.append(_steps("CompileWatcher.step", isolated, config))
    more = _compiled_frames(SMOKE_EXTRA_FRAMES if config.smoke else EXTRA_FRAMES)
    rows.append(_steps(f"CompileWatcher.step, {len(more)} more frames", isolated, config))

    def enter_exit() -> None:
        with CompileWatcher():
            pass

    scopes = interleaved({"scope": enter_exit}, "cpu", config.repeats)["scope"]
    rows.append(_row("watcher scope enter + exit", "per test", "-", pooled(scopes), pooled(scopes)))

    calls = interleaved(
        {"shared": shared, "isolated": isolated},
        config.device,
        max(config.repeats * 2, 10),
        max_rounds=PER_CALL_ROUNDS,
    )
    rows.append(
        _row(
            "compiled call, isolate_recompiles=True",
            "per call",
            pooled(calls["shared"]),
            pooled(calls["isolated"]),
            difference(calls["isolated"], calls["shared"]),
            "against isolate_recompiles=False"
            if isolation.supported()
            else f"torch {torch.__version__} has no isolate_recompiles: both compiled alike",
        )
    )

    warm = [time_ms(isolated, config.device) for _ in range(config.repeats)]
    fresh = []
    for _ in range(max(1, min(config.samples, 5))):
        fresh.append(time_ms(lambda: (torch.compiler.reset(), isolated()), config.device))
    rows.append(
        _row(
            "no_recompile(fresh=True): reset + recompile",
            "per test",
            Stat.of(warm),
            Stat.of(fresh),
            Stat.of(f - Stat.of(warm).median for f in fresh),
            "torch.compiler.reset() and the first call, against a warm call",
        )
    )

    records = profile.snapshot()  # dynamo's automatic-dynamic record after the compiles above
    resets = interleaved(
        {"none": lambda: None, "reset": lambda: (profile.reset(), profile.restore(records))},
        config.device,
        max(config.repeats * 2, 10),
        max_rounds=PER_CALL_ROUNDS,
    )
    rows.append(
        _row(
            "fresh automatic-dynamic record (watch.profile)",
            "per test",
            pooled(resets["none"]),
            pooled(resets["reset"]),
            difference(resets["reset"], resets["none"]),
            f"emptied, then a cached pipeline's record put back ({len(records)} code objects)",
        )
    )
    torch.compiler.reset()
    return rows


def _deep_pipeline(config: BenchConfig, workdir: Path) -> tuple[Any, list[Any]]:
    """flux-deep (smoke: tiny Flux) with a first adapter, prepared by the reference, compiled with the ``eager``
    backend as the fixtures compile, warmed up, in a ``HotswapPipeline``; and two adapters of
    ``swap_rank`` to swap (the first is the pipeline's first adapter)."""
    from pytest_hotswap.pipelines import HotswapPipeline, PipelineSpec

    # The smoke run takes the tiny Flux: the deep one's compile is most of this measurement.
    shape = models.TINY if config.smoke else models.flux_shapes(smoke=False)[2]
    model = models.build_flux(shape, config)
    loras = [
        models.make_adapter(model, config.swap_rank, config.seed + i, workdir, config)
        for i in range(2)
    ]
    models.load_adapter(model, loras[0], None)
    prepare_for_hotswap(model, max_rank=config.max_rank)
    pipelines.compile_denoiser(model, "eager")
    call = models.flux_call(shape, config)
    spec = PipelineSpec(shape.name, model, run=lambda **_: model(**call)[0])
    options = HotswapOptions(max_rank=config.max_rank, device=config.device, dtype=config.dtype)
    pipeline = HotswapPipeline(spec, implementations.get("reference"), options, loras[0])
    pipeline.warm_up()  # the first compile; what the hand-out check compares against
    return pipeline, loras


def _pipeline_checks(config: BenchConfig, workdir: Path) -> list[dict[str, Any]]:
    from pytest_hotswap.pipelines.cache import reusable

    pipeline, loras = _deep_pipeline(config, workdir)
    tensors = len(pipeline.lora_layout())
    frames = len(snapshot())
    with_check, without = itertools.cycle(loras), itertools.cycle(loras)
    swaps = interleaved(
        {
            "swap": lambda: pipeline.impl.swap(pipeline.spec, next(without)),
            "checked": lambda: pipeline.swap(next(with_check), label="layout bench"),
        },
        config.device,
        max(config.repeats * 2, 10),
        max_rounds=PER_CALL_ROUNDS,
    )
    rows = [
        _row(
            "layout check around a swap (HotswapPipeline.swap)",
            "per swap",
            pooled(swaps["swap"]),
            pooled(swaps["checked"]),
            difference(swaps["checked"], swaps["swap"]),
            f"against the reference's swap alone; {pipeline.name}, {tensors} LoRA tensors",
        )
    ]
    pipeline.swap(pipeline.first_lora, label="back to the first adapter")

    def hand_out() -> None:
        if not reusable(pipeline):
            raise RuntimeError("the bench pipeline was not reusable: nothing to measure")

    checks = interleaved({"hand-out": hand_out}, "cpu", config.repeats)["hand-out"]
    rows.append(
        _row(
            "cached pipeline hand-out (reusable)",
            "per test",
            "-",
            pooled(checks),
            pooled(checks),
            f"pipeline as built (no swap back); {tensors} LoRA tensors, reads the cache lists "
            f"of {frames} compiled frames",
        )
    )
    return rows


def _cases(repeats: int) -> list[tuple[int, str]]:
    """``repeats`` rounds of the variants, the order rotating from round to round."""
    names = list(TEST_VARIANTS)
    return [
        (i, name)
        for i in range(repeats)
        for name in names[i % len(names) :] + names[: i % len(names)]
    ]


def _pytest_tests(config: BenchConfig, workdir: Path) -> list[dict[str, Any]]:
    folder = workdir / "plugin_overhead"
    folder.mkdir(exist_ok=True)
    times_path = folder / "times.json"
    repeats = max(2, min(config.repeats // 3, 10))
    cases = _cases(repeats)
    (folder / "conftest.py").write_text(textwrap.dedent(_CONFTEST).format(times=str(times_path)))
    (folder / "test_overhead.py").write_text(
        textwrap.dedent(_TEST_FILE).format(
            device=config.device, dtype=config.dtype, calls=CALLS_PER_TEST, cases=cases
        )
    )
    (folder / "pytest.ini").write_text("[pytest]\n")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--strict-markers",
        "test_overhead.py",
    ]
    done = subprocess.run(
        command, cwd=folder, env=clean_env(), capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"the overhead tests failed (exit {done.returncode}):\n"
            f"{done.stdout[-3000:]}{done.stderr[-2000:]}"
        )
    times = json.loads(times_path.read_text())
    by_variant: dict[str, list[list[float]]] = {name: [] for name in TEST_VARIANTS}
    for i, name in cases:
        by_variant[name].append([times[f"test_overhead.py::test_case[{i}-{name}]"]])
    plain = by_variant["plain"]
    return [
        _row(
            f"pytest test, {TEST_VARIANTS[name].removeprefix('pytest.mark.')}",
            "per test",
            pooled(plain),
            pooled(by_variant[name]),
            difference(by_variant[name], plain),
            f"against the unmarked test, {repeats} rounds",
        )
        for name in ("no_recompile", "fresh")
    ]


def clean_env() -> dict[str, str]:
    """The environment for a pytest subprocess: no inherited pytest options or plugins."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD")
        and not key.startswith("PYTEST_XDIST")
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
