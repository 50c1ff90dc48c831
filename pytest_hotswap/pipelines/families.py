"""Tiny pipelines of every family in one table, built by one function: seeded, offline.

The table (:data:`families_table.FAMILIES`) is data: per family, the diffusers pipeline class and
its components, each a class with the keyword arguments of diffusers' own fast tests, an offline
tokenizer or a plain value. :func:`build_family` reads an entry and builds the pipeline; nothing
here is specific to one family.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pytest_hotswap.pipelines.families_table import FAMILIES, Family, Part, Tokenizer
from pytest_hotswap.pipelines.families_tokenizers import TOKENIZERS

__all__ = ["FAMILIES", "Family", "Part", "Tokenizer", "build_family", "save_families"]


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


# --- saved folders: `python -m pytest_hotswap.pipelines.families save DIR [names]` -------------

#: Written last into a saved folder: what it was built from. A folder whose stamp differs (another
#: table entry, seed or diffusers/transformers version) or is missing (an interrupted save) is
#: built again.
STAMP = "pytest_hotswap_family.json"


def _stamp(name: str, seed: int) -> dict[str, str]:
    import diffusers
    import transformers

    entry = repr(FAMILIES[name])  # dataclasses of literals: the same text in every process
    return {
        "family": name,
        "seed": str(seed),
        "table": hashlib.sha256(entry.encode()).hexdigest()[:16],
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def save_families(root: str | Path, names: Sequence[str] = (), seed: int = 0) -> dict[str, Path]:
    """Save each family of ``names`` (default: all) with ``save_pretrained``, tokenizers included,
    into ``root/<name>``; a complete folder of the same build is reused. Returns the absolute
    folders by name. The folders load with plain diffusers
    (``DiffusionPipeline.from_pretrained(folder, local_files_only=True)``)."""
    from pytest_hotswap.adapters.loading import quiet_diffusers

    root = Path(root).expanduser().resolve()
    folders: dict[str, Path] = {}
    for name in names or list(FAMILIES):
        if name not in FAMILIES:
            raise ValueError(
                f"{name!r}: no such pipeline family; the built-in families are "
                f"{', '.join(FAMILIES)}"
            )
        folder = root / name
        stamp = _stamp(name, seed)
        try:
            reusable = json.loads((folder / STAMP).read_text(encoding="utf-8")) == stamp
        except (OSError, ValueError):
            reusable = False
        if not reusable:
            partial = root / f".{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            with quiet_diffusers():
                build_family(name, seed).save_pretrained(partial)
            (partial / STAMP).write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
        folders[name] = folder
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_hotswap.pipelines.families",
        description="Save built-in tiny pipeline families as diffusers folders.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser(
        "save",
        help="save families into DIR/<name> (reused when complete) and print their paths "
        "comma-separated, as --hotswap-pipelines takes them",
    )
    save.add_argument("dir")
    save.add_argument("names", nargs="*", help=f"default: all ({', '.join(FAMILIES)})")
    save.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [n for arg in args.names for n in arg.split(",") if n]
    try:
        folders = save_families(args.dir, names, args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(",".join(str(folder) for folder in folders.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
