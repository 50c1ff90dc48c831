"""``CompileWatcher``: compile, recompile and graph-break accounting for ``torch.compile``."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any, ClassVar

from pytest_hotswap.watch.caches import CacheTracker, region_of
from pytest_hotswap.watch.events import (
    CAUSED_BY_LAYOUT,
    KIND_CACHE_SWITCH,
    KIND_COMPILE,
    KIND_LAYOUT_CHANGE,
    KIND_RECOMPILE,
    KIND_STORM,
    KIND_UNOBSERVED,
    CompileEvent,
    RecompileError,
    Step,
    count_kinds,
    format_report,
    plural,
)
from pytest_hotswap.watch.tap import LOCK, Observation, Tap

_COMPILE_ID = re.compile(r"(\d+)/(\d+)$")


class CompileWatcher:
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
        self._allowance: int | None = None  # inside fail_at_guard: recompiles allowed
        self._flag_before: bool | None = None  # error_on_recompile before fail_at_guard

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
                self._stop_refusing()
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
        switches = self._caches.checkpoint(after_step=self._stepped and not self._warmups)
        for switch in switches:
            code = switch.code
            self._add(
                CompileEvent(
                    compile_id=switch.entry,
                    frame=code.co_name,
                    filename=code.co_filename,
                    lineno=code.co_firstlineno,
                    kind=KIND_CACHE_SWITCH,
                    reasons=switch.reasons,
                    step=self._label,
                    seconds=0.0,
                )
            )

    def _chain(self) -> list[CompileWatcher]:
        """This watcher and every active one that encloses it."""
        with LOCK:
            if self not in CompileWatcher._active:
                return [self]
            return CompileWatcher._active[: CompileWatcher._active.index(self) + 1]

    # -- counts --------------------------------------------------------------------------------

    @property
    def compiles(self) -> int:
        """Every compilation attempt seen, first compiles and recompiles alike."""
        self._collect()
        return sum(event.compiled for event in self.events)

    @property
    def recompiles(self) -> int:
        """Every event that fails ``no_recompile``: recompiles, storms, cache switches, layout
        changes, cudagraph re-records or skips, and compiles the watcher could not see."""
        self._collect()
        return sum(event.is_recompile for event in self.events)

    def counts(self) -> dict[str, int]:
        """How many events of each failing kind happened."""
        self._collect()
        return count_kinds(self.events)

    @property
    def stopped_at_guard(self) -> bool:
        """A recompile was refused at its guard inside :meth:`fail_at_guard` (nothing compiled)."""
        self._collect()
        return any(event.stopped_at_guard for event in self.events)

    @property
    def had_storm(self) -> bool:
        """A frame hit ``recompile_limit``: it runs eagerly from then on and dynamo stops reporting."""
        self._collect()
        return any(event.kind == KIND_STORM for event in self.events)

    @property
    def was_blind(self) -> bool:
        """Compile metrics logging was turned off (or its logger silenced) inside the scope."""
        self._collect()
        return any(event.kind == KIND_UNOBSERVED for event in self.events)

    def _collect(self) -> None:
        if self.active:
            _TAP.collect()

    @property
    def graph_breaks(self) -> int:
        if self._graph_breaks_at_enter is None:
            return self._graph_breaks_done
        return self._graph_breaks_done + max(0, _graph_break_count() - self._graph_breaks_at_enter)

    @property
    def compile_seconds(self) -> float:
        return sum(event.seconds for event in self.events)

    def _observe(self, observation: Observation) -> None:
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

    # -- failing at the guard ------------------------------------------------------------------

    @contextlib.contextmanager
    def fail_at_guard(self, max_recompiles: int = 0) -> Iterator[None]:
        """Inside, the recompile that would go past ``max_recompiles`` is refused at its guard.

        Dynamo then raises ``torch._dynamo.exc.RecompileError`` naming the guard, before any
        tracing or compiling; the refused attempt is an event with ``stopped_at_guard``. The
        first ``max_recompiles`` recompiles compile as usual, and so does the one a pending
        layout change caused (it joins that event, which is already counted). First compiles,
        warm-ups and storms of frames still within the allowance are never refused. Cache
        switches, layout changes and cudagraph events count towards the allowance but cannot be
        stopped: they fail the verdict afterwards. ``error_on_recompile`` is put back on exit.
        """
        if not self.active:
            raise RuntimeError("fail_at_guard() needs an active CompileWatcher (use it inside)")
        import torch._dynamo

        with LOCK:
            outer = self._allowance
            if outer is None:
                self._flag_before = bool(torch._dynamo.config.error_on_recompile)
            self._allowance = max_recompiles
            self._update_refusal()
        try:
            yield
        finally:
            with LOCK:
                if outer is None:
                    self._stop_refusing()
                else:
                    self._allowance = outer
                    self._update_refusal()

    def _update_refusal(self) -> None:
        """Set ``error_on_recompile`` for the next recompile: on once it would spend too much."""
        if self._allowance is None:
            return
        import torch._dynamo

        spent = sum(event.is_recompile for event in self.events)
        cost = 0 if self._pending_layout() is not None else 1
        refuse = not self._warmups and spent + cost > self._allowance
        torch._dynamo.config.error_on_recompile = bool(self._flag_before) or refuse

    def _stop_refusing(self) -> None:
        if self._allowance is None:
            return
        import torch._dynamo

        torch._dynamo.config.error_on_recompile = bool(self._flag_before)
        self._allowance = None
        self._flag_before = None

    # -- verdicts ------------------------------------------------------------------------------

    def assert_no_recompile(self, max_recompiles: int = 0) -> None:
        """Raise ``RecompileError`` past ``max_recompiles``; a storm or a blind watcher always fails.

        After a storm dynamo runs the frame eagerly and stops reporting, and a watcher that missed
        compiles cannot tell recompiles apart: in both cases no count is trustworthy.
        """
        __tracebackhide__ = True
        self.checkpoint()
        if self.recompiles > max_recompiles or self.had_storm or self.was_blind:
            allowed = f"{max_recompiles} allowed" if max_recompiles else "none allowed"
            raise RecompileError(
                f"{plural(self.recompiles, 'recompile')} ({allowed})\n{self.report()}"
            )

    def report(self) -> str:
        """A summary line, then each recompile (or other failing event) grouped by its step."""
        self._collect()
        return "\n".join(format_report(self.events, self.graph_breaks))


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
