"""What a watcher records: compile events and step labels, and how they read in a failure message."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

KIND_COMPILE = "compile"
KIND_RECOMPILE = "recompile"
KIND_STORM = "storm"
KIND_CACHE_SWITCH = "cache_switch"
KIND_LAYOUT_CHANGE = "layout_change"
KIND_CUDAGRAPH_RERECORD = "cudagraph_rerecord"
KIND_CUDAGRAPH_SKIP = "cudagraph_skip"
KIND_UNOBSERVED = "unobserved"

#: Every kind that fails ``no_recompile``, in the order the summary lists their counts.
FAILING_KINDS = (
    KIND_RECOMPILE,
    KIND_STORM,
    KIND_CACHE_SWITCH,
    KIND_LAYOUT_CHANGE,
    KIND_CUDAGRAPH_RERECORD,
    KIND_CUDAGRAPH_SKIP,
    KIND_UNOBSERVED,
)
KINDS = (KIND_COMPILE, *FAILING_KINDS)
#: The kinds that are a compilation of a frame (the others are events around compiled code).
COMPILING_KINDS = (KIND_COMPILE, KIND_RECOMPILE, KIND_UNOBSERVED)
#: The kinds a layout change absorbs when they follow it in the same step: the recompile (or the
#: switch to an older entry) the changed tensors cause is the same incident, counted once.
CAUSED_BY_LAYOUT = (KIND_RECOMPILE, KIND_CACHE_SWITCH)

KIND_TITLES = {
    KIND_RECOMPILE: "recompile",
    KIND_STORM: "recompile storm (recompile_limit hit, the frame now runs eagerly)",
    KIND_CACHE_SWITCH: (
        "cache switch (the frame ran a compiled entry made before this test: in a fresh process "
        "this is a recompile)"
    ),
    KIND_LAYOUT_CHANGE: "layout change (a LoRA tensor changed under the compiled code)",
    KIND_CUDAGRAPH_RERECORD: "cudagraph re-record",
    KIND_CUDAGRAPH_SKIP: "cudagraph skipped",
    KIND_UNOBSERVED: (
        "compile the watcher did not see (torch._dynamo.config.log_compilation_metrics was turned "
        "off, or the torch._utils_internal logger silenced, inside the watched scope; leave both "
        "on so recompiles can be counted)"
    ),
}
#: The kinds whose first reason is one of dynamo's guard texts.
_GUARD_KINDS = (KIND_RECOMPILE, KIND_STORM, KIND_CACHE_SWITCH)


class RecompileError(AssertionError):
    """More recompiles than allowed happened inside a ``CompileWatcher``; the message lists them."""


@dataclasses.dataclass(frozen=True)
class CompileEvent:
    """One compilation (or other compile-stability event) seen by a watcher.

    ``kind`` is ``"compile"`` (a first compile, fine) or one of :data:`FAILING_KINDS`:
    ``"recompile"`` (dynamo compiled a frame that already had a cache entry), ``"storm"`` (the
    frame hit ``recompile_limit`` and now runs eagerly), ``"cache_switch"`` (after a step the
    frame ran an entry compiled before the test, which a fresh process would have recompiled),
    ``"layout_change"`` (a swap replaced or re-shaped a LoRA tensor), ``"cudagraph_rerecord"``,
    ``"cudagraph_skip"`` or ``"unobserved"`` (compile metrics logging was turned off inside the
    scope: the watcher was blind). ``reasons`` holds dynamo's full guard-failure texts, the guard
    of the called model first (or, for a layout change, the tensors that changed).

    A layout change and the recompile (or cache switch) it caused are one event: ``caused``
    describes that recompile (``"recompile 0/3 of wrapper (diffusers/...:300)"``) and ``guards``
    holds its guard-failure texts; both stay empty when dynamo did not recompile.
    ``stopped_at_guard``: dynamo refused this recompile at its guard (``no_recompile`` had spent
    its allowance), so nothing was compiled and the test stopped there.
    """

    compile_id: str
    frame: str
    filename: str
    lineno: int
    kind: str
    reasons: tuple[str, ...]
    step: str | None
    seconds: float
    guards: tuple[str, ...] = ()
    caused: str | None = None
    stopped_at_guard: bool = False

    @property
    def is_recompile(self) -> bool:
        """Whether this event fails ``no_recompile`` (every kind but a first compile)."""
        return self.kind != KIND_COMPILE

    @property
    def compiled(self) -> bool:
        """Whether this event is a compilation that ran (a refused recompile compiled nothing)."""
        if self.stopped_at_guard:
            return False
        caused = self.caused is not None and self.caused.startswith(f"{KIND_RECOMPILE} ")
        return self.kind in COMPILING_KINDS or caused  # a layout change and its recompile

    def caused_by(self, layout: CompileEvent) -> CompileEvent:
        """``layout`` (a layout change) carrying this event, the recompile it caused, as one."""
        return dataclasses.replace(
            layout,
            guards=self.reasons,
            caused=f"{self.kind} {self.compile_id} of {self.location()}",
            seconds=layout.seconds + self.seconds,
            stopped_at_guard=self.stopped_at_guard,
        )

    def location(self) -> str:
        """``frame (short/path.py:line)``, the path shortened to what follows site-packages."""
        if not self.filename:
            return self.frame
        return f"{self.frame} ({short_filename(self.filename)}:{self.lineno})"

    def describe(self) -> str:
        """One line: kind, compile id, where, after which step, and the first reason."""
        after = f" after {self.step!r}" if self.step else ""
        if not self.reasons:
            return f"{self.kind} {self.compile_id} of {self.location()}{after}: no reason reported"
        more = f" (+{len(self.reasons) - 1} more in the report)" if len(self.reasons) > 1 else ""
        first = shorten_reason(self.reasons[0]) if self.kind in _GUARD_KINDS else self.reasons[0]
        guard = f"; then {self.caused}: {shorten_reason(self.guards[0])}" if self.guards else ""
        stopped = " (stopped at the guard)" if self.stopped_at_guard else ""
        return (
            f"{self.kind} {self.compile_id} of {self.location()}{after}: {first}{more}{guard}"
            f"{stopped}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "reasons": list(self.reasons),
            "guards": list(self.guards),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompileEvent:
        """The inverse of :meth:`to_dict`; a field of the wrong type raises ``ValueError``.

        ``guards``, ``caused`` and ``stopped_at_guard`` may be missing (reports written before
        they existed); every other field is required.
        """
        checked: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in data:
                if field.name in _OPTIONAL_EVENT_FIELDS:
                    continue
                raise ValueError(f"event field {field.name!r} is missing")
            checked[field.name] = _check_field(field.name, data[field.name])
        unknown = sorted(set(data) - set(checked))
        if unknown:
            raise ValueError(f"unknown event fields {unknown}")
        return cls(**checked)


_EVENT_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "compile_id": (str,),
    "frame": (str,),
    "filename": (str,),
    "lineno": (int,),
    "kind": (str,),
    "step": (str, type(None)),
    "seconds": (int, float),
    "caused": (str, type(None)),
}
_OPTIONAL_EVENT_FIELDS = ("guards", "caused", "stopped_at_guard")


def _check_field(name: str, value: Any) -> Any:
    if name in ("reasons", "guards"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(r, str) for r in value):
            raise ValueError(f"event field {name!r} must be a list of strings, got {value!r}")
        return tuple(value)
    if name == "stopped_at_guard":
        if not isinstance(value, bool):
            raise ValueError(f"event field 'stopped_at_guard' must be true or false, got {value!r}")
        return value
    expected = _EVENT_FIELD_TYPES[name]
    if isinstance(value, bool) or not isinstance(value, expected):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
        raise ValueError(f"event field {name!r} must be {names}, got {value!r}")
    if name == "kind" and value not in KINDS:
        raise ValueError(f"event field 'kind' must be one of {', '.join(KINDS)}, got {value!r}")
    if name == "seconds" and not value >= 0:
        raise ValueError(f"event field 'seconds' must be a number >= 0, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Step:
    """A label for what follows (usually one swap) and, for a swap, its latency."""

    label: str
    swap_ms: float | None = None


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('ch') else 's'}"


def format_report(
    events: Sequence[CompileEvent], graph_breaks: int, *, header: bool = True
) -> list[str]:
    """The watcher's report: a summary line, then each failing event grouped by its step."""
    failing = [event for event in events if event.is_recompile]
    lines = []
    if header:
        seconds = sum(event.seconds for event in events)
        compiles = sum(event.compiled for event in events)
        lines.append(
            f"{plural(compiles, 'compile')}, {plural(len(failing), 'recompile')}, "
            f"{plural(graph_breaks, 'graph break')}, {seconds:.2f} s compiling"
        )
    for event in failing:
        where = f'after step "{event.step}"' if event.step is not None else "before any step"
        lines.append(f"{KIND_TITLES[event.kind]} {where}: {event.location()}")
        lines.extend(f"   {line}" for line in _reason_lines(event))
    return lines


def count_kinds(events: Iterable[CompileEvent]) -> dict[str, int]:
    """How many events of each failing kind (kinds that did not happen are left out)."""
    counts: dict[str, int] = {}
    for event in events:
        if event.is_recompile:
            counts[event.kind] = counts.get(event.kind, 0) + 1
    return counts


def _reason_lines(event: CompileEvent) -> list[str]:
    if not event.reasons:
        lines = ["(dynamo gave no reason)"] if event.kind == KIND_RECOMPILE else []
        return [*lines, *_stopped_line(event)]
    first, *others = event.reasons
    if event.kind == KIND_LAYOUT_CHANGE:
        lines = [f"tensor: {reason}" for reason in event.reasons]
        if event.caused is not None:
            lines.append(f"then {event.caused}")
            lines.extend(f"guard: {shorten_reason(guard)}" for guard in event.guards[:1])
        return [*lines, *_stopped_line(event)]
    guard = event.kind in _GUARD_KINDS  # others' reasons are not guard texts
    lines = [f"guard: {shorten_reason(first)}" if guard else first]
    if others and event.kind == KIND_CACHE_SWITCH:
        lines.extend(f"guard: {shorten_reason(other)}" for other in others)
    elif others:
        lines.append(
            f"(and {len(others)} older cache {'entry' if len(others) == 1 else 'entries'} failed too)"
        )
    return [*lines, *_stopped_line(event)]


def _stopped_line(event: CompileEvent) -> list[str]:
    if not event.stopped_at_guard:
        return []
    return [
        "stopped at the guard: the allowance was spent, so this recompile was refused before "
        "compiling and the test ended here (no_recompile(count_all=True) or --hotswap-count-all "
        "compiles on and counts every recompile)"
    ]


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


def short_filename(filename: str) -> str:
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in filename:
            return filename.rsplit(marker, 1)[1]
    with contextlib.suppress(ValueError):
        relative = os.path.relpath(filename)
        if not relative.startswith(".."):
            return relative
    return filename
