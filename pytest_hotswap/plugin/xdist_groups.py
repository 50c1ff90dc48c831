"""pytest-xdist's ``--dist loadgroup`` on pytest 9.2: the group suffix where pytest reads it.

An xdist worker marks each item of an ``xdist_group`` by appending ``@<group>`` to its node id,
which the controller's loadgroup scheduler reads to send a group to one worker. It does so by
assigning ``item._nodeid``; pytest 9.2 keeps node ids structured (``item._id``, a ``NodeId``) and
no longer reads that field. On the pinned pytest 9.2.0 with pytest-xdist 3.8.0 every group is
silently ignored and its tests spread over the workers, each building and compiling its own
pipelines (pytest-dev/pytest-xdist#1386; a fix is proposed in pytest-dev/pytest-xdist#1388).

:func:`restore_group_suffixes` puts the suffix xdist meant, computed as xdist computes it, into the
structured id of the given items, after xdist's own hook ran. It does nothing off loadgroup, on a
pytest without structured ids, or where the suffix is already there (an xdist that handles it):
remove it once the pinned xdist does. Node ids keep the exact ``path::test[p]@group`` form xdist
gives them on older pytest; pytest's short test summary, which rebuilds ids from their parts,
shows a parametrized one as ``test[p]@group]`` (cosmetic; reports and the matrix use the exact id).
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest


def group_suffix(item: pytest.Item) -> str | None:
    """``@<groups>`` as pytest-xdist's worker builds it (sorted names joined by ``_``), or
    ``None`` for an item without an ``xdist_group`` mark."""
    names = {
        str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
        for mark in item.iter_markers("xdist_group")
    }
    return f"@{'_'.join(sorted(names))}" if names else None


def has_group_suffix(nodeid: str) -> bool:
    """Whether ``nodeid`` ends with a group suffix (an ``@`` after the last ``]``, as xdist's
    scheduler tells it from an ``@`` inside a parameter id)."""
    return nodeid.rfind("@") > nodeid.rfind("]")


def restore_group_suffixes(config: pytest.Config, items: Iterable[pytest.Item]) -> int:
    """Give each grouped item the node id xdist meant; returns how many were changed."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers only
        return 0
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9.2: xdist's own suffix works
        return 0
    changed = 0
    for item in items:
        suffix = group_suffix(item)
        if suffix is None or has_group_suffix(item.nodeid):
            continue
        if not isinstance(getattr(item, "_id", None), NodeId):
            continue
        item._id = NodeId.parse(f"{item.nodeid}{suffix}")
        changed += 1
    return changed


def strip_group_suffix(nodeid: str) -> str:
    """``path::test[p]@group`` -> ``path::test[p]``: the node id without xdist's group suffix."""
    return nodeid[: nodeid.rfind("@")] if has_group_suffix(nodeid) else nodeid
