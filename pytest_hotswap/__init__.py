"""pytest-hotswap: keep LoRA hotswapping in torch.compile'd diffusers pipelines recompile-free.

Importing this package is cheap: it imports neither torch, pytest nor diffusers. The library
parts are re-exported lazily, so ``from pytest_hotswap import CompileWatcher`` works in a notebook
or a server without pytest.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CompileWatcher": "pytest_hotswap.watch",
    "CompileEvent": "pytest_hotswap.watch",
    "RecompileError": "pytest_hotswap.watch",
    "HotswapOptions": "pytest_hotswap.options",
    "prepare_for_hotswap": "pytest_hotswap.reference",
    "hotswap": "pytest_hotswap.reference",
    "set_lora_scale": "pytest_hotswap.reference",
    "HotswapError": "pytest_hotswap.reference",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_hotswap' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
