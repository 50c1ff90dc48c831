"""The generated catalog: one adapter file per kind of adapter a team's catalog may hold.

``make_catalog`` writes them for a pipeline (the conformance suite's ``catalog`` scenario runs on
them when no ``--hotswap-adapters`` catalog is given); each file is made by :func:`make_lora`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pytest_hotswap.adapters.factory import (
    _denoiser,
    _loads_text_encoder,
    _resolve,
    kohya_loadable,
    lora_targets,
    make_lora,
)
from pytest_hotswap.reference.components import denoiser_prefix


@dataclasses.dataclass(frozen=True)
class CatalogFile:
    """One file of a generated catalog: its name and the ``make_lora`` arguments that write it."""

    name: str
    kwargs: dict[str, Any]
    what: str


def catalog_recipe(target: Any, *, kohya: bool) -> list[CatalogFile]:
    """The files :func:`make_catalog` writes for ``target``'s denoiser, in name order.

    Trainers' variety on one model: diffusers, PEFT and kohya key styles; ranks 4 to 64 with a
    per-layer rank pattern and their own alphas; two adapters for disjoint layers (the first file
    targets every second layer, the second file the others); one with text-encoder keys and one
    DoRA adapter. Each file beyond the pattern's limits targets the first file's layers, so it
    shows that one limit alone.
    """
    names = [] if target is None else lora_targets(target)
    even, odd = names[0::2], names[1::2]
    pattern = {name: 64 for name in even[:3]}
    loadable = kohya_loadable(names) if kohya else names
    kohya_targets: str | list[str] = "all" if loadable == names else loadable
    files = [
        CatalogFile(
            "01-even-r8.safetensors",
            {"rank": 8, "alpha": 16, "targets": even, "seed": 101},
            "every second layer, rank 8, alpha 16",
        ),
        CatalogFile(
            "02-odd-r8.safetensors",
            {"rank": 8, "targets": odd, "seed": 102},
            "the other layers (disjoint from 01)",
        ),
        CatalogFile(
            "03-all-r4-alpha2.safetensors",
            {"rank": 4, "alpha": 2, "seed": 103},
            "every layer, rank 4, alpha 2",
        ),
        CatalogFile(
            "04-r16.safetensors",
            {"rank": 16, "fmt": "kohya", "targets": kohya_targets, "seed": 104}
            if kohya
            else {"rank": 16, "targets": even, "seed": 104},
            "kohya keys (lora_down / lora_up / alpha), rank 16"
            if kohya
            else "every second layer, rank 16",
        ),
        CatalogFile(
            "05-pattern-r4-64.safetensors",
            {"rank": 4, "alpha": 4, "targets": even, "rank_pattern": pattern, "seed": 105},
            "rank 4, rank 64 on three layers (a rank pattern)",
        ),
        CatalogFile(
            "06-peft-keys-r8.safetensors",
            {"rank": 8, "fmt": "peft", "seed": 106},
            "PEFT's own keys (base_model.model.)",
        ),
        CatalogFile(
            "07-text-encoder-r4.safetensors",
            {"rank": 4, "targets": even, "text_encoder": True, "seed": 107},
            "denoiser and text-encoder keys",
        ),
        CatalogFile(
            "08-dora-r8.safetensors",
            {"rank": 8, "targets": even, "use_dora": True, "seed": 108},
            "a DoRA adapter",
        ),
    ]
    return files


def catalog_recipe_names() -> list[str]:
    """The file names :func:`make_catalog` writes (the text-encoder one only for pipelines)."""
    return [file.name for file in catalog_recipe(None, kohya=False)]


def make_catalog(target: Any, folder: str | Path) -> list[Path]:
    """Write a small catalog of adapters for ``target`` (a pipeline, or a model without
    text-encoder and kohya files) into ``folder``; returns the paths in name order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    resolved = _resolve(target, text_encoder=True)
    kohya = denoiser_prefix(resolved) == "unet"
    has_text_encoder = _loads_text_encoder(resolved)
    paths = []
    for file in catalog_recipe(_denoiser(resolved), kohya=kohya):
        if file.kwargs.get("text_encoder") and not has_text_encoder:
            continue
        paths.append(make_lora(resolved, folder / file.name, **file.kwargs))
    return paths
