"""Compile, recompile and graph-break accounting for ``torch.compile``, without pytest.

``CompileWatcher`` reads what dynamo already records instead of wrapping anything that runs per
call of a compiled model:

* every frame compile ends with ``torch._dynamo.utils.record_compilation_metrics``, which hands a
  ``CompilationMetrics`` (compile id, code, timings) to ``log_compilation_event``, an INFO record on
  the ``torch._utils_internal`` logger. The bounded ``get_compilation_metrics()`` deque (64) and
  the compile callbacks (cleared by ``torch.compiler.reset()``) would both lose events.
* guard-failure texts are appended to ``torch._dynamo.utils.guard_failures`` (keyed by code object)
  just before the recompile they cause.
* past ``recompile_limit`` dynamo logs a WARNING on ``torch._dynamo.convert_frame`` and silently
  runs the frame eagerly from then on: a recompile storm.
* the same ``CompilationMetrics`` also go into dynamo's bounded ``get_compilation_metrics()``
  deque whatever the config and log levels say: one that the log tap never saw means code inside
  the scope turned ``log_compilation_metrics`` off or silenced the logger, and the watcher records
  that it was blind rather than pass a test whose recompiles it could not see.
* cudagraph trees announce every recording through ``torch._dynamo.callback_handler``; recording a
  compile id again is a re-record. Skips are WARNINGs on inductor's ``cudagraphs`` artifact logger.

Log records are observed with a logger filter: the logger is enabled for the level it needs while
any watcher is active and the filter drops again what the logger would not have emitted before, so
handlers see exactly what they saw without a watcher. Everything is put back when the last watcher
exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

KIND_COMPILE = "compile"
KIND_RECOMPILE = "recompile"
KIND_STORM = "storm"
KIND_CUDAGRAPH_RERECORD = "cudagraph_rerecord"
KIND_CUDAGRAPH_SKIP = "cudagraph_skip"
KIND_UNOBSERVED = "unobserved"

_METRICS_LOGGER = "torch._utils_internal"
_CONVERT_FRAME_LOGGER = "torch._dynamo.convert_frame"
_CUDAGRAPHS_LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"
_COMPILE_ID = re.compile(r"(\d+)/(\d+)$")
_FUNC_INFO = re.compile(r"'(?P<name>.*)' \((?P<file>.*):(?P<line>\d+)\)$")


class RecompileError(AssertionError):
    """More recompiles than allowed happened inside a ``CompileWatcher``; the message lists them."""


@dataclasses.dataclass(frozen=True)
class CompileEvent:
    """One compilation seen by a watcher.

    ``kind`` is ``"compile"`` (a first compile, fine) or one of the failing kinds: ``"recompile"``
    (dynamo compiled a frame that already had a cache entry), ``"storm"`` (the frame hit
    ``recompile_limit`` and now runs eagerly), ``"cudagraph_rerecord"``, ``"cudagraph_skip"`` or
    ``"unobserved"`` (compile metrics logging was turned off inside the scope: the watcher was blind).
    ``reasons`` holds dynamo's full guard-failure texts, newest cache entry first.
    """

    compile_id: str
    frame: str
    filename: str
    lineno: int
    kind: str
    reasons: tuple[str, ...]
    step: str | None
    seconds: float

    @property
    def is_recompile(self) -> bool:
        return self.kind != KIND_COMPILE

    def location(self) -> str:
        """``frame (short/path.py:line)``, the path shortened to what follows site-packages."""
        if not self.filename:
            return self.frame
        return f"{self.frame} ({_short_filename(self.filename)}:{self.lineno})"


@dataclasses.dataclass(frozen=True)
class Step:
    """A label for what follows (usually one swap) and, for a swap, its latency."""

    label: str
    swap_ms: float | None = None


@dataclasses.dataclass(frozen=True)
class _Observation:
    """What the tap saw, before each watcher adds its own step label and classification."""

    compile_id: str
    frame: str
    filename: str
    lineno: int
    reasons: tuple[str, ...]
    seconds: float
    failure: str | None = None  # a kind that fails whatever the compile id says
    first_compile: bool = False  # a backward or compiled-autograd graph: never a recompile


class CompileWatcher:
    """Counts compiles, recompiles and graph breaks while active; re-entrant and nestable.

    Use as a context manager. Nested watchers each see the events inside their own scope;
    ``step`` and ``warmup`` also label the watchers that enclose this one, so library code can
    call them on ``CompileWatcher.current()`` and the test's own watcher sees the same labels.
    """

    _active: ClassVar[list[CompileWatcher]] = []

    def __init__(self) -> None:
        self.events: list[CompileEvent] = []
        self.steps: list[Step] = []
        self.context: dict[str, Any] = {}
        self._label: str | None = None
        self._warmups = 0
        self._depth = 0
        self._graph_breaks_done = 0  # counted in earlier scopes of this watcher
        self._graph_breaks_at_enter: int | None = None

    # -- scope ---------------------------------------------------------------------------------

    def __enter__(self) -> CompileWatcher:
        with _LOCK:
            self._depth += 1
            if self._depth == 1:
                _TAP.acquire()
                self._graph_breaks_at_enter = _graph_break_count()
                CompileWatcher._active.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        with _LOCK:
            self._depth -= 1
            if self._depth == 0:
                _TAP.collect_unobserved()
                _TAP.collect_cudagraph_skips()
                self._graph_breaks_done = self.graph_breaks
                self._graph_breaks_at_enter = None
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
            watcher.steps.append(Step(label, swap_ms))
            watcher._label = label

    @contextlib.contextmanager
    def warmup(self, label: str) -> Iterator[None]:
        """Compiles inside are first compiles of a new model, even when dynamo numbers them ``N/k``.

        Every diffusers model compiles the same code object (``apply_lora_scale``'s ``wrapper``),
        so the first compile of a second model is, for dynamo, a recompile of that frame.
        """
        chain = self._chain()
        saved = [(watcher, watcher._label) for watcher in chain]
        for watcher in chain:
            watcher._warmups += 1
            watcher._label = f"warmup: {label}"
        try:
            yield
        finally:
            for watcher, previous in saved:
                watcher._warmups -= 1
                watcher._label = previous

    def _chain(self) -> list[CompileWatcher]:
        """This watcher and every active one that encloses it."""
        with _LOCK:
            if self not in CompileWatcher._active:
                return [self]
            return CompileWatcher._active[: CompileWatcher._active.index(self) + 1]

    # -- counts --------------------------------------------------------------------------------

    @property
    def compiles(self) -> int:
        """Every compilation attempt seen, first compiles and recompiles alike."""
        self._collect_unobserved()
        return len(self.events)

    @property
    def recompiles(self) -> int:
        """Recompiles, storms, cudagraph re-records or skips and unobserved compiles: what
        ``no_recompile`` fails on."""
        self._collect_unobserved()
        return sum(event.is_recompile for event in self.events)

    @property
    def had_storm(self) -> bool:
        """A frame hit ``recompile_limit``: it runs eagerly from then on and dynamo stops reporting."""
        return any(event.kind == KIND_STORM for event in self.events)

    @property
    def was_blind(self) -> bool:
        """Compile metrics logging was turned off (or its logger silenced) inside the scope."""
        self._collect_unobserved()
        return any(event.kind == KIND_UNOBSERVED for event in self.events)

    def _collect_unobserved(self) -> None:
        if self.active:
            _TAP.collect_unobserved()

    @property
    def graph_breaks(self) -> int:
        if self._graph_breaks_at_enter is None:
            return self._graph_breaks_done
        return self._graph_breaks_done + max(0, _graph_break_count() - self._graph_breaks_at_enter)

    @property
    def compile_seconds(self) -> float:
        return sum(event.seconds for event in self.events)

    def _observe(self, observation: _Observation) -> None:
        kind = observation.failure or KIND_COMPILE
        if kind == KIND_COMPILE and not observation.first_compile and not self._warmups:
            match = _COMPILE_ID.search(observation.compile_id)
            if match and int(match.group(2)) >= 1:
                kind = KIND_RECOMPILE
        self.events.append(
            CompileEvent(
                compile_id=observation.compile_id,
                frame=observation.frame,
                filename=observation.filename,
                lineno=observation.lineno,
                kind=kind,
                reasons=observation.reasons,
                step=self._label,
                seconds=observation.seconds,
            )
        )

    # -- verdicts ------------------------------------------------------------------------------

    def assert_no_recompile(self, max_recompiles: int = 0) -> None:
        """Raise ``RecompileError`` past ``max_recompiles``; a storm or a blind watcher always fails.

        After a storm dynamo runs the frame eagerly and stops reporting, and a watcher that missed
        compiles cannot tell recompiles apart: in both cases no count is trustworthy.
        """
        __tracebackhide__ = True
        if self.recompiles > max_recompiles or self.had_storm or self.was_blind:
            allowed = f"{max_recompiles} allowed" if max_recompiles else "none allowed"
            raise RecompileError(
                f"{_plural(self.recompiles, 'recompile')} ({allowed})\n{self.report()}"
            )

    def report(self) -> str:
        """A summary line, then each recompile grouped by the step it followed."""
        lines = [
            f"{_plural(self.compiles, 'compile')}, {_plural(self.recompiles, 'recompile')}, "
            f"{_plural(self.graph_breaks, 'graph break')}, {self.compile_seconds:.2f} s compiling"
        ]
        groups: list[tuple[str | None, list[CompileEvent]]] = []
        for event in self.events:
            if not event.is_recompile:
                continue
            if groups and groups[-1][0] == event.step:
                groups[-1][1].append(event)
            else:
                groups.append((event.step, [event]))
        for step, events in groups:
            where = f'after step "{step}"' if step is not None else "before any step"
            for event in events:
                lines.append(f"{_KIND_TITLES[event.kind]} {where}: {event.location()}")
                lines.extend(f"   {line}" for line in _reason_lines(event))
        return "\n".join(lines)


_KIND_TITLES = {
    KIND_RECOMPILE: "recompile",
    KIND_STORM: "recompile storm (recompile_limit hit, the frame now runs eagerly)",
    KIND_CUDAGRAPH_RERECORD: "cudagraph re-record",
    KIND_CUDAGRAPH_SKIP: "cudagraph skipped",
    KIND_UNOBSERVED: (
        "compile the watcher did not see (torch._dynamo.config.log_compilation_metrics was turned "
        "off, or the torch._utils_internal logger silenced, inside the watched scope; leave both "
        "on so recompiles can be counted)"
    ),
}


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _reason_lines(event: CompileEvent) -> list[str]:
    if not event.reasons:
        return ["(dynamo gave no reason)"] if event.kind == KIND_RECOMPILE else []
    first, *others = event.reasons
    guard = event.kind in (KIND_RECOMPILE, KIND_STORM)  # others' reasons are not guard texts
    lines = [f"guard: {shorten_reason(first)}" if guard else first]
    if others:
        lines.append(
            f"(and {len(others)} older cache {'entry' if len(others) == 1 else 'entries'} failed too)"
        )
    return lines


_MODULE_HOP = re.compile(
    r"(?:\.__dict__\[['\"]_modules['\"]\]|\._modules|\._parameters|\._buffers|\.__dict__)"
    r"\[['\"]([^'\"]+)['\"]\]"
)
_ROOT_SOURCE = re.compile(r"L\[['\"](\w+)['\"]\]")
_DOTTED_PATH = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.\w+)+")


def shorten_reason(reason: str, keep_head: int = 3, keep_tail: int = 4) -> str:
    """First line of a guard-failure text, compile id prefix dropped, module paths made readable.

    ``self.__dict__['_modules']['mid_block']._modules['attentions']...['to_k']...`` becomes
    ``mid_block.attentions.0...to_k.lora_A.default.weight``; the event keeps the full text.
    """
    lines = reason.strip().splitlines()
    text = lines[0] if lines else ""
    text = re.sub(r"^\d+/\d+: ", "", text)
    text = re.sub(r"\s+#.*$", "", text)  # the source line dynamo appends as a comment
    text = _MODULE_HOP.sub(r".\1", _ROOT_SOURCE.sub(r"\1", text))

    def shorten(match: re.Match[str]) -> str:
        parts = match.group(0).split(".")
        if len(parts) <= keep_head + keep_tail:
            return match.group(0)
        if parts[0] == "self":
            parts = parts[1:]
        return f"{'.'.join(parts[:keep_head])}...{'.'.join(parts[-keep_tail:])}"

    return _DOTTED_PATH.sub(shorten, text)


def _short_filename(filename: str) -> str:
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in filename:
            return filename.rsplit(marker, 1)[1]
    with contextlib.suppress(ValueError):
        relative = os.path.relpath(filename)
        if not relative.startswith(".."):
            return relative
    return filename


def _graph_break_count() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


# -- the tap: one set of observers shared by all active watchers ---------------------------------


class _LogTap(logging.Filter):
    """Sees a logger's records at ``level`` and above without changing what its handlers get."""

    def __init__(
        self, logger_name: str, level: int, on_record: Callable[[logging.LogRecord], None]
    ):
        super().__init__()
        self._logger = logging.getLogger(logger_name)
        self._level = level
        self._on_record = on_record
        self._threshold = logging.NOTSET
        self._saved_level: int | None = None

    def install(self) -> None:
        self._threshold = self._logger.getEffectiveLevel()
        self._saved_level = None
        if self._threshold > self._level:
            self._saved_level = self._logger.level
            self._logger.setLevel(self._level)
        self._logger.addFilter(self)

    def uninstall(self) -> None:
        self._logger.removeFilter(self)
        if self._saved_level is not None and self._logger.level == self._level:
            self._logger.setLevel(self._saved_level)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._on_record(record)
        except Exception:  # a watcher must never break the compile it observes
            logging.getLogger(__name__).exception("CompileWatcher failed to read a log record")
        return record.levelno >= self._threshold


class _Tap:
    """Installed while at least one watcher is active; turns torch's records into observations."""

    def __init__(self) -> None:
        self._users = 0
        self._log_taps = [
            _LogTap(_METRICS_LOGGER, logging.INFO, self._on_metrics_record),
            _LogTap(_CONVERT_FRAME_LOGGER, logging.WARNING, self._on_convert_frame_record),
            _LogTap(_CUDAGRAPHS_LOGGER, logging.WARNING, self._on_cudagraphs_record),
        ]
        self._restore_config: Callable[[], None] | None = None
        self._guard_failures_seen: dict[Any, int] = {}
        self._cudagraph_recordings: dict[str, int] = {}
        self._cudagraph_skips_seen = 0
        self._cudagraph_skips_logged = 0
        self._storm_ids: set[str] = set()  # compile ids already reported as a storm
        # Every CompilationMetrics known while acquired, kept alive so their ids stay unique.
        self._metrics_known: dict[int, Any] = {}
        self._metrics_flag_off_reported = False

    def acquire(self) -> None:
        self._users += 1
        if self._users > 1:
            return
        import torch._dynamo
        from torch._dynamo.utils import counters, get_compilation_metrics, guard_failures

        config = torch._dynamo.config
        if not config.log_compilation_metrics:
            patch = config.patch(log_compilation_metrics=True)
            patch.__enter__()
            self._restore_config = lambda: patch.__exit__(None, None, None)
        self._guard_failures_seen = {code: len(texts) for code, texts in guard_failures.items()}
        self._metrics_known = {id(m): m for m in get_compilation_metrics()}
        self._metrics_flag_off_reported = False
        self._cudagraph_skips_seen = counters["inductor"]["cudagraph_skips"]
        self._cudagraph_skips_logged = 0
        for tap in self._log_taps:
            tap.install()
        self._ensure_callback()

    def release(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        import torch._dynamo

        for tap in self._log_taps:
            tap.uninstall()
        handler = torch._dynamo.callback_handler
        if self._on_compile_start in handler.start_callbacks:
            handler.remove_start_callback(self._on_compile_start)
        if self._restore_config is not None:
            self._restore_config()
            self._restore_config = None
        self._guard_failures_seen.clear()
        self._storm_ids.clear()
        self._metrics_known.clear()

    def _ensure_callback(self) -> None:
        """(Re-)register the cudagraph-recording callback; ``torch.compiler.reset()`` drops it."""
        import torch._dynamo

        handler = torch._dynamo.callback_handler
        if self._on_compile_start not in handler.start_callbacks:
            handler.register_start_callback(self._on_compile_start)

    def _emit(self, observation: _Observation) -> None:
        with _LOCK:
            for watcher in CompileWatcher._active:
                watcher._observe(observation)

    # -- sources -------------------------------------------------------------------------------

    def _on_metrics_record(self, record: logging.LogRecord) -> None:
        metrics = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if type(metrics).__name__ != "CompilationMetrics":
            return
        self._metrics_known[id(metrics)] = metrics
        if metrics.is_runtime:
            return
        self._ensure_callback()
        compile_id = metrics.compile_id or "?"
        if (
            compile_id in self._storm_ids
            or "recompile limit exceeded" in (metrics.fail_reason or "").lower()
        ):
            return  # reported, with its frame, by the convert_frame warning just before
        self._cudagraph_recordings.pop(compile_id, None)  # a fresh compile of this id
        frame, filename = metrics.co_name or "?", metrics.co_filename or ""
        lineno = metrics.co_firstlineno or 0
        reasons = self._new_guard_failures(frame, filename, lineno)
        if not reasons and metrics.recompile_reason:
            reasons = (metrics.recompile_reason,)
        seconds = metrics.entire_frame_compile_time_s
        if seconds is None and metrics.start_time_us and metrics.end_time_us:
            seconds = (metrics.end_time_us - metrics.start_time_us) / 1e6
        backward = metrics.is_forward is False
        self._emit(
            _Observation(
                compile_id=compile_id,
                frame=f"{frame} (backward)" if backward else frame,
                filename=filename,
                lineno=lineno,
                reasons=reasons,
                seconds=seconds or 0.0,
                first_compile=backward or compile_id.startswith("!"),
            )
        )
        self.collect_cudagraph_skips()

    def _on_convert_frame_record(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("torch._dynamo hit config.") or len(record.args) < 4:
            return
        limit_type, limit, func_info, last_reason = record.args[:4]
        match = _FUNC_INFO.match(str(func_info))
        frame, filename, lineno = (
            (match["name"], match["file"], int(match["line"])) if match else (str(func_info), "", 0)
        )
        reasons = self._new_guard_failures(frame, filename, lineno) or (
            (str(last_reason),) if last_reason else ()
        )
        limit_note = f"torch._dynamo.config.{limit_type} = {limit} reached"
        compile_id = _current_compile_id()
        self._storm_ids.add(compile_id)
        self._emit(
            _Observation(
                compile_id=compile_id,
                frame=frame,
                filename=filename,
                lineno=lineno,
                reasons=(*reasons, limit_note),
                seconds=0.0,
                failure=KIND_STORM,
            )
        )

    def _on_cudagraphs_record(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("skipping cudagraphs"):
            self._cudagraph_skips_logged += 1
            self._emit_cudagraph_skip(message)

    def collect_unobserved(self) -> None:
        """Compiles dynamo recorded but the log tap never saw, as failing events, once each.

        Also fails once when ``log_compilation_metrics`` is off now although it was on (or put on)
        at acquire: compiles after this point would go unseen.
        """
        import torch._dynamo
        from torch._dynamo.utils import get_compilation_metrics

        with _LOCK:
            if not self._users:
                return
            for metrics in get_compilation_metrics():
                if id(metrics) in self._metrics_known:
                    continue
                self._metrics_known[id(metrics)] = metrics
                if metrics.is_runtime:
                    continue
                self._emit(
                    _Observation(
                        compile_id=metrics.compile_id or "?",
                        frame=metrics.co_name or "?",
                        filename=metrics.co_filename or "",
                        lineno=metrics.co_firstlineno or 0,
                        reasons=(),
                        seconds=metrics.entire_frame_compile_time_s or 0.0,
                        failure=KIND_UNOBSERVED,
                    )
                )
            if (
                not torch._dynamo.config.log_compilation_metrics
                and not self._metrics_flag_off_reported
            ):
                self._metrics_flag_off_reported = True
                flag = "torch._dynamo.config.log_compilation_metrics"
                self._emit(
                    _Observation("?", flag, "", 0, (f"{flag} is False",), 0.0, KIND_UNOBSERVED)
                )

    def collect_cudagraph_skips(self) -> None:
        """Skips counted by inductor but not logged (the cudagraphs logger may be silenced)."""
        if not self._users:
            return
        from torch._dynamo.utils import counters

        total = counters["inductor"]["cudagraph_skips"]
        unlogged = total - self._cudagraph_skips_seen - self._cudagraph_skips_logged
        self._cudagraph_skips_seen = total
        self._cudagraph_skips_logged = 0
        if _cuda_in_use():
            for _ in range(max(0, unlogged)):
                self._emit_cudagraph_skip("skipping cudagraphs (reason not logged)")

    def _emit_cudagraph_skip(self, message: str) -> None:
        self._emit(
            _Observation(
                _current_compile_id(), "cudagraphs", "", 0, (message,), 0.0, KIND_CUDAGRAPH_SKIP
            )
        )

    def _on_compile_start(self, args: Any) -> None:
        from torch._dynamo.callback import CallbackTrigger

        if args.callback_trigger is not CallbackTrigger.CUDAGRAPH_RECORDING:
            return
        count = self._cudagraph_recordings.get(args.compile_id, 0) + 1
        self._cudagraph_recordings[args.compile_id] = count
        if count > 1:
            reason = f"compile {args.compile_id} recorded {count} times (inputs or static addresses changed)"
            self._emit(
                _Observation(
                    args.compile_id, "cudagraphs", "", 0, (reason,), 0.0, KIND_CUDAGRAPH_RERECORD
                )
            )

    def _new_guard_failures(self, frame: str, filename: str, lineno: int) -> tuple[str, ...]:
        """Guard-failure texts dynamo appended for this frame since the last look, relevant first."""
        from torch._dynamo.utils import guard_failures

        found: list[str] = []
        for code, texts in list(guard_failures.items()):
            if (code.co_name, code.co_filename, code.co_firstlineno) != (frame, filename, lineno):
                continue
            seen = self._guard_failures_seen.get(code, 0)
            if seen > len(texts):  # guard_failures was cleared by a reset
                seen = 0
            found.extend(texts[seen:])
            self._guard_failures_seen[code] = len(texts)
        return relevant_first(found)


# A cache entry whose first failing guard is about the call's structure belongs to another model
# or call signature sharing the frame (every diffusers model compiles apply_lora_scale's wrapper).
_STRUCTURAL_GUARD = re.compile(
    r"^(\d+/\d+: )?(len\((args|kwargs)\) == \d+|not args\b|___check_(type|obj)_id\(self\b)"
)


def relevant_first(reasons: Iterable[str]) -> tuple[str, ...]:
    """Dynamo's reasons with those of entries for other models or call signatures moved last.

    The order is otherwise kept, so the first reason is the guard that failed for the model
    that was called: a LoRA shape or a scaling, rather than ``len(args) == 2`` of another model.
    """
    reasons = tuple(reasons)
    return tuple(sorted(reasons, key=lambda reason: bool(_STRUCTURAL_GUARD.match(reason))))


def _current_compile_id() -> str:
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    return str(compile_id) if compile_id is not None else "?"


def _cuda_in_use() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


_LOCK = threading.RLock()
_TAP = _Tap()
