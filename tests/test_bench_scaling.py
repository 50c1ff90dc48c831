"""The bench's scaling table (``pytest_hotswap.bench.scaling``) from made-up runs: its rows and
cells, the verdict comparison, which cache each run shares, and the Redis rows without Redis.

No pytest process runs here; the end-to-end run is the bench smoke (``tests/test_bench.py``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from pytest_hotswap import scale
from pytest_hotswap.bench import scaling
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result, Stat, format_table
from pytest_hotswap.report import Report, TestRecord

VERDICTS = {
    "test_conformance.py::test_same_rank[flux-reference]": "passed",
    "test_conformance.py::test_a_b_a[flux-reference]": "passed",
    "test_conformance.py::test_strength_change[flux-diffusers]": "xfailed",
}


def counters(hit: int, miss: int) -> dict[str, int]:
    return {
        "fxgraph_cache_hit": hit,
        "fxgraph_cache_miss": miss,
        "fxgraph_cache_bypass": 0,
        "autograd_cache_hit": 0,
        "autograd_cache_miss": 0,
        "autograd_cache_bypass": 0,
    }


def once(seconds: float) -> Stat:
    """One run's wall time: a Stat of one sample (no spread)."""
    return Stat(seconds, seconds, seconds, seconds, seconds, 1)


def made_up_rows(redis: bool = True) -> list[scaling.Row]:
    flipped = {**VERDICTS, "test_conformance.py::test_a_b_a[flux-reference]": "failed"}
    rows = [
        scaling.Row("cold", 1, scaling.Run(120.5, VERDICTS, 6, counters(0, 9))),
        scaling.Row("cold", 2, scaling.Run(71.25, VERDICTS, 6, counters(0, 9))),
        scaling.Row(
            "warm local dir (second run)", 1, scaling.Run(40.0, flipped, 6, counters(9, 0))
        ),
    ]
    if redis:
        rows += [
            scaling.Row("redis, first run", 1, scaling.Run(125.0, VERDICTS, 6, counters(0, 9))),
            scaling.Row("redis, second run", 1, scaling.Run(38.5, VERDICTS, 6, counters(9, 0))),
        ]
    else:
        rows += [
            scaling.Row("redis, first run", 1, missing="redis-server not installed"),
            scaling.Row("redis, second run", 1, missing="redis-server not installed"),
        ]
    return rows


def test_table_cells_from_made_up_runs() -> None:
    assert scaling.table_rows(made_up_rows()) == [
        {"run": "cold", "workers": 1, "wall_s": once(120.5), "compiles": 6, "fx_hits": 0,
         "fx_misses": 9, "same_verdicts": "-", "result": "2 passed, 1 xfailed"},
        {"run": "cold", "workers": 2, "wall_s": once(71.25), "compiles": 6, "fx_hits": 0,
         "fx_misses": 9, "same_verdicts": True, "result": "2 passed, 1 xfailed"},
        {"run": "warm local dir (second run)", "workers": 1, "wall_s": once(40.0), "compiles": 6,
         "fx_hits": 9, "fx_misses": 0, "same_verdicts": False,
         "result": "1 passed, 1 failed, 1 xfailed"},
        {"run": "redis, first run", "workers": 1, "wall_s": once(125.0), "compiles": 6, "fx_hits": 0,
         "fx_misses": 9, "same_verdicts": True, "result": "2 passed, 1 xfailed"},
        {"run": "redis, second run", "workers": 1, "wall_s": once(38.5), "compiles": 6, "fx_hits": 9,
         "fx_misses": 0, "same_verdicts": True, "result": "2 passed, 1 xfailed"},
    ]  # fmt: skip


def test_table_text_without_redis() -> None:
    result = Result("scaling", "Scaling", rows=scaling.table_rows(made_up_rows(redis=False)))
    assert format_table(result).splitlines() == [
        "== Scaling [ok, 0.0 s]",
        "                           run  workers  wall_s  compiles  fx_hits  fx_misses"
        "  same_verdicts                         result",
        "                          cold        1     120         6        0          9"
        "              -            2 passed, 1 xfailed",
        "                          cold        2    71.2         6        0          9"
        "            yes            2 passed, 1 xfailed",
        "   warm local dir (second run)        1      40         6        9          0"
        "             no  1 passed, 1 failed, 1 xfailed",
        "              redis, first run        1       -         -        -          -"
        "              -     redis-server not installed",
        "             redis, second run        1       -         -        -          -"
        "              -     redis-server not installed",
    ]


def test_same_verdicts_needs_every_test_with_its_outcome() -> None:
    assert scaling.same_verdicts(VERDICTS, dict(reversed(VERDICTS.items())))  # order: irrelevant
    # Negative controls: one outcome changed, one test missing, one test more.
    changed = {**VERDICTS, "test_conformance.py::test_same_rank[flux-reference]": "failed"}
    assert not scaling.same_verdicts(VERDICTS, changed)
    fewer = dict(list(VERDICTS.items())[:2])
    assert not scaling.same_verdicts(VERDICTS, fewer)
    assert not scaling.same_verdicts(fewer, VERDICTS)


def test_a_first_row_without_a_run_is_refused() -> None:
    rows = [scaling.Row("cold", 1, missing="no run"), *made_up_rows()[1:]]
    with pytest.raises(ValueError, match=r"the first row \(cold\) has no run: no run"):
        scaling.table_rows(rows)


def test_run_reads_compiles_verdicts_and_counters_from_the_report() -> None:
    report = Report(
        tests=[
            TestRecord("t.py::a", "passed", compiles=2),
            TestRecord("t.py::b", "xfailed", compiles=3),
        ],
        extra={"compile_cache": {"location": "/c", **counters(4, 1)}},
    )
    run = scaling.Run.of(report, 12.5)
    assert run == scaling.Run(12.5, {"t.py::a": "passed", "t.py::b": "xfailed"}, 5, counters(4, 1))
    report.extra = {}
    with pytest.raises(RuntimeError, match="no compile_cache section"):
        scaling.Run.of(report, 12.5)


@pytest.fixture
def fake_runs(monkeypatch) -> list[tuple[int, str, str | None]]:
    """Stands in for the pytest processes: records what each run was given."""
    calls: list[tuple[int, str, str | None]] = []

    def fake_pytest(self, workers: int, cache_dir: Path, redis: str | None = None) -> scaling.Run:
        calls.append((workers, cache_dir.name, redis))
        return scaling.Run(1.0, VERDICTS, 6, counters(0, 9))

    monkeypatch.setattr(scaling._Runner, "pytest", fake_pytest)
    return calls


def test_which_cache_each_run_shares(fake_runs, monkeypatch, tmp_path) -> None:
    @contextlib.contextmanager
    def fake_redis(directory: Path):
        yield "redis://127.0.0.1:1"

    monkeypatch.setattr(scaling, "redis_missing", lambda: "")
    monkeypatch.setattr(scale, "local_redis", fake_redis)
    result = scaling.run(BenchConfig(smoke=True), tmp_path)
    # Directories are numbered as made (the fake makes no run directories of its own).
    assert fake_runs == [
        (1, "01", None),  # cold
        (2, "02", None),  # cold, its own fresh directory
        (1, "01", None),  # warm: the first run's directory again
        (1, "04", "redis://127.0.0.1:1"),  # 03 is the redis-server's directory
        (1, "05", "redis://127.0.0.1:1"),  # a fresh local directory: only Redis is shared
    ]
    assert [(row["run"], row["workers"]) for row in result.rows] == [
        ("cold", 1),
        ("cold", 2),
        ("warm local dir (second run)", 1),
        ("redis, first run", 1),
        ("redis, second run (fresh local dir)", 1),
    ]
    assert "eager" in result.title and "-k 'same_rank or a_b_a'" in result.title


def test_without_redis_server_the_redis_rows_say_so(fake_runs, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on it
    assert scaling.redis_missing() == "redis-server not installed"
    result = scaling.run(BenchConfig(smoke=True), tmp_path)
    assert len(fake_runs) == 3  # no pytest process for the Redis rows
    assert result.status == "ok"
    assert [row["result"] for row in result.rows[3:]] == ["redis-server not installed"] * 2
    assert [row["wall_s"] for row in result.rows[3:]] == ["-", "-"]
