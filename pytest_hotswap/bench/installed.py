"""Measurement 7: what an installed pytest-hotswap costs a suite that never uses it (issue 15).

The plugin loads through its ``pytest11`` entry point in every pytest run of an environment that
has it. A temporary suite of ``TESTS`` trivial tests (no torch, no fixture, no marker) runs in a
subprocess with ``python -m pytest -q`` and with ``-p no:hotswap``, alternately, ``samples`` times
each (after one untimed run of each, except in a smoke run): wall time of the whole process, its peak memory
(``getrusage(RUSAGE_CHILDREN).ru_maxrss`` in a small launcher), and whether torch got imported (the suite's
conftest writes ``"torch" in sys.modules`` at session finish). ``plugin cost`` is the
difference per pair of runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pytest_hotswap.bench import goals
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.overhead import clean_env
from pytest_hotswap.bench.results import Result, Stat

TESTS = 50
WITH, WITHOUT = "with plugin", "-p no:hotswap"

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


def run(config: BenchConfig, workdir: Path) -> Result:
    samples = config.samples
    result = Result(
        "installed_plugin",
        f"Installed plugin, unrelated suite of {TESTS} trivial tests: whole pytest process, "
        f"{samples} runs each, alternating (median [IQR])",
        note="peak_mib: ru_maxrss of the pytest process; plugin cost: difference per pair",
    )
    folder = workdir / "unrelated_suite"
    folder.mkdir(exist_ok=True)
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "conftest.py").write_text(_CONFTEST)
    (folder / "test_trivial.py").write_text(_TESTS)

    variants = {WITH: [], WITHOUT: ["-p", "no:hotswap"]}
    measured: dict[str, list[tuple[float, float, bool]]] = {name: [] for name in variants}
    if not config.smoke:
        for extra in variants.values():
            _pytest(folder, extra)  # untimed: file-system caches, bytecode
    for i in range(samples):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            measured[name].append(_pytest(folder, variants[name]))

    for name in variants:
        runs = measured[name]
        imported = {torch for _, _, torch in runs}
        result.rows.append(
            {
                "run": name,
                "wall_ms": Stat.of(ms for ms, _, _ in runs),
                "peak_mib": Stat.of(mib for _, mib, _ in runs),
                "torch_imported": imported.pop() if len(imported) == 1 else "sometimes",
            }
        )
    pairs = list(zip(measured[WITH], measured[WITHOUT], strict=True))
    result.rows.append(
        {
            "run": "plugin cost",
            "wall_ms": Stat.of(a[0] - b[0] for a, b in pairs),
            "peak_mib": Stat.of(a[1] - b[1] for a, b in pairs),
            "torch_imported": "-",
        }
    )
    result.targets = goals.evaluate(result)
    return result


#: Runs the command given as arguments and prints its wall ms and peak RSS (ru_maxrss of its
#: only child). A small launcher, because Linux counts into a child's ru_maxrss the memory of
#: the process it was forked (or vforked) from: a pytest started from the bench directly would
#: report the bench's own size.
_LAUNCHER = """
import os, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[1:], stdout=sys.stderr)
wall_ms = (time.perf_counter() - start) * 1e3
print(code, wall_ms, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _pytest(folder: Path, extra: list[str]) -> tuple[float, float, bool]:
    """``(wall ms, peak MiB, torch imported)`` of one ``python -m pytest -q`` process."""
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
    code, wall_ms, max_rss = done.stdout.split()[-3:] if done.stdout else ("?", "0", "0")
    if done.returncode != 0 or code != "0" or not marker.exists():
        raise RuntimeError(
            f"{' '.join(command)} in {folder} failed (exit {code}):\n"
            f"{done.stdout[-2000:]}{log.read_text()[-3000:]}"
        )
    peak_mib = int(max_rss) / (2**20 if sys.platform == "darwin" else 1024)  # bytes / KiB
    return float(wall_ms), peak_mib, marker.read_text() == "True"
