"""The tap: turns what torch already records into observations for the active watchers.

Nothing here runs per call of a compiled model. Each source reads one of torch's records:

* :class:`MetricsSource`: every frame compile ends with ``record_compilation_metrics``, which
  hands a ``CompilationMetrics`` (compile id, code, timings, the region's entry count) to
  ``log_compilation_event``, an INFO record on the ``torch._utils_internal`` logger. The same
  metrics also go into dynamo's bounded ``get_compilation_metrics()`` deque whatever the config
  and log levels say: one the log never showed means the logger was silenced or metrics logging
  turned off inside the scope; it is still read, as a storm when it is one, else as a compile the
  watcher did not see, so a blind watcher fails rather than passes.
* :class:`RecompileLimitSource`: past ``recompile_limit`` dynamo logs a WARNING on
  ``torch._dynamo.convert_frame`` and silently runs the frame eagerly from then on (a storm). The
  metrics record of that attempt says so too, so a quieted dynamo logger hides nothing.
* :class:`GuardFailures`: guard-failure texts dynamo appends to ``guard_failures`` (keyed by code
  object) just before the recompile they cause.
* :class:`CudagraphSource`: cudagraph trees announce each recording through
  ``torch._dynamo.callback_handler`` (recording a compile id again is a re-record); skips are
  WARNINGs on inductor's ``cudagraphs`` artifact logger and are counted in ``counters``.

Log records are read with a logger filter: the logger is enabled for the level it needs while any
watcher is active, and the filter drops again what the logger would not have emitted before, so
handlers see exactly what they saw without a watcher. Everything is put back at the last release.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from pytest_hotswap.watch.events import (
    KIND_CUDAGRAPH_RERECORD,
    KIND_CUDAGRAPH_SKIP,
    KIND_STORM,
    KIND_UNOBSERVED,
    relevant_first,
)

_METRICS_LOGGER = "torch._utils_internal"
_CONVERT_FRAME_LOGGER = "torch._dynamo.convert_frame"
_CUDAGRAPHS_LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"
_FUNC_INFO = re.compile(r"'(?P<name>.*)' \((?P<file>.*):(?P<line>\d+)\)$")
_LIMIT_EXCEEDED = "recompile limit exceeded"
# The metrics of a recompile ``torch._dynamo.config.error_on_recompile`` refused at its guard,
# before any tracing: the attempt is recorded with this failure type and no compile time.
_REFUSED = "RecompileError"

LOCK = threading.RLock()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Observation:
    """What the tap saw, before each watcher adds its own step label and classification."""

    compile_id: str
    frame: str
    filename: str = ""
    lineno: int = 0
    reasons: tuple[str, ...] = ()
    seconds: float = 0.0
    failure: str | None = None  # a kind that fails whatever else is known
    first_compile: bool = False  # a backward or compiled-autograd graph: never a recompile
    region_entries: int | None = None  # entries the frame's region held before this compile
    refused: bool = False  # dynamo refused this recompile at its guard (error_on_recompile)


Emit = Callable[[Observation], None]


class LogTap(logging.Filter):
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


class GuardFailures:
    """Reads the guard-failure texts dynamo appended for a frame since the last look."""

    def __init__(self) -> None:
        self._seen: dict[Any, int] = {}

    def start(self) -> None:
        from torch._dynamo.utils import guard_failures

        self._seen = {code: len(texts) for code, texts in guard_failures.items()}

    def stop(self) -> None:
        self._seen.clear()

    def new_for(self, frame: str, filename: str, lineno: int) -> tuple[str, ...]:
        from torch._dynamo.utils import guard_failures

        found: list[str] = []
        for code, texts in list(guard_failures.items()):
            if (code.co_name, code.co_filename, code.co_firstlineno) != (frame, filename, lineno):
                continue
            seen = self._seen.get(code, 0)
            if seen > len(texts):  # guard_failures was cleared by a reset
                seen = 0
            found.extend(texts[seen:])
            self._seen[code] = len(texts)
        return relevant_first(found)


class MetricsSource:
    """Compiles from the metrics log records, and from dynamo's deque when the log was silent."""

    def __init__(self, emit: Emit, guards: GuardFailures, storms: set[str]) -> None:
        self._emit = emit
        self._guards = guards
        self._storms = storms  # compile ids already reported as a storm
        # frame id ("3" of "3/8") -> (name, file, line): a storm's record may carry none
        self._frames: dict[str, tuple[str, str, int]] = {}
        self._known: dict[int, Any] = {}  # every metrics object seen, kept alive so ids stay unique
        self._flag_off_reported = False
        self.tap = LogTap(_METRICS_LOGGER, logging.INFO, self._on_record)
        self.on_compile: Callable[[], None] = lambda: None

    def start(self) -> None:
        from torch._dynamo.utils import get_compilation_metrics

        self._known = {id(m): m for m in get_compilation_metrics()}
        self._flag_off_reported = False
        self.tap.install()

    def stop(self) -> None:
        self.tap.uninstall()
        self._known.clear()

    def _on_record(self, record: logging.LogRecord) -> None:
        metrics = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if type(metrics).__name__ != "CompilationMetrics":
            return
        self._known[id(metrics)] = metrics
        if not metrics.is_runtime:
            self.on_compile()
            self._observe(metrics, seen_in_log=True)

    def collect(self) -> None:
        """Compiles dynamo recorded but the log never showed, once each.

        Also fails once when ``log_compilation_metrics`` is off now although it was on (or put on)
        at start: compiles after this point would go unseen.
        """
        import torch._dynamo
        from torch._dynamo.utils import get_compilation_metrics

        for metrics in get_compilation_metrics():
            if id(metrics) in self._known:
                continue
            self._known[id(metrics)] = metrics
            if not metrics.is_runtime:
                self._observe(metrics, seen_in_log=False)
        if not torch._dynamo.config.log_compilation_metrics and not self._flag_off_reported:
            self._flag_off_reported = True
            flag = "torch._dynamo.config.log_compilation_metrics"
            self._emit(
                Observation(
                    compile_id="?",
                    frame=flag,
                    reasons=(f"{flag} is False",),
                    failure=KIND_UNOBSERVED,
                )
            )

    def _observe(self, metrics: Any, *, seen_in_log: bool) -> None:
        compile_id = metrics.compile_id or "?"
        frame_id = compile_id.lstrip("!").split("/")[0]
        if metrics.co_name:
            self._frames[frame_id] = (
                metrics.co_name,
                metrics.co_filename or "",
                metrics.co_firstlineno or 0,
            )
        frame, filename, lineno = self._frames.get(frame_id, ("?", "", 0))
        if _LIMIT_EXCEEDED in (metrics.fail_reason or "").lower():
            if compile_id not in self._storms:  # the convert_frame warning was quieted
                self._storms.add(compile_id)
                reasons = self._guards.new_for(frame, filename, lineno)
                self._emit(
                    Observation(
                        compile_id=compile_id,
                        frame=frame,
                        filename=filename,
                        lineno=lineno,
                        reasons=(*reasons, f"dynamo: {metrics.fail_reason.splitlines()[0]}"),
                        failure=KIND_STORM,
                    )
                )
            return
        if compile_id in self._storms:
            return
        reasons = self._guards.new_for(frame, filename, lineno)
        if not reasons and metrics.recompile_reason:
            reasons = (metrics.recompile_reason,)
        seconds = metrics.entire_frame_compile_time_s
        if seconds is None and metrics.start_time_us and metrics.end_time_us:
            seconds = (metrics.end_time_us - metrics.start_time_us) / 1e6
        backward = metrics.is_forward is False
        refused = metrics.fail_type == _REFUSED
        self._emit(
            Observation(
                compile_id=compile_id,
                frame=f"{frame} (backward)" if backward else frame,
                filename=filename,
                lineno=lineno,
                reasons=reasons,
                seconds=seconds or 0.0,
                failure=None if seen_in_log else KIND_UNOBSERVED,
                first_compile=backward or compile_id.startswith("!"),
                region_entries=getattr(metrics, "accumulated_cache_size", None),
                refused=refused,
            )
        )


class RecompileLimitSource:
    """Storms from dynamo's recompile-limit warning, with the frame and its last guard failure."""

    def __init__(self, emit: Emit, guards: GuardFailures, storms: set[str]) -> None:
        self._emit = emit
        self._guards = guards
        self._storms = storms
        self.tap = LogTap(_CONVERT_FRAME_LOGGER, logging.WARNING, self._on_record)

    def _on_record(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("torch._dynamo hit config.") or len(record.args) < 4:
            return
        limit_type, limit, func_info, last_reason = record.args[:4]
        match = _FUNC_INFO.match(str(func_info))
        frame, filename, lineno = (
            (match["name"], match["file"], int(match["line"])) if match else (str(func_info), "", 0)
        )
        reasons = self._guards.new_for(frame, filename, lineno) or (
            (str(last_reason),) if last_reason else ()
        )
        compile_id = current_compile_id()
        self._storms.add(compile_id)
        self._emit(
            Observation(
                compile_id=compile_id,
                frame=frame,
                filename=filename,
                lineno=lineno,
                reasons=(*reasons, f"torch._dynamo.config.{limit_type} = {limit} reached"),
                failure=KIND_STORM,
            )
        )


class CudagraphSource:
    """Re-records from dynamo's recording callbacks; skips from the log and inductor's counter."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._recordings: dict[str, int] = {}
        self._skips_seen = 0
        self._skips_logged = 0
        self.tap = LogTap(_CUDAGRAPHS_LOGGER, logging.WARNING, self._on_record)

    def start(self) -> None:
        from torch._dynamo.utils import counters

        self._skips_seen = counters["inductor"]["cudagraph_skips"]
        self._skips_logged = 0
        self.ensure_callback()

    def stop(self) -> None:
        import torch._dynamo

        handler = torch._dynamo.callback_handler
        if self._on_compile_start in handler.start_callbacks:
            handler.remove_start_callback(self._on_compile_start)

    def ensure_callback(self) -> None:
        """(Re-)register the recording callback; ``torch.compiler.reset()`` drops it."""
        import torch._dynamo

        handler = torch._dynamo.callback_handler
        if self._on_compile_start not in handler.start_callbacks:
            handler.register_start_callback(self._on_compile_start)

    def forget(self, compile_id: str) -> None:
        """A fresh compile of this id: its next recording is a first one."""
        self._recordings.pop(compile_id, None)

    def _on_record(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("skipping cudagraphs"):
            self._skips_logged += 1
            self._emit_skip(message)

    def collect(self) -> None:
        """Skips counted by inductor but not logged (the cudagraphs logger may be silenced)."""
        from torch._dynamo.utils import counters

        total = counters["inductor"]["cudagraph_skips"]
        unlogged = total - self._skips_seen - self._skips_logged
        self._skips_seen = total
        self._skips_logged = 0
        if _cuda_in_use():
            for _ in range(max(0, unlogged)):
                self._emit_skip("skipping cudagraphs (reason not logged)")

    def _emit_skip(self, message: str) -> None:
        self._emit(
            Observation(
                compile_id=current_compile_id(),
                frame="cudagraphs",
                reasons=(message,),
                failure=KIND_CUDAGRAPH_SKIP,
            )
        )

    def _on_compile_start(self, args: Any) -> None:
        from torch._dynamo.callback import CallbackTrigger

        if args.callback_trigger is not CallbackTrigger.CUDAGRAPH_RECORDING:
            return
        count = self._recordings.get(args.compile_id, 0) + 1
        self._recordings[args.compile_id] = count
        if count > 1:
            reason = f"compile {args.compile_id} recorded {count} times (inputs or static addresses changed)"
            self._emit(
                Observation(
                    compile_id=args.compile_id,
                    frame="cudagraphs",
                    reasons=(reason,),
                    failure=KIND_CUDAGRAPH_RERECORD,
                )
            )


class Tap:
    """Installed while at least one watcher is active; hands every observation to ``deliver``."""

    def __init__(self, deliver: Emit) -> None:
        self._deliver = deliver
        self._users = 0
        self._restore_config: Callable[[], None] | None = None
        storms: set[str] = set()
        self._storms = storms
        self._guards = GuardFailures()
        self._metrics = MetricsSource(self._emit, self._guards, storms)
        self._limits = RecompileLimitSource(self._emit, self._guards, storms)
        self._cudagraphs = CudagraphSource(self._emit)
        self._metrics.on_compile = self._cudagraphs.ensure_callback

    def acquire(self) -> None:
        self._users += 1
        if self._users > 1:
            return
        import torch._dynamo

        config = torch._dynamo.config
        if not config.log_compilation_metrics:
            patch = config.patch(log_compilation_metrics=True)
            patch.__enter__()
            self._restore_config = lambda: patch.__exit__(None, None, None)
        self._guards.start()
        self._metrics.start()
        self._cudagraphs.start()
        self._limits.tap.install()
        self._cudagraphs.tap.install()

    def release(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        self._metrics.stop()
        self._limits.tap.uninstall()
        self._cudagraphs.tap.uninstall()
        self._cudagraphs.stop()
        if self._restore_config is not None:
            self._restore_config()
            self._restore_config = None
        self._guards.stop()
        self._storms.clear()

    def collect(self) -> None:
        """Read what the logs did not show: unlogged compiles and storms, unlogged skips."""
        with LOCK:
            if self._users:
                self._metrics.collect()
                self._cudagraphs.collect()

    def _emit(self, observation: Observation) -> None:
        if observation.failure is None:
            self._cudagraphs.forget(observation.compile_id)
        with LOCK:
            self._deliver(observation)
        if observation.failure is None:
            self._cudagraphs.collect()


def current_compile_id() -> str:
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    return str(compile_id) if compile_id is not None else "?"


def _cuda_in_use() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()
