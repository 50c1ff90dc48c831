"""``CompileWatcher``: compile, recompile and graph-break accounting for ``torch.compile``."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

from pytest_hotswap.watch.caches import CacheTracker, region_of
from pytest_hotswap.watch.counts import EventCounts
from pytest_hotswap.watch.events import (
    CAUSED_BY_LAYOUT,
    KIND_COMPILE,
    KIND_LAYOUT_CHANGE,
    KIND_RECOMPILE,
    CompileEvent,
    Step,
)
from pytest_hotswap.watch.guard import FailsAtGuard, GuardRefusal, is_refusal
from pytest_hotswap.watch.tap import LOCK, Observation, Tap

_COMPILE_ID = re.compile(r"(\d+)/(\d+)$")
T = TypeVar("T")


class CompileWatcher(EventCounts, FailsAtGuard):
    """Counts compiles, recompiles and graph breaks while active; re-entrant and nestable.

    Use as a context manager. Nested watchers each see the events inside their own scope;
    ``step`` and ``warmup`` also label the watchers that enclose this one, so library code can
    call them on ``CompileWatcher.current()`` and the test's own watcher sees the same labels.

    A recompile is dynamo's own notion: a compile of a frame whose region (the
    ``torch.compile(..., isolate_recompiles=True)`` call, or the shared default one) already
    holds a cache entry. At each step and at exit the watcher also reads dynamo's cache lists: a
    frame that, after a step, runs an entry compiled before the scope began instead of the one it
    ran before is a cache switch, which a fresh process would have seen as a recompile.

    A layout change (:meth:`record`) and the recompile or cache switch that follows it in the
    same step are one event, counted once: a fresh process sees one recompile there.
    Inside :meth:`fail_at_guard`, the recompile that would go past the allowance is refused at
    its guard (dynamo's ``error_on_recompile``), before anything is compiled.
    """

    _active: ClassVar[list[CompileWatcher]] = []

    def __init__(self) -> None:
        self.events: list[CompileEvent] = []
        self.steps: list[Step] = []
        self.context: dict[str, Any] = {}
        self._label: str | None = None
        self._stepped = False  # the current interval follows a step (not a warm-up)
        self._warmups = 0
        self._depth = 0
        self._graph_breaks_done = 0  # counted in earlier scopes of this watcher
        self._graph_breaks_at_enter: int | None = None
        self._caches: CacheTracker | None = None
        self._guard = GuardRefusal()  # inside fail_at_guard: refuses past the allowance
        #: Inside ``fail_at_guard(run_eagerly=True)`` (or set inside ``fail_at_guard``): a call
        #: refused at its guard is to run again eagerly (:func:`call_or_run_eagerly`).
        self.eager_after_refusal = False

    # -- scope ---------------------------------------------------------------------------------

    def __enter__(self) -> CompileWatcher:
        with LOCK:
            self._depth += 1
            if self._depth == 1:
                _TAP.acquire()
                self._graph_breaks_at_enter = _graph_break_count()
                self._caches = CacheTracker()
                CompileWatcher._active.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        with LOCK:
            self._depth -= 1
            if self._depth == 0:
                _TAP.collect()
                self.checkpoint()
                self._guard.stop()
                self._graph_breaks_done = self.graph_breaks
                self._graph_breaks_at_enter = None
                self._caches = None
                CompileWatcher._active.remove(self)
                _TAP.release()

    @classmethod
    def current(cls) -> CompileWatcher | None:
        """The innermost active watcher, or ``None`` outside any."""
        return cls._active[-1] if cls._active else None

    @property
    def active(self) -> bool:
        return self._depth > 0

    # -- labels --------------------------------------------------------------------------------

    def step(self, label: str, *, swap_ms: float | None = None) -> None:
        """Label what follows, e.g. ``"hotswap #2: style_b (rank 32)"``; a swap passes its latency."""
        for watcher in self._chain():
            watcher.checkpoint()
            watcher.steps.append(Step(label, swap_ms))
            watcher._label = label
            watcher._stepped = True
            watcher._update_refusal()

    @contextlib.contextmanager
    def warmup(self, label: str) -> Iterator[None]:
        """Compiles inside are first compiles of a new configuration, even when dynamo numbers
        them as recompiles (a second call signature of an already compiled model, say)."""
        chain = self._chain()
        saved = [(watcher, watcher._label, watcher._stepped) for watcher in chain]
        for watcher in chain:
            watcher.checkpoint()
            watcher._warmups += 1
            watcher._label = f"warmup: {label}"
            watcher._stepped = False
            watcher._update_refusal()  # a warm-up compiles first compiles: never refused
        try:
            yield
        finally:
            for watcher, previous, stepped in saved:
                watcher.checkpoint()
                watcher._warmups -= 1
                watcher._label = previous
                watcher._stepped = stepped
                watcher._update_refusal()

    def adopt(self, compiled: Any) -> None:
        """Count the compiled entries ``compiled`` holds now as run by this scope's own setup.

        The fixtures call it when they hand out a pipeline built (and compiled) by an earlier
        test: in a fresh process the same entries would have been compiled in this test's setup.
        """
        region = region_of(compiled)
        if region is None:
            return
        for watcher in self._chain():
            if watcher._caches is not None:
                watcher._caches.adopt(region)

    def record(self, event: CompileEvent) -> None:
        """Add an event found outside dynamo (a layout change) to this and enclosing watchers."""
        for watcher in self._chain():
            watcher._add(event)

    def checkpoint(self) -> None:
        """Read dynamo's cache lists now: a cache switch since the last reading becomes an event."""
        if self._caches is None:
            return
        for switch in self._caches.checkpoint(after_step=self._stepped and not self._warmups):
            self._add(switch.event(self._label))

    def _chain(self) -> list[CompileWatcher]:
        """This watcher and every active one that encloses it."""
        with LOCK:
            if self not in CompileWatcher._active:
                return [self]
            return CompileWatcher._active[: CompileWatcher._active.index(self) + 1]

    def _collect(self) -> None:
        if self.active:
            _TAP.collect()

    @property
    def graph_breaks(self) -> int:
        if self._graph_breaks_at_enter is None:
            return self._graph_breaks_done
        return self._graph_breaks_done + max(0, _graph_break_count() - self._graph_breaks_at_enter)

    def _observe(self, observation: Observation) -> None:
        if observation.refused and _repeats_a_refusal(self.events, observation):
            return
        kind = observation.failure or KIND_COMPILE
        if kind == KIND_COMPILE and (
            observation.refused  # dynamo itself judged it a recompile, and compiled nothing
            or (not observation.first_compile and not self._warmups and _is_recompile(observation))
        ):
            kind = KIND_RECOMPILE
        self._add(
            CompileEvent(
                compile_id=observation.compile_id,
                frame=observation.frame,
                filename=observation.filename,
                lineno=observation.lineno,
                kind=kind,
                reasons=observation.reasons,
                step=self._label,
                seconds=observation.seconds,
                stopped_at_guard=observation.refused,
            )
        )

    def _add(self, event: CompileEvent) -> None:
        """Append ``event``, or fold it into the layout change of this step that caused it."""
        pending = self._pending_layout() if event.kind in CAUSED_BY_LAYOUT else None
        if pending is None:
            self.events.append(event)
        else:
            self.events[pending] = event.caused_by(self.events[pending])
        self._update_refusal()

    def _pending_layout(self) -> int | None:
        """The index of a layout change of the current step that no recompile has joined yet.

        A swap records its layout change, then labels its step: what follows under that label
        (the next call's recompile, or its switch to an older entry) is what the change caused.
        """
        for index in range(len(self.events) - 1, -1, -1):
            event = self.events[index]
            if event.kind == KIND_LAYOUT_CHANGE and event.caused is None:
                return index if event.step == self._label else None
        return None


def _repeats_a_refusal(events: list[CompileEvent], observation: Observation) -> bool:
    """Whether this refusal repeats one of ``events``: the same frame failing the same guards
    again (a later call, or a call run again after the refusal). One recompile: in a fresh
    process the entry that recompile compiled serves the later calls."""
    return any(
        event.stopped_at_guard
        and (event.filename, event.lineno, event.frame)
        == (observation.filename, observation.lineno, observation.frame)
        and observation.reasons in (event.reasons, event.guards)
        for event in events
    )


def call_or_run_eagerly(call: Callable[[], T]) -> T:
    """``call()``; inside ``fail_at_guard(run_eagerly=True)``, a call dynamo refused at its guard
    runs again under ``torch.compiler.set_stance("force_eager")``: no compile, the output an
    eager run gives (what the refused recompile's graph computes). The refusal stays recorded."""
    try:
        return call()
    except Exception as error:
        watcher = CompileWatcher.current()
        if watcher is None or not watcher.eager_after_refusal or not is_refusal(error):
            raise
    import torch

    with torch.compiler.set_stance("force_eager"):
        return call()


def _is_recompile(observation: Observation) -> bool:
    """Dynamo's notion: the frame's region already held an entry (else: a compile id ``N/k>=1``)."""
    if observation.region_entries is not None:
        return observation.region_entries >= 1
    match = _COMPILE_ID.search(observation.compile_id)
    return bool(match and int(match.group(2)) >= 1)


def _graph_break_count() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _deliver(observation: Observation) -> None:
    for watcher in CompileWatcher._active:
        watcher._observe(observation)


_TAP = Tap(_deliver)
