"""Measurement 5: what pytest-hotswap itself costs.

A call of the compiled tiny Flux transformer inside a ``CompileWatcher`` against one outside, the
watcher's enter + exit, and a ``no_recompile`` pytest test against the same test unmarked (run in a
subprocess; per-test times from its JUnit XML, medians over ``repeats`` tests each).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from pytest_hotswap.bench import models
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result
from pytest_hotswap.bench.timing import median_ms
from pytest_hotswap.watch import CompileWatcher

CALLS_PER_TEST = 20

_TEST_FILE = """
import pytest
import torch

from pytest_hotswap.pipelines import build_tiny_flux_transformer, flux_inputs

DEVICE, DTYPE = {device!r}, {dtype!r}


@pytest.fixture(scope="module")
def compiled():
    model = build_tiny_flux_transformer(device=DEVICE, dtype=DTYPE)
    model.compile(backend="eager")
    inputs = flux_inputs(device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        model(**inputs)
    return model, inputs


def _calls(compiled):
    model, inputs = compiled
    with torch.no_grad():
        for _ in range({calls}):
            model(**inputs)


def test_warm_up(compiled):
    _calls(compiled)


@pytest.mark.parametrize("repeat", range({repeats}))
def test_plain(compiled, repeat):
    _calls(compiled)


@pytest.mark.no_recompile
@pytest.mark.parametrize("repeat", range({repeats}))
def test_no_recompile(compiled, repeat):
    _calls(compiled)
"""


def _watched_calls(config: BenchConfig) -> list[dict[str, object]]:
    torch.compiler.reset()
    model = models.build_flux(models.TINY, config)
    call = models.flux_call(models.TINY, config)
    model.compile(backend="eager")

    def forward() -> None:
        with torch.no_grad():
            model(**call)

    forward()
    repeats = config.repeats * 10
    plain, watched = [], []
    for _ in range(3):  # alternate blocks, so drift in the machine's load hits both alike
        plain.append(median_ms(forward, config.device, repeats))
        with CompileWatcher():
            watched.append(median_ms(forward, config.device, repeats))

    def enter_exit() -> None:
        with CompileWatcher():
            pass

    torch.compiler.reset()
    return [
        {
            "case": "compiled call",
            "plain_ms": statistics.median(plain),
            "watched_ms": statistics.median(watched),
        },
        {
            "case": "watcher enter + exit",
            "plain_ms": 0.0,
            "watched_ms": median_ms(enter_exit, "cpu", repeats),
        },
    ]


def _pytest_tests(config: BenchConfig, workdir: Path) -> dict[str, object]:
    folder = workdir / "plugin_overhead"
    folder.mkdir(exist_ok=True)
    (folder / "test_overhead.py").write_text(
        textwrap.dedent(_TEST_FILE).format(
            device=config.device, dtype=config.dtype, calls=CALLS_PER_TEST, repeats=config.repeats
        )
    )
    junit = folder / "junit.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--strict-markers",
        f"--junitxml={junit}",
        "test_overhead.py",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(
            f"the overhead tests failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
        )
    times: dict[str, list[float]] = {"test_plain": [], "test_no_recompile": []}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "").split("[")[0]
        if name in times:
            times[name].append(float(case.get("time", "nan")) * 1e3)
    return {
        "case": f"pytest test ({CALLS_PER_TEST} calls)",
        "plain_ms": statistics.median(times["test_plain"]),
        "watched_ms": statistics.median(times["test_no_recompile"]),
    }


def run(config: BenchConfig, workdir: Path) -> Result:
    result = Result("plugin_overhead", "Plugin overhead: unwatched vs watched (median ms)")
    result.rows = [*_watched_calls(config), _pytest_tests(config, workdir)]
    for row in result.rows:
        row["overhead_ms"] = row["watched_ms"] - row["plain_ms"]
    return result
