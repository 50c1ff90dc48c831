"""Per-test compile records, the JSON report and the baseline comparison. No pytest, no torch.

The report is plain data so that CI can keep it as an artifact and compare a later run against it,
with the plugin (``--hotswap-baseline``) or offline (``pytest-hotswap compare``). Its JSON schema
carries ``schema_version``; a change of meaning bumps it and an old file is refused by name.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pytest_hotswap.watch import shorten_reason

SCHEMA_VERSION = 1
METRICS = ("compiles", "recompiles", "graph_breaks", "compile_s", "swap_ms")
# Used when a baseline is given without thresholds: nothing may recompile more than it used to.
DEFAULT_FAIL_ON = "recompiles:+0%,graph_breaks:+0%"
_VERSIONED = ("torch", "diffusers", "peft", "pytest-hotswap")


class ReportError(ValueError):
    """A report file that cannot be read: missing, not JSON, or another schema version."""


@dataclasses.dataclass
class SwapRecord:
    """One swap the test labelled with ``CompileWatcher.step(label, swap_ms=...)``."""

    label: str
    ms: float


@dataclasses.dataclass
class EventRecord:
    """A recompile (or other non-first compile event) with dynamo's guard-failure reasons."""

    compile_id: str
    frame: str
    filename: str
    lineno: int
    kind: str
    reasons: list[str]
    step: str | None
    seconds: float

    def describe(self) -> str:
        where = (
            f"{self.frame} ({Path(self.filename).name}:{self.lineno})"
            if self.filename
            else self.frame
        )
        after = f" after {self.step!r}" if self.step else ""
        if not self.reasons:
            return f"{self.kind} {self.compile_id} of {where}{after}: no guard failure reported"
        more = f" (+{len(self.reasons) - 1} more in the report)" if len(self.reasons) > 1 else ""
        # The newest cache entry's guard comes first: that is the one the swap broke.
        return f"{self.kind} {self.compile_id} of {where}{after}: {shorten_reason(self.reasons[0])}{more}"


@dataclasses.dataclass
class TestRecord:
    """What one watched test did: compiles, recompiles with reasons, swaps and their latencies."""

    __test__ = False  # not a pytest test class

    nodeid: str
    outcome: str
    compiles: int = 0
    recompiles: int = 0
    graph_breaks: int = 0
    compile_s: float = 0.0
    swaps: list[SwapRecord] = dataclasses.field(default_factory=list)
    events: list[EventRecord] = dataclasses.field(default_factory=list)
    # What the fixtures put in ``CompileWatcher.context``: pipeline, implementation, backend, device.
    context: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_watcher(cls, nodeid: str, outcome: str, watcher: Any) -> TestRecord:
        """Build from a ``CompileWatcher`` (its counters, ``events``, ``steps`` and ``context``)."""
        return cls(
            nodeid=nodeid,
            outcome=outcome,
            compiles=watcher.compiles,
            recompiles=watcher.recompiles,
            graph_breaks=watcher.graph_breaks,
            compile_s=watcher.compile_seconds,
            swaps=[SwapRecord(s.label, s.swap_ms) for s in watcher.steps if s.swap_ms is not None],
            events=[
                EventRecord(
                    compile_id=str(e.compile_id),
                    frame=e.frame,
                    filename=e.filename,
                    lineno=e.lineno,
                    kind=e.kind,
                    reasons=list(e.reasons),
                    step=e.step,
                    seconds=e.seconds,
                )
                for e in watcher.events
                if e.kind != "compile"
            ],
            context={key: _json_value(value) for key, value in watcher.context.items()},
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestRecord:
        fields = dict(data)
        fields["swaps"] = [SwapRecord(**swap) for swap in data.get("swaps", [])]
        fields["events"] = [EventRecord(**event) for event in data.get("events", [])]
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def median_swap_ms(self) -> float | None:
        return statistics.median(s.ms for s in self.swaps) if self.swaps else None

    def metric(self, name: str) -> float | None:
        """The value a fail-on threshold compares: ``swap_ms`` is the median swap latency."""
        return self.median_swap_ms if name == "swap_ms" else getattr(self, name)


@dataclasses.dataclass
class Report:
    """A run's records plus what they were measured with (versions, xdist workers)."""

    tests: list[TestRecord]
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    # > 0 when the records came from pytest-xdist workers: timings then include their contention.
    xdist_workers: int = 0
    created: str = ""
    # Top-level keys added by ``pytest_hotswap_report`` hooks, kept through a load/save round trip.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def new(cls, tests: Iterable[TestRecord], *, xdist_workers: int = 0) -> Report:
        """A report for this process's environment, tests sorted by node id (so xdist is stable)."""
        return cls(
            tests=sorted(tests, key=lambda record: record.nodeid),
            versions=installed_versions(),
            xdist_workers=xdist_workers,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )

    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema_version": self.schema_version,
            "created": self.created,
            "versions": dict(self.versions),
            "xdist_workers": self.xdist_workers,
            "tests": [test.to_dict() for test in self.tests],
        }
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ReportError(
                f"schema_version {version!r} is not {SCHEMA_VERSION}: write the report again with "
                "this pytest-hotswap version"
            )
        known = {"schema_version", "created", "versions", "xdist_workers", "tests"}
        try:
            return cls(
                tests=[TestRecord.from_dict(test) for test in data["tests"]],
                versions=dict(data.get("versions", {})),
                xdist_workers=int(data.get("xdist_workers", 0)),
                created=str(data.get("created", "")),
                extra={key: value for key, value in data.items() if key not in known},
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ReportError(
                f"not a pytest-hotswap report ({type(error).__name__}: {error})"
            ) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        """Read a report; every failure is a ``ReportError`` naming the path."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ReportError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ReportError(f"{path}: cannot read it ({error})") from None
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}: not JSON ({error})") from None
        except ReportError as error:
            raise ReportError(f"{path}: {error}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(path, self.to_dict())

    @property
    def timing_note(self) -> str | None:
        if not self.xdist_workers:
            return None
        return (
            f"timings measured under pytest-xdist with {self.xdist_workers} workers, "
            "not comparable with a serial run"
        )


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write atomically, so an interrupted run never leaves half a baseline behind."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=target.parent, suffix=".tmp", delete=False
    ) as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(handle.name, target)


def installed_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _json_value(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


# --- thresholds and comparison -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Threshold:
    """``metric:N`` caps the value at N; ``metric:+P%`` allows it to grow by P percent at most."""

    metric: str
    limit: float
    relative: bool

    def __str__(self) -> str:
        return (
            f"{self.metric}:+{self.limit:g}%" if self.relative else f"{self.metric}:{self.limit:g}"
        )

    def exceeded(self, old: float | None, new: float | None) -> bool:
        if new is None:
            return False
        if not self.relative:
            return new > self.limit
        return old is not None and new > old * (1 + self.limit / 100)


def parse_fail_on(text: str) -> tuple[Threshold, ...]:
    """Parse ``recompiles:0,graph_breaks:0,compile_s:+50%,swap_ms:+100%``.

    Raises ``ValueError`` saying what is wrong and what is accepted.
    """
    thresholds: dict[str, Threshold] = {}
    for part in (piece.strip() for piece in str(text).split(",")):
        if not part:
            continue
        metric, sep, limit = (s.strip() for s in part.partition(":"))
        if not sep or metric not in METRICS:
            raise ValueError(
                f"bad threshold {part!r}: expected METRIC:N (a cap) or METRIC:+P% (growth over "
                f"the baseline), METRIC one of {', '.join(METRICS)}"
            )
        relative = limit.startswith("+") and limit.endswith("%")
        number = limit[1:-1] if relative else limit
        try:
            value = float(number)
        except ValueError:
            value = -1.0
        if not number or value < 0 or value != value or value == float("inf"):
            raise ValueError(
                f"bad limit in {part!r}: expected a number >= 0 (like {metric}:0) or a "
                f"percentage growth (like {metric}:+50%)"
            )
        thresholds[metric] = Threshold(metric, value, relative)
    if not thresholds:
        raise ValueError(
            "expected at least one threshold, like recompiles:0,compile_s:+50%,swap_ms:+100%"
        )
    return tuple(thresholds.values())


@dataclasses.dataclass(frozen=True)
class Regression:
    nodeid: str
    metric: str
    old: float | None
    new: float | None
    threshold: Threshold


@dataclasses.dataclass
class Comparison:
    """The outcome of comparing a run with its baseline. Only ``regressions`` fail it."""

    thresholds: tuple[Threshold, ...]
    compared: int
    regressions: list[Regression]
    new_tests: list[str]
    gone_tests: list[str]
    notes: list[str]

    @property
    def failed(self) -> bool:
        return bool(self.regressions)

    def format(self) -> list[str]:
        limits = ",".join(str(t) for t in self.thresholds)
        lines = [f"compared {self.compared} tests with the baseline on {limits}"]
        if self.regressions:
            lines.append(f"{len(self.regressions)} regressions:")
            rows = [
                (r.nodeid, r.metric, _fmt(r.old), _fmt(r.new), str(r.threshold))
                for r in self.regressions
            ]
            lines += _table(("test", "metric", "baseline", "now", "limit"), rows)
        else:
            lines.append("no regressions")
        lines += [f"new since the baseline (not compared): {nodeid}" for nodeid in self.new_tests]
        lines += [f"gone since the baseline: {nodeid}" for nodeid in self.gone_tests]
        return lines + [f"note: {note}" for note in self.notes]


#: Outcomes of tests a baseline comparison leaves out.
NOT_COMPARED_OUTCOMES = frozenset({"skipped", "xfailed"})


def compare(baseline: Report, current: Report, thresholds: Sequence[Threshold]) -> Comparison:
    """Compare the tests both reports hold; tests new or gone are listed, never failed.

    Tests that did not run for real now (skipped, or xfailed: an expected failure, such as a
    test demonstrating a recompile) are not held to the thresholds.
    """
    old = {test.nodeid: test for test in baseline.tests}
    new = {test.nodeid: test for test in current.tests}
    common = [n for n in new if n in old and new[n].outcome not in NOT_COMPARED_OUTCOMES]
    regressions = [
        Regression(nodeid, t.metric, old_value, new_value, t)
        for nodeid in common
        for t in thresholds
        if t.exceeded(
            old_value := old[nodeid].metric(t.metric), new_value := new[nodeid].metric(t.metric)
        )
    ]
    notes = []
    timed = any(t.metric in ("compile_s", "swap_ms") for t in thresholds)
    if timed and baseline.xdist_workers != current.xdist_workers:
        notes.append(
            f"timings compared across different xdist worker counts "
            f"({baseline.xdist_workers} in the baseline, {current.xdist_workers} now)"
        )
    return Comparison(
        thresholds=tuple(thresholds),
        compared=len(common),
        regressions=regressions,
        new_tests=[nodeid for nodeid in new if nodeid not in old],
        gone_tests=[nodeid for nodeid in old if nodeid not in new],
        notes=notes,
    )


# --- terminal summary ----------------------------------------------------------------------------


def format_summary(report: Report, *, worst: int = 3) -> list[str]:
    """The ``hotswap summary`` lines: totals, the worst tests and every recompile's reason."""
    tests = report.tests
    swaps = [swap.ms for test in tests for swap in test.swaps]
    median = f"{statistics.median(swaps):.2f} ms" if swaps else "-"
    lines = [
        f"tests watched: {len(tests)}, swaps: {len(swaps)}, "
        f"compiles: {sum(t.compiles for t in tests)}, "
        f"recompiles: {sum(t.recompiles for t in tests)}, "
        f"graph breaks: {sum(t.graph_breaks for t in tests)}",
        f"compile time: {sum(t.compile_s for t in tests):.2f} s, median swap: {median}",
    ]
    if report.timing_note:
        lines.append(f"({report.timing_note})")
    ranked = sorted(tests, key=lambda t: (t.recompiles, t.graph_breaks, t.compile_s), reverse=True)
    if len(ranked) > 1:
        lines.append("worst tests:")
        rows = [
            (
                t.nodeid,
                str(t.recompiles),
                str(t.graph_breaks),
                f"{t.compile_s:.2f}",
                _fmt(t.median_swap_ms),
            )
            for t in ranked[:worst]
        ]
        lines += _table(("test", "recompiles", "graph breaks", "compile s", "swap ms"), rows)
    events = [(test.nodeid, event) for test in tests for event in test.events]
    if events:
        lines.append("recompiles:")
        lines += [f"  {nodeid}: {event.describe()}" for nodeid, event in events]
    return lines


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return [
        "  "
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
