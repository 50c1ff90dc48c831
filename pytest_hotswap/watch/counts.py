"""The numbers a :class:`~pytest_hotswap.watch.CompileWatcher` reads off its events."""

from __future__ import annotations

from pytest_hotswap.watch.events import (
    KIND_STORM,
    KIND_UNOBSERVED,
    CompileEvent,
    RecompileError,
    count_kinds,
    format_report,
    plural,
)


class EventCounts:
    """Counts over ``events``; ``_collect`` brings pending observations in before each reading."""

    events: list[CompileEvent]

    def _collect(self) -> None:
        """Nothing pending by default; a watcher reads dynamo's records here."""

    def checkpoint(self) -> None:
        """Nothing to read by default; a watcher reads dynamo's cache lists here."""

    @property
    def graph_breaks(self) -> int:
        return 0

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

    @property
    def compile_seconds(self) -> float:
        return sum(event.seconds for event in self.events)

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
