"""Failing at the guard: refuse the recompile that would spend more than a test's allowance.

Dynamo's ``error_on_recompile`` makes a guard failure raise ``torch._dynamo.exc.RecompileError``
naming the guard, before any tracing or compiling, and leaves first compiles alone. The setting
is ``compile_ignored``: switching it throws no compiled code away. A :class:`GuardRefusal`
switches it on exactly when the next recompile would go past the allowance, from the watcher's
own count, and puts the earlier value back at the end.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from pytest_hotswap.watch.tap import LOCK


class GuardRefusal:
    """The allowance of one :class:`~pytest_hotswap.watch.CompileWatcher` and dynamo's flag."""

    def __init__(self) -> None:
        self.allowance: int | None = None  # recompiles allowed; None: not refusing
        self._flag_before: bool | None = None  # error_on_recompile before the first start

    def start(self, max_recompiles: int) -> int | None:
        """Refuse past ``max_recompiles`` from now on; returns the enclosing allowance."""
        import torch._dynamo

        outer = self.allowance
        if outer is None:
            self._flag_before = bool(torch._dynamo.config.error_on_recompile)
        self.allowance = max_recompiles
        return outer

    def update(self, *, spent: int, pending_layout: bool, warming_up: bool) -> None:
        """Set the flag for the next recompile: on once it would spend too much.

        The recompile a pending layout change causes costs nothing (it joins that event, already
        counted); a warm-up compiles first compiles and is never refused.
        """
        if self.allowance is None:
            return
        import torch._dynamo

        cost = 0 if pending_layout else 1
        refuse = not warming_up and spent + cost > self.allowance
        torch._dynamo.config.error_on_recompile = bool(self._flag_before) or refuse

    def stop(self) -> None:
        """Put dynamo's flag back as it was before the first :meth:`start`."""
        if self.allowance is None:
            return
        import torch._dynamo

        torch._dynamo.config.error_on_recompile = bool(self._flag_before)
        self.allowance = None
        self._flag_before = None


def is_refusal(error: BaseException) -> bool:
    """Whether ``error`` is, or was raised from, dynamo's refusal of a recompile
    (``torch._dynamo.exc.RecompileError``); a caller may have wrapped it."""
    exc = sys.modules.get("torch._dynamo.exc")
    if exc is None:
        return False
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, exc.RecompileError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


class FailsAtGuard:
    """The ``fail_at_guard`` half of :class:`~pytest_hotswap.watch.CompileWatcher`: it reads the
    watcher's events, warm-ups and pending layout change, and sets the :class:`GuardRefusal`."""

    _guard: GuardRefusal
    events: list[Any]
    eager_after_refusal: bool
    _warmups: int
    active: bool
    _pending_layout: Callable[[], int | None]

    @contextlib.contextmanager
    def fail_at_guard(
        self, max_recompiles: int = 0, *, run_eagerly: bool = False
    ) -> Iterator[None]:
        """Inside, the recompile that would go past ``max_recompiles`` is refused at its guard.

        Dynamo then raises ``torch._dynamo.exc.RecompileError`` naming the guard, before any
        tracing or compiling; the refused attempt is an event with ``stopped_at_guard``. The
        first ``max_recompiles`` recompiles compile as usual, and so does the one a pending
        layout change caused (it joins that event, which is already counted). First compiles,
        warm-ups and storms of frames still within the allowance are never refused. Cache
        switches, layout changes and cudagraph events count towards the allowance but cannot be
        stopped: they fail the verdict afterwards. ``error_on_recompile`` is put back on exit.

        ``run_eagerly=True``: a call made through :func:`call_or_run_eagerly` (as
        ``HotswapPipeline.run``) runs again eagerly after its refusal, so the checks after it
        still run. A refusal repeated on a later call is the same recompile, counted once.
        """
        if not self.active:
            raise RuntimeError("fail_at_guard() needs an active CompileWatcher (use it inside)")
        with LOCK:
            outer = self._guard.start(max_recompiles)
            eager_before, self.eager_after_refusal = self.eager_after_refusal, run_eagerly
            self._update_refusal()
        try:
            yield
        finally:
            with LOCK:
                self.eager_after_refusal = eager_before
                if outer is None:
                    self._guard.stop()
                else:
                    self._guard.allowance = outer
                    self._update_refusal()

    def _update_refusal(self) -> None:
        self._guard.update(
            spent=sum(event.is_recompile for event in self.events),
            pending_layout=self._pending_layout() is not None,
            warming_up=bool(self._warmups),
        )
