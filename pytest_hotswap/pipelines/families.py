"""Tiny pipelines of every family in one table, built by one function: seeded, offline.

The table (:data:`families_table.FAMILIES`) is data: per family, the diffusers pipeline class and
its components, each a class with the keyword arguments of diffusers' own fast tests, an offline
tokenizer or a plain value. :func:`build_family` reads an entry and builds the pipeline; nothing
here is specific to one family.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from pytest_hotswap.pipelines.families_table import FAMILIES, Family, Part, Tokenizer
from pytest_hotswap.pipelines.families_tokenizers import TOKENIZERS

__all__ = ["FAMILIES", "Family", "Part", "Tokenizer", "build_family"]


def _resolve(path: str) -> Any:
    library, name = path.split(".", 1)
    return getattr(importlib.import_module(library), name)


def _build_part(part: Part) -> Any:
    cls = _resolve(part.cls)
    obj = cls(**part.kwargs) if part.config is None else cls(_resolve(part.config)(**part.kwargs))
    if part.constants:
        with torch.no_grad():
            for name, value in part.constants.items():
                getattr(obj, name).fill_(value)
    if isinstance(obj, torch.nn.Module):
        obj.eval()  # built from configs, models start in train mode (dropout on)
    return obj


def build_family(
    name: str, seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> Any:
    """Build the tiny pipeline of family ``name``: every model seeded (``seed + its index``)."""
    try:
        family = FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"{name!r}: no such pipeline family; the built-in families are {', '.join(FAMILIES)}"
        ) from None
    components: dict[str, Any] = {}
    for index, (key, spec) in enumerate(family.components.items()):
        if isinstance(spec, Part):
            torch.manual_seed(seed + index)
            components[key] = _build_part(spec)
        elif isinstance(spec, Tokenizer):
            components[key] = TOKENIZERS[spec.kind]()
        else:
            components[key] = spec
    pipe = _resolve(f"diffusers.{family.pipeline}")(**components)
    pipe.set_progress_bar_config(disable=True)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if torch.device(device).type != "cpu" or torch_dtype != torch.float32:
        pipe = pipe.to(device, torch_dtype)  # skipped on CPU float32: diffusers warns on no-ops
    return pipe
