"""Verdicts on adapter files from their headers alone (no torch): what upstream's hotswap after
loading the first file would refuse. ``DiffusersImplementation.refusals`` answers with it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_hotswap.adapters.catalog import CatalogEntry
from pytest_hotswap.adapters.header import PEFT_NATIVE


def first_file_refusals(entries: Sequence[CatalogEntry], max_rank: int) -> dict[Path, list[str]]:
    """Why diffusers + PEFT would reject each file: the first one is loaded before compiling, and
    a later one may target only its layers (or a subset), with the same shapes, and no
    text-encoder layers; every file must be a readable plain LoRA in diffusers' key format, of
    at most ``max_rank``."""
    rejected: dict[Path, list[str]] = {entry.path: [] for entry in entries}
    for entry in entries:
        if entry.header is None:
            rejected[entry.path].append("unreadable")
        elif entry.header.tuner != "LoRA":
            rejected[entry.path].append(f"a {entry.header.tuner} adapter, not a plain LoRA")
        elif entry.header.format == "peft":
            rejected[entry.path].append(
                f"{PEFT_NATIVE}, which diffusers' load_lora_weights cannot read"
            )
        elif entry.header.rank > max_rank:
            rejected[entry.path].append(f"rank {entry.header.rank} > max rank {max_rank}")
    first = entries[0].header if entries else None
    if first is None:
        return rejected
    for entry in entries[1:]:
        header = entry.header
        if header is None:
            continue
        extra = [header.layers[key].name for key in header.denoiser_keys if key not in first.layers]
        if extra:
            rejected[entry.path].append(
                f"targets {len(extra)} layers the first does not ({sample(extra)})"
            )
        if header.text_encoder_layers:
            rejected[entry.path].append(
                f"has {len(header.text_encoder_layers)} text-encoder layers, which hotswap does "
                "not support without the text-encoder opt-in"
            )
        mismatched = [
            layer.name
            for key, layer in header.layers.items()
            if key in first.layers and _io(layer) != _io(first.layers[key])
        ]
        if mismatched:
            rejected[entry.path].append(
                f"{len(mismatched)} layers have other in/out shapes than in the first, "
                f"so it is for another model ({sample(mismatched)})"
            )
    return rejected


def _io(layer: Any) -> tuple[Any, ...]:
    return (layer.in_shape, layer.out_features)


def sample(names: Sequence[str], count: int = 3) -> str:
    """The first ``count`` names, and how many more there are."""
    more = f", ... {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more
