"""Per-test compile records, the JSON report and the baseline comparison. No pytest, no torch.

(Interface stub: the reporting work owns and completes this module.)
"""

from __future__ import annotations

import dataclasses
from typing import Any


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
    swap_ms: list[float] = dataclasses.field(default_factory=list)
    recompile_events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    context: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_watcher(cls, nodeid: str, outcome: str, watcher: Any) -> TestRecord:
        """Build from a ``CompileWatcher`` (duck-typed: events, steps, context, counters)."""
        return cls(
            nodeid=nodeid,
            outcome=outcome,
            compiles=watcher.compiles,
            recompiles=watcher.recompiles,
            graph_breaks=watcher.graph_breaks,
            compile_s=sum(e.seconds or 0.0 for e in watcher.events),
            swap_ms=[s.swap_ms for s in watcher.steps if s.swap_ms is not None],
            recompile_events=[dataclasses.asdict(e) for e in watcher.events if e.kind != "compile"],
            context=dict(watcher.context),
        )
