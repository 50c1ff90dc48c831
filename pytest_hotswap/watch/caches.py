"""Which compiled entry a frame runs: dynamo's cache entries, read between steps.

Dynamo keeps compiled entries on the code object (``Net.forward``, diffusers' ``wrapper``), one
list per ``isolate_recompiles`` region, most recently used first: a hit moves its entry to the
front. Comparing two readings of a list shows which entries ran in between (those that moved in
front of an entry that was in front of them, and new ones), without running anything per call.

A test that runs, after a step, an entry it had not run before although the frame already ran
another one in the test, and that entry was compiled before the test began, would have recompiled
in a fresh process: a *cache switch*. Its reason is the guard that tells the two entries apart.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from types import CodeType
from typing import Any

from pytest_hotswap.watch.events import KIND_CACHE_SWITCH, CompileEvent

#: (code object, isolate_recompiles region id); -1 is the shared default region.
RegionKey = tuple[CodeType, int]
Snapshot = dict[RegionKey, tuple[str, ...]]


def snapshot() -> Snapshot:
    """Every frame's cache entries (compile ids), per region, most recently used first."""
    from torch._dynamo.convert_frame import input_codes
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    result: Snapshot = {}
    for ref in list(input_codes.seen):
        code = ref()
        if code is None:
            continue
        entries = _debug_get_cache_entry_list(code)
        if not entries:
            continue
        regions = sorted({_region(entry) for entry in entries})
        if regions == [-1]:
            result[(code, -1)] = tuple(str(entry.compile_id) for entry in entries)
            continue
        for region in regions:
            result[(code, region)] = tuple(
                str(entry.compile_id) for entry in _region_entries(code, region)
            )
    return result


def region_of(compiled: Any) -> int | None:
    """The ``isolate_recompiles`` region of a compiled module or function, if it has one."""
    for candidate in (
        getattr(compiled, "_compiled_call_impl", None),  # nn.Module.compile()
        getattr(compiled, "forward", None),  # torch.compile(module): an OptimizedModule
        compiled,  # torch.compile(function)
    ):
        region = getattr(candidate, "_isolate_recompiles_id", None)
        if isinstance(region, int) and region >= 0:
            return region
    return None


def entries_of_region(region: int) -> dict[RegionKey, tuple[str, ...]]:
    return {key: ids for key, ids in snapshot().items() if key[1] == region}


def visible_hits(before: Sequence[str], after: Sequence[str]) -> list[str]:
    """Entries certainly run between two readings of one region's list, most recent first.

    Entries that were not run keep their order behind all that were, so an entry in front of
    one that used to be in front of it was run, and a new entry was compiled and run. A run of
    the entry that was already first leaves no trace: that is the one thing this cannot see.
    """
    position = {compile_id: index for index, compile_id in enumerate(before)}
    hits: list[str] = []
    lowest_behind = len(before)
    for compile_id in reversed(after):
        index = position.get(compile_id)
        if index is None or index > lowest_behind:
            hits.append(compile_id)
        else:
            lowest_behind = index
    hits.reverse()
    return hits


@dataclasses.dataclass(frozen=True)
class CacheSwitch:
    """After a step, ``code`` ran ``entry`` (compiled before the scope) instead of ``previous``."""

    code: CodeType
    region: int
    previous: str
    entry: str
    reasons: tuple[str, ...]

    def event(self, step: str | None) -> CompileEvent:
        """The failing event this switch is, after ``step``."""
        return CompileEvent(
            compile_id=self.entry,
            frame=self.code.co_name,
            filename=self.code.co_filename,
            lineno=self.code.co_firstlineno,
            kind=KIND_CACHE_SWITCH,
            reasons=self.reasons,
            step=step,
            seconds=0.0,
        )


class CacheTracker:
    """One watcher's view of the cache entries: which it ran, which existed before it began."""

    def __init__(self) -> None:
        self._last = snapshot()
        self._existing = {cid for ids in self._last.values() for cid in ids}
        self._used: dict[RegionKey, list[str]] = {}

    def adopt(self, region: int) -> None:
        """Count every entry of ``region`` as run by this scope's setup (a cached pipeline)."""
        for key, ids in snapshot().items():
            if key[1] == region:
                used = self._used.setdefault(key, [])
                used.extend(cid for cid in ids if cid not in used)

    def checkpoint(self, after_step: bool) -> list[CacheSwitch]:
        """Read the lists again; return the switches of the interval that ends now.

        ``after_step``: the interval followed a step of the scope (not a warm-up); before the
        first step, every entry a frame runs counts as that frame's first compile.
        """
        now = snapshot()
        switches: list[CacheSwitch] = []
        for key, ids in now.items():
            used = self._used.setdefault(key, [])
            for compile_id in reversed(visible_hits(self._last.get(key, ()), ids)):
                if compile_id in used:
                    continue
                if after_step and used and compile_id in self._existing:
                    previous = self._previous(key, used)
                    reasons = guard_differences(key, previous, compile_id)
                    switches.append(CacheSwitch(key[0], key[1], previous, compile_id, reasons))
                used.append(compile_id)
        self._last = now
        return switches

    def _previous(self, key: RegionKey, used: list[str]) -> str:
        """The entry the frame ran before: the most recently used one this scope ran."""
        for compile_id in self._last.get(key, ()):
            if compile_id in used:
                return compile_id
        return used[-1]


# --- reasons: what tells two entries apart ---------------------------------------------------------

_TENSOR_GUARD = re.compile(r"^check_tensor\((?P<source>.+?), .*?(?P<props>(torch\.\w+), .*)\)$")
_PROPERTY = re.compile(r"(torch\.\w+|size=\[[^\]]*\]|stride=\[[^\]]*\]|device=\w+)")


def guard_differences(key: RegionKey, previous: str, entry: str, limit: int = 5) -> tuple[str, ...]:
    """Guards of ``previous`` that differ from ``entry``'s for the same value, as readable texts.

    The first is the one a user needs: ``tensor 'self.lin.weight' size=[4, 4] (entry 0/0, run
    before the step) is size=[6, 4] in entry 0/1``.
    """
    code, region = key
    entries = {str(e.compile_id): e for e in _region_entries(code, region)}
    old, new = entries.get(previous), entries.get(entry)
    fallback = (
        f"entry {entry} (compiled before this test) matched the call; entry {previous}, run "
        "before the step, no longer did",
    )
    if old is None or new is None:
        return fallback
    try:
        old_guards, new_guards = guard_texts(old), guard_texts(new)
    except (AttributeError, RuntimeError, TypeError):  # an internal API of another torch
        return fallback
    reasons = [
        _difference(source, old_text, new_guards[source], previous, entry)
        for source, old_text in old_guards.items()
        if source in new_guards and new_guards[source] != old_text
    ]
    if not reasons:
        return fallback
    if len(reasons) > limit:
        reasons = [*reasons[:limit], f"... and {len(reasons) - limit} more guards differ"]
    return tuple(reasons)


def guard_texts(entry: Any) -> dict[str, tuple[str, ...]]:
    """``source -> its guards' code`` of one cache entry, comments dropped."""
    texts: dict[str, tuple[str, ...]] = {}
    stack = [entry.guard_manager.root]
    while stack:
        manager = stack.pop()
        parts = tuple(
            part.split("  #", 1)[0].strip()
            for guard in manager.get_leaf_guards()
            for part in guard.verbose_code_parts()
        )
        parts = tuple(part for part in parts if part and not part.startswith("hasattr("))
        if parts:
            texts[manager.get_source()] = parts
        stack.extend(reversed(manager.get_child_managers()))
    return texts


def _difference(
    source: str, old: tuple[str, ...], new: tuple[str, ...], previous: str, entry: str
) -> str:
    gone = [part for part in old if part not in new] or list(old)
    came = [part for part in new if part not in old] or list(new)
    old_tensor, new_tensor = _TENSOR_GUARD.match(gone[0]), _TENSOR_GUARD.match(came[0])
    if old_tensor and new_tensor:
        before, after = _properties(old_tensor["props"]), _properties(new_tensor["props"])
        changed = [p for p in before if p not in after] or before
        now = [p for p in after if p not in before] or after
        return (
            f"tensor '{old_tensor['source']}' {', '.join(changed)} (entry {previous}, run before "
            f"the step) is {', '.join(now)} in entry {entry}, compiled before this test"
        )
    return (
        f"{'; '.join(gone)} (entry {previous}, run before the step) is {'; '.join(came)} in "
        f"entry {entry}, compiled before this test"
    )


def _properties(text: str) -> list[str]:
    return _PROPERTY.findall(text)


def _region(entry: Any) -> int:
    return int(getattr(entry, "isolate_recompiles_id", -1))


def _region_entries(code: CodeType, region: int) -> Iterable[Any]:
    from torch._dynamo import eval_frame

    reader = getattr(eval_frame, "_get_cache_entries_for_region", None)
    if reader is None:  # a torch without isolate_recompiles: one shared list
        return eval_frame._debug_get_cache_entry_list(code)
    return reader(code, region)
