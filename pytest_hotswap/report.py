"""Per-test compile records, the JSON report and the baseline comparison. No pytest, no torch.

The report is plain data so that CI can keep it as an artifact and compare a later run against it,
with the plugin (``--hotswap-baseline``) or offline (``pytest-hotswap compare``). Its JSON schema
carries ``schema_version``; a change of meaning bumps it and an old file is refused by name.
Every field is checked on load: a file of the wrong shape is a :class:`ReportError` naming the
test and the field, never a traceback and never a silently passing comparison.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_hotswap.stacks import STACK_PACKAGES, installed_version
from pytest_hotswap.watch.events import (
    KIND_CACHE_SWITCH,
    KIND_LAYOUT_CHANGE,
    KIND_RECOMPILE,
    CompileEvent,
    count_kinds,
)

SCHEMA_VERSION = 1
#: What a threshold can compare. ``recompiles`` counts every event that fails ``no_recompile``;
#: ``cache_switches`` and ``layout_changes`` are the counts of those two kinds among them.
METRICS = (
    "compiles",
    "recompiles",
    "cache_switches",
    "layout_changes",
    "graph_breaks",
    "compile_s",
    "swap_ms",
)
# Used when a baseline is given without thresholds: nothing may recompile more than it used to.
DEFAULT_FAIL_ON = "recompiles:+0%,graph_breaks:+0%"
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


class ReportError(ValueError):
    """A report that cannot be used: missing, not JSON, another schema version, or a field of
    the wrong type (the message names the test and the field)."""


@dataclasses.dataclass
class SwapRecord:
    """One swap the test labelled with ``CompileWatcher.step(label, swap_ms=...)``."""

    label: str
    ms: float


@dataclasses.dataclass
class TestRecord:
    """What one watched test did: compiles, recompiles with reasons, swaps and their latencies."""

    __test__ = False  # not a pytest test class

    nodeid: str
    outcome: str
    compiles: int = 0
    recompiles: int = 0
    cache_switches: int = 0
    layout_changes: int = 0
    graph_breaks: int = 0
    compile_s: float = 0.0
    swaps: list[SwapRecord] = dataclasses.field(default_factory=list)
    events: list[CompileEvent] = dataclasses.field(default_factory=list)
    # What the fixtures put in ``CompileWatcher.context``: pipeline, implementation, backend, device.
    context: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_watcher(cls, nodeid: str, outcome: str, watcher: Any) -> TestRecord:
        """Build from a ``CompileWatcher`` (its counters, ``events``, ``steps`` and ``context``)."""
        kinds = count_kinds(watcher.events)
        return cls(
            nodeid=nodeid,
            outcome=outcome,
            compiles=watcher.compiles,
            recompiles=watcher.recompiles,
            cache_switches=kinds.get(KIND_CACHE_SWITCH, 0),
            layout_changes=kinds.get(KIND_LAYOUT_CHANGE, 0),
            graph_breaks=watcher.graph_breaks,
            compile_s=watcher.compile_seconds,
            swaps=[SwapRecord(s.label, s.swap_ms) for s in watcher.steps if s.swap_ms is not None],
            events=[event for event in watcher.events if event.is_recompile],
            context={key: _json_value(value) for key, value in watcher.context.items()},
        )

    @classmethod
    def from_dict(cls, data: Any) -> TestRecord:
        """Read one test's record, checking every field; a problem is a ``ReportError``."""
        if not isinstance(data, Mapping):
            raise ReportError(f"a test record must be a JSON object, got {_kind(data)}")
        nodeid = data.get("nodeid")
        if not isinstance(nodeid, str):
            raise ReportError(f"a test record's 'nodeid' must be a string, got {_show(nodeid)}")
        where = f"test {nodeid!r}"
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ReportError(f"{where}: unknown fields {unknown}")
        outcome = data.get("outcome")
        if outcome not in OUTCOMES:
            raise ReportError(
                f"{where}: 'outcome' must be one of {', '.join(OUTCOMES)}, got {_show(outcome)}"
            )
        counts = {
            name: _count(where, name, data.get(name, 0))
            for name in (
                "compiles",
                "recompiles",
                "cache_switches",
                "layout_changes",
                "graph_breaks",
            )
        }
        swaps = _list(where, "swaps", data.get("swaps", []))
        events = _list(where, "events", data.get("events", []))
        context = data.get("context", {})
        if not isinstance(context, Mapping):
            raise ReportError(f"{where}: 'context' must be an object, got {_show(context)}")
        try:
            parsed_events = [CompileEvent.from_dict(_mapping(event)) for event in events]
        except ValueError as error:
            raise ReportError(f"{where}: {error}") from None
        return cls(
            nodeid=nodeid,
            outcome=outcome,
            compile_s=_seconds(where, "compile_s", data.get("compile_s", 0.0)),
            swaps=[_swap(where, swap) for swap in swaps],
            events=parsed_events,
            context=dict(context),
            **counts,
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["events"] = [event.to_dict() for event in self.events]
        return data

    @property
    def median_swap_ms(self) -> float | None:
        return statistics.median(s.ms for s in self.swaps) if self.swaps else None

    def metric(self, name: str) -> float | None:
        """The value a fail-on threshold compares: ``swap_ms`` is the median swap latency."""
        return self.median_swap_ms if name == "swap_ms" else getattr(self, name)


def _kind(value: Any) -> str:
    return "null" if value is None else f"a JSON {type(value).__name__}"


def _show(value: Any) -> str:
    return json.dumps(value) if _jsonable(value) else repr(value)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"an event must be an object, got {_show(value)}")
    return value


def _count(where: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReportError(f"{where}: {name!r} must be an integer >= 0, got {_show(value)}")
    return value


def _seconds(where: str, name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ReportError(f"{where}: {name!r} must be a finite number >= 0, got {_show(value)}")
    return float(value)


def _list(where: str, name: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ReportError(f"{where}: {name!r} must be a list, got {_show(value)}")
    return value


def _swap(where: str, value: Any) -> SwapRecord:
    if not isinstance(value, Mapping) or set(value) != {"label", "ms"}:
        raise ReportError(
            f"{where}: each swap must be an object with 'label' and 'ms', got {_show(value)}"
        )
    if not isinstance(value["label"], str):
        raise ReportError(
            f"{where}: a swap's 'label' must be a string, got {_show(value['label'])}"
        )
    return SwapRecord(value["label"], _seconds(where, "ms", value["ms"]))


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
    def from_dict(cls, data: Any) -> Report:
        """Read a report, checking every field; a problem is a ``ReportError`` naming it."""
        if not isinstance(data, Mapping):
            raise ReportError(f"a report must be a JSON object, got {_kind(data)}")
        version = data.get("schema_version")
        if isinstance(version, bool) or version != SCHEMA_VERSION:
            raise ReportError(
                f"schema_version {_show(version)} is not {SCHEMA_VERSION}: write the report again "
                "with this pytest-hotswap version"
            )
        if "tests" not in data:
            raise ReportError("not a pytest-hotswap report: it has no 'tests' list")
        tests = data["tests"]
        if not isinstance(tests, list):
            raise ReportError(f"'tests' must be a list, got {_show(tests)}")
        versions = data.get("versions", {})
        if not isinstance(versions, Mapping) or not all(
            isinstance(v, str) for v in versions.values()
        ):
            raise ReportError(
                f"'versions' must map package names to strings, got {_show(versions)}"
            )
        workers = data.get("xdist_workers", 0)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ReportError(f"'xdist_workers' must be an integer >= 0, got {_show(workers)}")
        created = data.get("created", "")
        if not isinstance(created, str):
            raise ReportError(f"'created' must be a string, got {_show(created)}")
        records = [TestRecord.from_dict(test) for test in tests]
        seen: set[str] = set()
        for record in records:
            if record.nodeid in seen:
                raise ReportError(f"test {record.nodeid!r} appears twice")
            seen.add(record.nodeid)
        known = {"schema_version", "created", "versions", "xdist_workers", "tests"}
        return cls(
            tests=records,
            versions=dict(versions),
            xdist_workers=workers,
            created=created,
            extra={key: value for key, value in data.items() if key not in known},
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        """Read a report; every failure is a ``ReportError`` naming the path."""
        file = Path(path)
        try:
            if not file.is_file():
                what = (
                    "is a directory"
                    if file.is_dir()
                    else "no such file"
                    if not file.exists()
                    else "not a regular file"
                )
                raise ReportError(f"{path}: {what}")
            return cls.from_dict(
                json.loads(file.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
            )
        except (OSError, UnicodeDecodeError) as error:
            raise ReportError(f"{path}: cannot read it ({error})") from None
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}: not JSON ({error})") from None
        except ReportError as error:
            message = str(error)
            raise ReportError(
                message if message.startswith(f"{path}:") else f"{path}: {message}"
            ) from None

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

    def summary_lines(self, *, worst: int = 3) -> list[str]:
        """The ``hotswap summary`` lines: totals, the worst tests and every failing event."""
        tests = self.tests
        swaps = [swap.ms for test in tests for swap in test.swaps]
        median = f"{statistics.median(swaps):.2f} ms" if swaps else "-"
        kinds = count_kinds(event for test in tests for event in test.events)
        detail = ", ".join(
            f"{kind.replace('_', ' ')}: {n}" for kind, n in kinds.items() if kind != KIND_RECOMPILE
        )
        lines = [
            f"tests watched: {len(tests)}, swaps: {len(swaps)}, "
            f"compiles: {sum(t.compiles for t in tests)}, "
            f"recompiles: {sum(t.recompiles for t in tests)}"
            f"{f' ({detail})' if detail else ''}, "
            f"graph breaks: {sum(t.graph_breaks for t in tests)}",
            f"compile time: {sum(t.compile_s for t in tests):.2f} s, median swap: {median}",
        ]
        if self.timing_note:
            lines.append(f"({self.timing_note})")
        ranked = sorted(
            tests, key=lambda t: (t.recompiles, t.graph_breaks, t.compile_s), reverse=True
        )
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
            lines += format_table(
                ("test", "recompiles", "graph breaks", "compile s", "swap ms"), rows
            )
        events = [(test.nodeid, event) for test in tests for event in test.events]
        if events:
            lines.append("recompiles:")
            lines += [f"  {nodeid}: {event.describe()}" for nodeid, event in events]
        return lines


def _refuse_constant(name: str) -> Any:
    raise ReportError(f"{name} is not a valid JSON number (a report holds finite numbers only)")


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write atomically, so an interrupted run never leaves half a baseline (or a temp file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below, removed on failure)
        "w",
        encoding="utf-8",
        dir=target.parent,
        prefix=f".{target.name}.",
        suffix=".tmp",
        delete=False,
    )
    try:
        with handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Where a report will be written, checked before a run: missing folders are created; a
    directory, or a folder that cannot be created or written to, is a ``ReportError``."""
    target = Path(path)
    if target.is_dir():
        raise ReportError(
            f"{path}: is a directory; give a file path like {Path(path) / 'hotswap.json'}"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"{path}: cannot create its folder ({error.strerror or error})") from None
    if not os.access(target.parent, os.W_OK):
        raise ReportError(f"{path}: its folder {target.parent} is not writable")
    return target


def installed_versions() -> dict[str, str]:
    """Python's version and the stack's (:func:`pytest_hotswap.stacks.installed_version`), with
    pytest-hotswap's own; ``"not installed"`` for a package that is not."""
    versions = {"python": sys.version.split()[0]}
    for name in (*STACK_PACKAGES, "pytest-hotswap"):
        versions[name] = installed_version(name) or "not installed"
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
    forms = "METRIC:N (a cap) or METRIC:+P% (growth over the baseline)"
    for part in (piece.strip() for piece in str(text).split(",")):
        if not part:
            continue
        metric, sep, limit = (s.strip() for s in part.partition(":"))
        if not sep or metric not in METRICS:
            raise ValueError(
                f"bad threshold {part!r}: expected {forms}, METRIC one of {', '.join(METRICS)}"
            )
        relative = limit.startswith("+")
        if relative and not limit.endswith("%"):
            raise ValueError(
                f"bad limit in {part!r}: growth needs a percent sign ({metric}:{limit}%); a cap "
                f"has no plus sign ({metric}:{limit[1:]})"
            )
        number = limit[1:-1] if relative else limit
        try:
            value = float(number)
        except ValueError:
            value = -1.0
        if not number or not math.isfinite(value) or value < 0:
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

    def lines(self) -> list[str]:
        limits = ",".join(str(t) for t in self.thresholds)
        lines = [f"compared {self.compared} tests with the baseline on {limits}"]
        if self.regressions:
            lines.append(f"{len(self.regressions)} regressions:")
            rows = [
                (r.nodeid, r.metric, _fmt(r.old), _fmt(r.new), str(r.threshold))
                for r in self.regressions
            ]
            lines += format_table(("test", "metric", "baseline", "now", "limit"), rows)
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


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, indent: str = "  "
) -> list[str]:
    """Left-aligned columns two spaces apart, the header first."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return [
        indent
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
