"""LoRA adapter files, in one place: reading a header (``header``, no torch), loading into a
pipeline (``loading``), making seeded random ones (``factory``), and catalogs with their plans
(``catalog``).

``from pytest_hotswap.adapters import make_lora`` keeps working: every public name of the
submodules is re-exported lazily, so importing this package (say, for the header reader in
``pytest-hotswap inspect``) imports neither torch, diffusers nor PEFT.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = {
    "header": (
        "AdapterFileError",
        "AdapterHeader",
        "DENOISER_NAMES",
        "Layer",
        "METADATA_KEY",
        "PEFT_NATIVE",
        "TEXT_ENCODER_KEY",
        "TEXT_ENCODER_NAMES",
        "canonical_key",
        "check_adapter_path",
        "header_from",
        "layer_key",
        "parse_metadata",
        "read_header",
    ),
    "loading": (
        "ADAPTER_NAME",
        "LoraSource",
        "adapter_rank",
        "describe_adapter",
        "load_first_adapter",
        "loadable",
        "quiet_diffusers",
        "read_peft_adapter",
    ),
    "factory": (
        "FORMATS",
        "lora_targets",
        "make_lora",
        "select_targets",
    ),
    "recipes": (
        "CatalogFile",
        "catalog_recipe",
        "catalog_recipe_names",
        "make_catalog",
    ),
    "catalog": (
        "Catalog",
        "CatalogEntry",
        "CatalogError",
        "Limit",
        "Verdict",
        "load_catalog",
        "padding_cost",
        "read_entry",
    ),
}
_EXPORTS = {name: module for module, names in _SUBMODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_hotswap.adapters' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pytest_hotswap.adapters.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
