"""Compile, recompile and graph-break accounting for ``torch.compile``, without pytest.

``CompileWatcher`` (``watcher.py``) counts what happens inside its scope from what torch already
records (``tap.py``) and from dynamo's cache lists read between steps (``caches.py``);
``events.py`` holds what it records and how that reads; ``isolation.py`` gives every
``torch.compile`` call its own cache entries, so a verdict does not depend on what ran before;
``profile.py`` does the same for dynamo's process-wide automatic-dynamic record.
"""

from __future__ import annotations

from pytest_hotswap.watch.events import (
    FAILING_KINDS,
    KIND_CACHE_SWITCH,
    KIND_COMPILE,
    KIND_CUDAGRAPH_RERECORD,
    KIND_CUDAGRAPH_SKIP,
    KIND_LAYOUT_CHANGE,
    KIND_RECOMPILE,
    KIND_STORM,
    KIND_UNOBSERVED,
    CompileEvent,
    RecompileError,
    Step,
    relevant_first,
    shorten_reason,
)
from pytest_hotswap.watch.watcher import CompileWatcher

__all__ = [
    "FAILING_KINDS",
    "KIND_CACHE_SWITCH",
    "KIND_COMPILE",
    "KIND_CUDAGRAPH_RERECORD",
    "KIND_CUDAGRAPH_SKIP",
    "KIND_LAYOUT_CHANGE",
    "KIND_RECOMPILE",
    "KIND_STORM",
    "KIND_UNOBSERVED",
    "CompileEvent",
    "CompileWatcher",
    "RecompileError",
    "Step",
    "relevant_first",
    "shorten_reason",
]
