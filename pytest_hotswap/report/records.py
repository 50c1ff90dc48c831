"""The records of a run: one per watched test, with its swaps and events, every field checked
when read back (a problem is a :class:`ReportError` naming the test and the field)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping
from typing import Any

from pytest_hotswap.watch.events import (
    KIND_CACHE_SWITCH,
    KIND_LAYOUT_CHANGE,
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
    # no_recompile refused a recompile at its guard: the test stopped there, nothing compiled
    stopped_at_guard: bool = False
    swaps: list[SwapRecord] = dataclasses.field(default_factory=list)
    events: list[CompileEvent] = dataclasses.field(default_factory=list)
    # What the fixtures put in ``CompileWatcher.context``: pipeline, implementation, backend, device.
    context: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The device the test ran on (``cpu``, ``cuda:1``: --hotswap-devices); "" in older reports.
    device: str = ""

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
            stopped_at_guard=bool(getattr(watcher, "stopped_at_guard", False)),
            swaps=[SwapRecord(s.label, s.swap_ms) for s in watcher.steps if s.swap_ms is not None],
            events=[event for event in watcher.events if event.is_recompile],
            context={key: _json_value(value) for key, value in watcher.context.items()},
        )

    @classmethod
    def from_dict(cls, data: Any) -> TestRecord:
        """Read one test's record, checking every field; a problem is a ``ReportError``."""
        if not isinstance(data, Mapping):
            raise ReportError(f"a test record must be a JSON object, got {json_kind(data)}")
        nodeid = data.get("nodeid")
        if not isinstance(nodeid, str):
            raise ReportError(f"a test record's 'nodeid' must be a string, got {show(nodeid)}")
        where = f"test {nodeid!r}"
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ReportError(f"{where}: unknown fields {unknown}")
        outcome = data.get("outcome")
        if outcome not in OUTCOMES:
            raise ReportError(
                f"{where}: 'outcome' must be one of {', '.join(OUTCOMES)}, got {show(outcome)}"
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
        stopped = data.get("stopped_at_guard", False)
        if not isinstance(stopped, bool):
            raise ReportError(
                f"{where}: 'stopped_at_guard' must be true or false, got {show(stopped)}"
            )
        context = data.get("context", {})
        device = data.get("device", "")
        if not isinstance(device, str):
            raise ReportError(f"{where}: 'device' must be a string, got {show(device)}")
        if not isinstance(context, Mapping):
            raise ReportError(f"{where}: 'context' must be an object, got {show(context)}")
        try:
            parsed_events = [CompileEvent.from_dict(_mapping(event)) for event in events]
        except ValueError as error:
            raise ReportError(f"{where}: {error}") from None
        return cls(
            nodeid=nodeid,
            outcome=outcome,
            compile_s=_seconds(where, "compile_s", data.get("compile_s", 0.0)),
            stopped_at_guard=stopped,
            swaps=[_swap(where, swap) for swap in swaps],
            events=parsed_events,
            context=dict(context),
            device=device,
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


def json_kind(value: Any) -> str:
    """How an error names the JSON type of a wrong value: ``null``, ``a JSON list`` ..."""
    return "null" if value is None else f"a JSON {type(value).__name__}"


def show(value: Any) -> str:
    """A wrong value as an error shows it: as JSON where it is JSON, else its repr."""
    return json.dumps(value) if _jsonable(value) else repr(value)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"an event must be an object, got {show(value)}")
    return value


def _count(where: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReportError(f"{where}: {name!r} must be an integer >= 0, got {show(value)}")
    return value


def _seconds(where: str, name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ReportError(f"{where}: {name!r} must be a finite number >= 0, got {show(value)}")
    return float(value)


def _list(where: str, name: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ReportError(f"{where}: {name!r} must be a list, got {show(value)}")
    return value


def _swap(where: str, value: Any) -> SwapRecord:
    if not isinstance(value, Mapping) or set(value) != {"label", "ms"}:
        raise ReportError(
            f"{where}: each swap must be an object with 'label' and 'ms', got {show(value)}"
        )
    if not isinstance(value["label"], str):
        raise ReportError(f"{where}: a swap's 'label' must be a string, got {show(value['label'])}")
    return SwapRecord(value["label"], _seconds(where, "ms", value["ms"]))


def _json_value(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
