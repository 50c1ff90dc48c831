"""Measurement 7: what an installed pytest-hotswap costs a suite that never uses it (issue 15).

The plugin loads through its ``pytest11`` entry point in every pytest run of an environment that
has it. A temporary suite of ``TESTS`` trivial tests (no torch, no fixture, no marker) runs in a
subprocess with ``python -m pytest -q`` and with ``-p no:hotswap``, alternately, ``2 x samples``
times each (``samples`` in a smoke run, after one untimed run of each otherwise): wall and CPU
time of the whole process, its peak memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` in a small
launcher), and whether torch got imported (the suite's conftest writes ``"torch" in
sys.modules`` at session finish). ``plugin cost`` is the difference per pair of runs.

Every other plugin installed through ``pytest11`` (xdist, hypothesis, ...) is disabled in both
runs (``-p no:NAME``): they cost the same in both, but their seconds of imports bring seconds of
noise to a difference whose goal is 50 ms. Shared imports they would have paid for are then
charged to pytest-hotswap, so the difference is an upper bound.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from pytest_hotswap.bench import goals
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.overhead import clean_env
from pytest_hotswap.bench.results import Result, Stat

TESTS = 50
PLUGIN = "hotswap"  # the entry point's name
WITH, WITHOUT = "with plugin", f"-p no:{PLUGIN}"

_CONFTEST = """
import sys


def pytest_sessionfinish(session):
    with open("torch_imported.txt", "w") as f:
        f.write(str("torch" in sys.modules))
"""

_TESTS = f"""
import pytest


@pytest.mark.parametrize("i", range({TESTS}))
def test_trivial(i):
    assert i + 1 > i
"""


@dataclasses.dataclass(frozen=True)
class Run:
    wall_ms: float
    cpu_ms: float  # user + system: far less sensitive than wall time to other processes' load
    peak_mib: float
    torch_imported: bool


def run(config: BenchConfig, workdir: Path) -> Result:
    # A 50 ms goal on a process of a few seconds: in the full run two pairs per sample.
    pairs = config.samples if config.smoke else 2 * config.samples
    result = Result(
        "installed_plugin",
        f"Installed plugin, unrelated suite of {TESTS} trivial tests: whole pytest process, "
        f"{pairs} runs each, alternating (median [IQR])",
        note="cpu_ms: user + system time of the process; peak_mib: its ru_maxrss; plugin cost: "
        f"the difference per pair of runs; disabled in both: {', '.join(other_plugins()) or '-'}",
    )
    folder = workdir / "unrelated_suite"
    folder.mkdir(exist_ok=True)
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "conftest.py").write_text(_CONFTEST)
    (folder / "test_trivial.py").write_text(_TESTS)

    others = [arg for name in other_plugins() for arg in ("-p", f"no:{name}")]
    variants = {WITH: others, WITHOUT: [*others, "-p", f"no:{PLUGIN}"]}
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    if not config.smoke:
        for extra in variants.values():
            _pytest(folder, extra)  # untimed: file-system caches, bytecode
    for i in range(pairs):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            runs[name].append(_pytest(folder, variants[name]))

    for name in variants:
        imported = {one.torch_imported for one in runs[name]}
        result.rows.append(
            {
                "run": name,
                "wall_ms": Stat.of(one.wall_ms for one in runs[name]),
                "cpu_ms": Stat.of(one.cpu_ms for one in runs[name]),
                "peak_mib": Stat.of(one.peak_mib for one in runs[name]),
                "torch_imported": imported.pop() if len(imported) == 1 else "sometimes",
            }
        )
    pairs_of = list(zip(runs[WITH], runs[WITHOUT], strict=True))
    result.rows.append(
        {
            "run": "plugin cost",
            "wall_ms": Stat.of(a.wall_ms - b.wall_ms for a, b in pairs_of),
            "cpu_ms": Stat.of(a.cpu_ms - b.cpu_ms for a, b in pairs_of),
            "peak_mib": Stat.of(a.peak_mib - b.peak_mib for a, b in pairs_of),
            "torch_imported": "-",
        }
    )
    result.targets = goals.evaluate(result)
    return result


def other_plugins() -> list[str]:
    """The names of the other installed ``pytest11`` plugins."""
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group="pytest11")} - {PLUGIN})


#: Runs the command given as arguments and prints its wall ms and peak RSS (ru_maxrss of its
#: only child). A small launcher, because Linux counts into a child's ru_maxrss the memory of
#: the process it was forked (or vforked) from: a pytest started from the bench directly would
#: report the bench's own size.
_LAUNCHER = """
import os, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[1:], stdout=sys.stderr)
wall_ms = (time.perf_counter() - start) * 1e3
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(code, wall_ms, (usage.ru_utime + usage.ru_stime) * 1e3, usage.ru_maxrss)
"""


def _pytest(folder: Path, extra: list[str]) -> Run:
    """One ``python -m pytest -q`` process: wall and CPU ms, peak MiB, whether torch got imported."""
    marker = folder / "torch_imported.txt"
    marker.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra]
    log = folder / "last_run.log"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, *command],
            cwd=folder,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            check=False,
        )
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) != 4 or fields[0] != "0" or not marker.exists():
        raise RuntimeError(
            f"{' '.join(command)} in {folder} failed ({done.stdout.strip() or 'no result'}):\n"
            f"{log.read_text()[-3000:]}"
        )
    wall_ms, cpu_ms, max_rss = float(fields[1]), float(fields[2]), int(fields[3])
    peak_mib = max_rss / (2**20 if sys.platform == "darwin" else 1024)  # bytes / KiB
    return Run(wall_ms, cpu_ms, peak_mib, marker.read_text() == "True")
