"""Every ``torch.compile`` call its own cache entries: ``isolate_recompiles=True`` by default.

Dynamo keeps compiled entries on the code object, shared by every instance and every test of a
process: a test that swaps a shape in may hit an entry an earlier test compiled and record no
recompile, although in production (one process, one model) it recompiles. torch 2.13's
``torch.compile(..., isolate_recompiles=True)`` gives each call its own entries and its own
``recompile_limit`` budget (lookups still fall back to entries of non-isolated calls, so every
call must be isolated for this to hold). :func:`isolate_compiles` makes that the default for
``torch.compile`` and ``nn.Module.compile`` (which calls it); an explicit argument still wins.

torch 2.11 and 2.12 have no ``isolate_recompiles``. There the plugin keeps the marker's promise
by another route (:func:`route`): ``torch.compiler.reset()`` before every watched test, as
``fresh=True`` does, so no test sees an entry an earlier test compiled (cached pipelines then
compile again, as this test's setup). What this route cannot give: two models of one class
compiled inside the same test share their entries and their ``recompile_limit`` budget.
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


#: The two routes by which every watched test starts without entries an earlier test compiled.
ISOLATE = "isolate_recompiles"
RESET = "reset"


def route() -> str:
    """:data:`ISOLATE` where the installed torch has ``isolate_recompiles``, else :data:`RESET`
    (``torch.compiler.reset()`` before each watched test). Imports torch."""
    return ISOLATE if supported() else RESET


def describe_route(chosen: str) -> str:
    """One line for the ``hotswap isolation:`` header."""
    import torch

    if chosen == ISOLATE:
        return f"isolate_recompiles=True on every torch.compile call (torch {torch.__version__})"
    return (
        f"torch.compiler.reset() before each watched test (torch {torch.__version__} has no "
        "isolate_recompiles; models compiled within one test share entries)"
    )


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
