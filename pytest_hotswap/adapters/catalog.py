"""An adapter catalog: the LoRA files a team hotswaps, and what a hotswap would do with each.

``--hotswap-adapters=DIR|GLOB`` names it; ``pytest-hotswap inspect`` prints its plan. Only
headers are read (``adapters.header``): no tensor, no torch, and nothing but regular
``.safetensors`` files is ever opened. A file that cannot be hotswapped is listed with the
reason, never loaded.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pytest_hotswap.adapters.header import (
    PEFT_NATIVE,
    AdapterFileError,
    AdapterHeader,
    read_header,
)

_BYTES_PER_VALUE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


class CatalogError(ValueError):
    """The catalog cannot be used (no such folder, nothing matches, no readable adapter)."""


@dataclasses.dataclass(frozen=True)
class Limit:
    """Why a file cannot be hotswapped: a short ``label`` for a matrix cell, and the detail."""

    label: str
    detail: str

    def __str__(self) -> str:
        return f"{self.label} ({self.detail})"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a hotswap would do with a file: ``accepted``, or refused with the reason."""

    accepted: bool
    reason: str = ""

    def __str__(self) -> str:
        return "ok" if self.accepted else f"refused: {self.reason}"


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """One file of the catalog: its header, or why it cannot be read."""

    path: Path
    header: AdapterHeader | None
    error: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def readable(self) -> bool:
        return self.header is not None

    def pattern_limit(
        self, max_rank: int, *, text_encoder: bool = False, diffusers: bool = True
    ) -> Limit | None:
        """Why the pre-padding pattern cannot take this file at all, else ``None``.

        Unreadable files, other tuners (DoRA, LoKr ...), PEFT-native keys for a diffusers
        pipeline (its loaders cannot read them), ranks above the max and, unless the
        text-encoder opt-in is on, text-encoder keys.
        """
        header = self.header
        if header is None:
            return Limit("unreadable", str(self.error))
        if header.tuner != "LoRA":
            return Limit(f"a {header.tuner} adapter", "only plain LoRA is hotswapped")
        if diffusers and header.format == "peft":
            return Limit(
                PEFT_NATIVE,
                "diffusers' load_lora_weights cannot read them; write the adapter with "
                "save_lora_weights (transformer. / unet. keys)",
            )
        if header.text_encoder_layers and not text_encoder:
            return Limit(
                "text-encoder keys",
                f"{len(header.text_encoder_layers)} text-encoder layers: hotswap them with the "
                "text-encoder opt-in, or strip them",
            )
        if header.rank > max_rank:
            return Limit(
                f"rank {header.rank} > max rank {max_rank}", "prepare with a larger max rank"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        header = self.header
        if header is None:
            return {"path": str(self.path), "error": self.error}
        return {
            "path": str(self.path),
            "format": header.format,
            "tuner": header.tuner,
            "rank": header.rank,
            "ranks": {layer.name: layer.rank for layer in header.layers.values()},
            # one alpha, or the alpha of each layer keyed like "ranks" (by the name in the file)
            "alpha": alpha
            if not isinstance(alpha := header.alpha, dict)
            else {header.layers[key].name: value for key, value in alpha.items()},
            "layers": [layer.name for layer in header.layers.values()],
            "text_encoder_layers": header.text_encoder_layers,
        }


@dataclasses.dataclass
class Catalog:
    """The files of ``source`` (a folder or a glob), sorted by name."""

    source: str
    entries: list[CatalogEntry]

    @property
    def readable(self) -> list[CatalogEntry]:
        return [entry for entry in self.entries if entry.readable]

    def max_rank(self) -> tuple[int, str]:
        """The largest rank of any readable LoRA file, and that file's path."""
        candidates = [e for e in self.readable if e.header is not None and e.header.tuner == "LoRA"]
        if not candidates:
            raise CatalogError(f"{self.source}: no readable LoRA adapter in it")
        best = max(candidates, key=lambda entry: entry.header.rank)  # type: ignore[union-attr]
        return best.header.rank, str(best.path)  # type: ignore[union-attr]

    def usable(
        self, max_rank: int, *, text_encoder: bool = False, diffusers: bool = True
    ) -> list[CatalogEntry]:
        """The files the pattern can take (``diffusers``: for a pipeline with diffusers' loaders)."""
        return [
            entry
            for entry in self.entries
            if entry.pattern_limit(max_rank, text_encoder=text_encoder, diffusers=diffusers) is None
        ]

    def union_targets(self, entries: Iterable[CatalogEntry] | None = None) -> list[str]:
        """Layer keys (``component/module_path``) any of the files targets, in first-seen order."""
        keys: dict[str, None] = {}
        for entry in self.readable if entries is None else entries:
            if entry.header is not None:
                keys.update(dict.fromkeys(entry.header.denoiser_keys))
        return list(keys)

    def plan(self, max_rank: int | None = None, *, text_encoder: bool = False) -> dict[str, Any]:
        """What a hotswap of every file needs: max rank, the union of targets, each file's
        verdict for the reference (padded onto the union; ``Implementation.refusals`` gives any
        implementation's) and the padding cost at the max rank against its own rank."""
        rank, rank_file = self.max_rank() if max_rank is None else (max_rank, None)
        usable = self.usable(rank, text_encoder=text_encoder)
        union = self.union_targets(usable)
        first = usable[0] if usable else None
        files = []
        for entry in self.entries:
            limit = entry.pattern_limit(rank, text_encoder=text_encoder)
            row: dict[str, Any] = {
                **entry.to_dict(),
                "verdict": str(Verdict(limit is None, limit or "")),
            }
            if limit is None and entry.header is not None and first is not None:
                row["padding"] = padding_cost(entry.header, union, rank)
            files.append(row)
        return {
            "source": self.source,
            "max_rank": rank,
            "max_rank_file": rank_file,
            "union_targets": union,
            "first": str(first.path) if first is not None else None,
            "files": files,
        }


def resolve_max_rank(
    max_rank: int | str, catalog: Catalog | None, *, flag: str, catalog_flag: str
) -> tuple[int, str | None]:
    """``max_rank`` as a number, and the file it came from: ``auto`` is the largest rank of any
    readable LoRA file of ``catalog``. The pytest session and ``pytest-hotswap inspect`` both
    resolve it here, so ``auto`` means one thing; ``flag`` and ``catalog_flag`` name their options
    in the :class:`CatalogError` when there is nothing to take the rank from."""
    if isinstance(max_rank, int):
        return max_rank, None
    if catalog is None:
        raise CatalogError(
            f"{flag}={max_rank} takes the largest rank of the adapter catalog, but no catalog is "
            f"given: add {catalog_flag}, or give the max rank as a number"
        )
    try:
        return catalog.max_rank()
    except CatalogError as error:
        raise CatalogError(f"{flag}={max_rank}: {error}") from None


def padding_cost(header: AdapterHeader, union: Sequence[str], max_rank: int) -> dict[str, Any]:
    """Extra LoRA multiply-adds (per token) and bytes when padded to ``max_rank`` on ``union``,
    against the file at its own rank on its own layers.

    Layers of the union it does not target are counted at the size its own layers suggest only
    when it has them; otherwise from the widest shape known, so the figure is a lower bound.
    """
    own_macs = header.lora_macs()
    padded_macs = header.lora_macs(rank=max_rank)
    itemsize = max((_BYTES_PER_VALUE.get(dtype, 4) for dtype in header.dtypes), default=4)
    own_bytes = own_macs * itemsize
    padded_bytes = padded_macs * itemsize
    untargeted = [key for key in union if key not in header.layers]
    return {
        "own_macs": own_macs,
        "padded_macs": padded_macs,
        "macs_x": round(padded_macs / own_macs, 2) if own_macs else None,
        "own_bytes": own_bytes,
        "padded_bytes": padded_bytes,
        "zero_layers": len(untargeted),
    }


def load_catalog(source: str | os.PathLike[str]) -> Catalog:
    """Every file of a folder (not recursive) or every file a glob matches, sorted by name.

    Any file that is not a readable ``.safetensors`` LoRA adapter is kept as an entry with the
    reason; a source that names nothing is a :class:`CatalogError`.
    """
    text = str(source)
    folder = Path(text).expanduser()
    if folder.is_dir():
        try:
            paths = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        except PermissionError:
            raise CatalogError(
                f"{text}: permission denied; make the folder readable for this user"
            ) from None
        except OSError as error:
            raise CatalogError(
                f"{text}: cannot list the folder ({error.strerror or error})"
            ) from None
    elif any(char in text for char in "*?["):
        paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        paths = [p for p in paths if not p.is_dir()]
    elif folder.exists():
        paths = [folder]
    else:
        raise CatalogError(
            f"{text}: no such folder, and not a glob pattern (like 'loras/*.safetensors')"
        )
    if not paths:
        raise CatalogError(f"{text}: no files in it")
    return Catalog(text, [read_entry(path) for path in paths])


def read_entry(path: Path) -> CatalogEntry:
    try:
        return CatalogEntry(path, read_header(path))
    except AdapterFileError as error:
        return CatalogEntry(path, None, str(error).removeprefix(f"{path}: "))
