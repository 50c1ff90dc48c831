"""The JSON report of a run (:class:`Report`): its records and what they were measured with,
read back with every field checked, written atomically."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pytest_hotswap.report.records import (
    SCHEMA_VERSION,
    ReportError,
    TestRecord,
    json_kind,
    show,
)
from pytest_hotswap.report.tables import fmt, format_table
from pytest_hotswap.stacks import STACK_PACKAGES, installed_version
from pytest_hotswap.watch.events import KIND_RECOMPILE, count_kinds


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
            raise ReportError(f"a report must be a JSON object, got {json_kind(data)}")
        version = data.get("schema_version")
        if isinstance(version, bool) or version != SCHEMA_VERSION:
            raise ReportError(
                f"schema_version {show(version)} is not {SCHEMA_VERSION}: write the report again "
                "with this pytest-hotswap version"
            )
        if "tests" not in data:
            raise ReportError("not a pytest-hotswap report: it has no 'tests' list")
        tests = data["tests"]
        if not isinstance(tests, list):
            raise ReportError(f"'tests' must be a list, got {show(tests)}")
        versions = data.get("versions", {})
        if not isinstance(versions, Mapping) or not all(
            isinstance(v, str) for v in versions.values()
        ):
            raise ReportError(f"'versions' must map package names to strings, got {show(versions)}")
        workers = data.get("xdist_workers", 0)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ReportError(f"'xdist_workers' must be an integer >= 0, got {show(workers)}")
        created = data.get("created", "")
        if not isinstance(created, str):
            raise ReportError(f"'created' must be a string, got {show(created)}")
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
        stopped = sum(t.stopped_at_guard for t in tests)
        if stopped:
            lines.append(
                f"stopped at the guard: {stopped} test{'s' if stopped != 1 else ''} (a recompile "
                "past the allowance was refused before compiling; --hotswap-count-all compiles on)"
            )
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
                    fmt(t.median_swap_ms),
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
