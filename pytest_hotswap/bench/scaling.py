"""Measurement 10: the conformance suite on 1 and 2 xdist workers, and a second run sharing the
first one's compile cache (issue 24).

Every row is one whole process, ``python -m pytest --pyargs pytest_hotswap.conformance -p
no:cacheprovider -n W --dist loadgroup --hotswap-report=... --hotswap-compile-cache=...`` on a
representative subset (:data:`SMOKE_SUBSET` in a smoke run, :data:`SUBSET` otherwise), in a fresh
temporary directory, timed from start to exit. ``TORCHINDUCTOR_CACHE_DIR`` is a fresh directory
(cold) or the one the first row filled (warm); the Redis rows add torch's remote FX graph and
AOTAutograd caches in a ``redis-server`` the bench starts on 127.0.0.1 (``scale.local_redis``),
each with a fresh local directory, so the second one can only hit what the first wrote to Redis.

The report gives the rest: ``compiles`` is the sum of the tests' dynamo compiles (a cache hit still
counts: it saves inductor's work, not dynamo's), ``fx_hits`` / ``fx_misses`` torch's own FX graph
cache counters (its ``compile_cache`` section, summed over the workers), ``same_verdicts`` whether
every test's outcome is the first row's. One run per row: no spread. Without ``redis-server`` (or
the Python client) the Redis rows say so; that is not a failure.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pytest_hotswap import scale
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.overhead import clean_env
from pytest_hotswap.bench.results import Result, Stat
from pytest_hotswap.report import OUTCOMES, Report


@dataclasses.dataclass(frozen=True)
class Subset:
    """The part of the conformance suite a row runs: columns, scenarios (``-k``) and backend."""

    pipelines: str
    implementations: str
    scenarios: str
    backend: str

    def args(self) -> list[str]:
        return [
            f"--hotswap-pipelines={self.pipelines}",
            f"--hotswap-implementations={self.implementations}",
            f"--hotswap-backend={self.backend}",
            "-k",
            self.scenarios,
        ]

    def text(self) -> str:
        columns = f"{self.pipelines} x {self.implementations}".replace(",", "+")
        return f"{columns}, -k '{self.scenarios}', {self.backend}"


#: Two columns (one per worker under ``--dist loadgroup``), each compiling the same Flux graph
#: once (on one worker the second column can hit what the first wrote); both kinds of verdict:
#: passes, and known upstream defects of diffusers + PEFT (xfail).
SUBSET = Subset(
    "flux",
    "diffusers,reference",
    "same_rank or a_b_a or strength_change or rank_over_max",
    "inductor",
)
#: One column, two scenarios, no inductor: the whole path in seconds (no FX graph cache lookups).
SMOKE_SUBSET = Subset("flux", "reference", "same_rank or a_b_a", "eager")
#: The most one pytest process may take before the row is an error.
TIMEOUT_S = {True: 600, False: 3600}
COLUMNS = (
    "run",
    "workers",
    "wall_s",
    "compiles",
    "fx_hits",
    "fx_misses",
    "same_verdicts",
    "result",
)


@dataclasses.dataclass(frozen=True)
class Run:
    """What one pytest process gave: its wall time and its report's figures."""

    seconds: float
    verdicts: dict[str, str]  # node id -> outcome
    compiles: int
    counters: dict[str, int]  # torch's compile-cache counters (``scale.CACHE_COUNTERS`` names)

    @classmethod
    def of(cls, report: Report, seconds: float) -> Run:
        section = report.extra.get("compile_cache")
        if not isinstance(section, Mapping):
            raise RuntimeError("the report has no compile_cache section")
        return cls(
            seconds,
            {record.nodeid: record.outcome for record in report.tests},
            sum(record.compiles for record in report.tests),
            {name: int(section.get(name, 0)) for _, name in scale.CACHE_COUNTERS},
        )


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: a run, or why it could not be made (``missing``)."""

    label: str
    workers: int
    run: Run | None = None
    missing: str = ""


def same_verdicts(first: Mapping[str, str], other: Mapping[str, str]) -> bool:
    """Whether both runs have the same tests with the same outcome each."""
    return dict(first) == dict(other)


def outcomes(verdicts: Mapping[str, str]) -> str:
    """``2 passed, 1 xfailed``: how many tests had each outcome, in the report's order of them."""
    counts = Counter(verdicts.values())
    return ", ".join(f"{counts[name]} {name}" for name in OUTCOMES if counts[name])


def table_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The table: one dict per row; the first row's verdicts are what the others are compared to."""
    first = rows[0].run
    if first is None:
        raise ValueError(f"the first row ({rows[0].label}) has no run: {rows[0].missing}")
    table = []
    for index, row in enumerate(rows):
        cells: dict[str, Any] = {"run": row.label, "workers": row.workers}
        if row.run is None:
            cells.update({column: "-" for column in COLUMNS[2:-1]}, result=row.missing)
        else:
            cells.update(
                wall_s=Stat.of([row.run.seconds]),
                compiles=row.run.compiles,
                fx_hits=row.run.counters["fxgraph_cache_hit"],
                fx_misses=row.run.counters["fxgraph_cache_miss"],
                same_verdicts="-"
                if index == 0
                else same_verdicts(first.verdicts, row.run.verdicts),
                result=outcomes(row.run.verdicts),
            )
        table.append(cells)
    return table


def run(config: BenchConfig, workdir: Path) -> Result:
    subset = SMOKE_SUBSET if config.smoke else SUBSET
    result = Result(
        "scaling",
        f"Scaling: the conformance suite ({subset.text()}), 1 and 2 xdist workers, a second run "
        f"sharing the compile cache; whole pytest processes, one per row (s, counts)",
        note="cold: a fresh TORCHINDUCTOR_CACHE_DIR; warm: the one the first row filled; redis: "
        "torch's remote caches in a private redis-server, each run with a fresh local directory; "
        "compiles: dynamo compiles summed over the tests (a cache hit still counts one); fx: "
        "torch's FX graph cache counters; same_verdicts: every outcome as in the first row",
    )
    runner = _Runner(config, subset, workdir / "scaling")
    cold = runner.fresh_dir()
    rows = [
        Row("cold", 1, runner.pytest(1, cold)),
        Row("cold", 2, runner.pytest(2, runner.fresh_dir())),
        Row("warm local dir (second run)", 1, runner.pytest(1, cold)),
    ]
    missing = redis_missing()
    with ExitStack() as stack:
        redis = None if missing else stack.enter_context(scale.local_redis(runner.fresh_dir()))
        for label in ("redis, first run", "redis, second run (fresh local dir)"):
            if redis is None:
                rows.append(Row(label, 1, missing=missing))
            else:
                rows.append(Row(label, 1, runner.pytest(1, runner.fresh_dir(), redis)))
    result.rows = table_rows(rows)
    return result


def redis_missing() -> str:
    """Why the Redis rows cannot run here ("" when they can)."""
    if scale.redis_server_binary() is None:
        return "redis-server not installed"
    if importlib.util.find_spec("redis") is None:
        return "redis (Python client) not installed: pip install 'pytest-hotswap[cache]'"
    return ""


class _Runner:
    """Starts the pytest processes, each in its own fresh directory under ``root``."""

    def __init__(self, config: BenchConfig, subset: Subset, root: Path) -> None:
        self.config, self.subset, self.root = config, subset, root
        self.count = 0

    def fresh_dir(self) -> Path:
        self.count += 1
        path = self.root / f"{self.count:02d}"
        path.mkdir(parents=True)
        return path

    def pytest(self, workers: int, cache_dir: Path, redis: str | None = None) -> Run:
        """One run of the subset with ``workers`` xdist workers and its inductor cache in
        ``cache_dir`` (plus ``redis`` when given)."""
        where = self.fresh_dir()
        report = where / "report.json"
        command = [
            sys.executable, "-m", "pytest", "--pyargs", "pytest_hotswap.conformance",
            "-p", "no:cacheprovider", "-q", "-n", str(workers), "--dist", "loadgroup",
            f"--basetemp={where / 'tmp'}", f"--hotswap-report={report}",
            f"--hotswap-compile-cache={redis or cache_dir}",
            f"--hotswap-device={self.config.device}", f"--hotswap-max-rank={self.config.max_rank}",
            *self.subset.args(),
        ]  # fmt: skip
        log = where / "pytest.log"
        start = time.perf_counter()
        with log.open("w") as out:
            done = subprocess.run(
                command,
                cwd=where,
                env=_env(cache_dir),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=TIMEOUT_S[self.config.smoke],
                check=False,
            )
        seconds = time.perf_counter() - start
        # 0: every test as expected; 1: some failed (a verdict like any other); else: no run.
        if done.returncode not in (0, 1) or not report.exists():
            raise RuntimeError(
                f"{' '.join(command)} in {where} exited {done.returncode}:\n"
                f"{log.read_text()[-3000:]}"
            )
        return Run.of(Report.load(report), seconds)


def _env(cache_dir: Path) -> dict[str, str]:
    """The environment of a run: no inherited pytest options or inductor settings, its own
    inductor directory (for the Redis rows too, so they start from an empty local cache)."""
    env = {key: value for key, value in clean_env().items() if not key.startswith("TORCHINDUCTOR_")}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env
