"""Dynamo's automatic-dynamic profile, per test as in a fresh process.

Besides its cache entries, dynamo keeps one process-wide record per code object of the sizes and
Python numbers it has seen change (``torch._dynamo.pgo``: "automatic dynamic"). A model compiled
after another of the same class that changed a float or an input size compiles it dynamic from
the start, so the recompile a fresh process makes at the first change never happens:
``isolate_recompiles`` separates entries, not this record. A watched test therefore starts with
an empty profile, as a fresh process does, and a pipeline handed out from the fixtures' cache
brings back the profile its own build left (:func:`snapshot` / :func:`restore`).
"""

from __future__ import annotations

import copy
from typing import Any


def reset() -> None:
    """Forget every recorded change, as a fresh process starts (its PGO cache is not read)."""
    from torch._dynamo import pgo

    pgo.reset_code_state()


def snapshot() -> dict[Any, Any]:
    """A copy of the profile as it is now."""
    from torch._dynamo import pgo

    return copy.deepcopy(dict(pgo.get_code_state()))


def restore(saved: dict[Any, Any]) -> None:
    """Put the records of ``saved`` back (over the current ones for the same code objects)."""
    from torch._dynamo import pgo

    pgo.get_code_state().update(copy.deepcopy(saved))


def changed(before: dict[Any, Any], after: dict[Any, Any]) -> dict[Any, Any]:
    """The records of ``after`` that are new or different from ``before`` (what a step left)."""
    return {code: state for code, state in after.items() if before.get(code) != state}
