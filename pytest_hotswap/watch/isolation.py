"""Every ``torch.compile`` call its own cache entries: ``isolate_recompiles=True`` by default.

Dynamo keeps compiled entries on the code object, shared by every instance and every test of a
process: a test that swaps a shape in may hit an entry an earlier test compiled and record no
recompile, although in production (one process, one model) it recompiles. torch 2.13's
``torch.compile(..., isolate_recompiles=True)`` gives each call its own entries and its own
``recompile_limit`` budget (lookups still fall back to entries of non-isolated calls, so every
call must be isolated for this to hold). :func:`isolate_compiles` makes that the default for
``torch.compile`` and ``nn.Module.compile`` (which calls it); an explicit argument still wins.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

_ORIGINAL = "_pytest_hotswap_original"


def supported() -> bool:
    """Whether the installed torch has ``isolate_recompiles`` (torch >= 2.13)."""
    import torch

    compile_fn = getattr(torch.compile, _ORIGINAL, torch.compile)
    return "isolate_recompiles" in inspect.signature(compile_fn).parameters


def isolate_compiles() -> Callable[[], None]:
    """Patch ``torch.compile`` to isolate each call; returns the function that puts it back.

    Calling it again while patched is a no-op whose undo does nothing.
    """
    import torch

    if hasattr(torch.compile, _ORIGINAL) or not supported():
        return lambda: None
    original = torch.compile

    @functools.wraps(original)
    def compile(model: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("isolate_recompiles", True)
        return original(model, **kwargs)

    setattr(compile, _ORIGINAL, original)
    torch.compile = compile

    def undo() -> None:
        if torch.compile is compile:
            torch.compile = original

    return undo


def is_isolating() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and hasattr(torch.compile, _ORIGINAL)
