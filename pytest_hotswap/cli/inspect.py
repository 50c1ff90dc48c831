"""``pytest-hotswap inspect``: plan a hotswap of LoRA files or a catalog from their headers.

Headers only (names, shapes, metadata, kohya's alpha scalars); no weight is loaded, so it is
instant on multi-GB adapters and safe on files of unknown origin, and anything but a regular
``.safetensors`` file is refused unopened. No pytest, no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_hotswap.adapters.catalog import (
    Catalog,
    CatalogEntry,
    CatalogError,
    load_catalog,
    read_entry,
    resolve_max_rank,
)
from pytest_hotswap.adapters.header import AdapterHeader
from pytest_hotswap.adapters.verdicts import sample
from pytest_hotswap.implementations import (
    DiffusersImplementation,
    ImplementationRegistry,
    ReferenceImplementation,
)
from pytest_hotswap.options import MAX_RANK, parse_max_rank_or_auto

REFERENCE = ReferenceImplementation.inspect_label
DIFFUSERS = DiffusersImplementation.inspect_label


def _entries(paths: Sequence[Path]) -> tuple[list[CatalogEntry], list[str]]:
    """Files as given; a folder stands for the files in it. Also the errors of the paths named
    on the command line: a file that is not a readable adapter, a folder that cannot be listed
    or holds nothing (an unreadable file found inside a folder is a refused entry, no error)."""
    entries: list[CatalogEntry] = []
    errors: list[str] = []
    for path in paths:
        if path.is_dir():
            reason = None
            try:
                found = load_catalog(path).entries
            except CatalogError as error:
                reason = str(error).removeprefix(f"{path}: ")
            except OSError as error:  # a folder it may not list
                reason = (
                    "permission denied; make the folder readable for this user"
                    if isinstance(error, PermissionError)
                    else f"cannot list the folder ({error.strerror or error})"
                )
            if reason is not None:
                found = [CatalogEntry(path, None, reason)]
                errors.append(f"{path}: {reason}")
        else:
            found = [read_entry(path)]
            if found[0].header is None:
                errors.append(f"{path}: {found[0].error}")
        seen = {entry.path for entry in entries}
        entries += [entry for entry in found if entry.path not in seen]  # a file given twice
    return entries, errors


def diffusers_verdict(
    entry: CatalogEntry, entries: Sequence[CatalogEntry], rejected: dict[Path, list[str]]
) -> str:
    """``ok`` with how it relates to the first file, or ``rejected: <reasons>``."""
    problems = rejected[entry.path]
    if problems:
        return f"rejected: {'; '.join(problems)}"
    first = entries[0]
    if entry is first:
        return "ok, loaded first"
    if first.header is None or entry.header is None:
        return "not compared, the first file is unreadable"
    shared, total = len(entry.header.denoiser_keys), len(first.header.denoiser_keys)
    kind = "same layers as" if shared == total else "a subset of"
    return f"ok, targets {kind} the first ({shared} of {total} layers)"


def format_adapter(entry: CatalogEntry, *, list_layers: bool) -> list[str]:
    header = entry.header
    if header is None:
        return [f"{entry.path}: error: {entry.error}"]
    ranks = set(header.ranks.values())
    rank = f"rank {header.rank}" if len(ranks) == 1 else f"rank {min(ranks)}-{max(ranks)} (varies)"
    alpha = header.alpha
    if isinstance(alpha, dict):
        alpha_text = f"alpha {min(alpha.values()):g}-{max(alpha.values()):g} (varies)"
    elif alpha is not None:
        alpha_text = f"alpha {alpha:g}"
    else:
        alpha_text = "alpha not in metadata"
    tuner = "" if header.tuner == "LoRA" else f", {header.tuner}"
    components = Counter(layer.component or "model" for layer in header.layers.values())
    layers = ", ".join(f"{count} {component}" for component, count in components.items())
    if header.format != "kohya":  # kohya names have no dots to tell the module from its path
        modules = Counter(_module_kind(layer.name) for layer in header.layers.values())
        layers += f" ({', '.join(f'{kind} x{count}' for kind, count in modules.items())})"
    lines = [
        f"{entry.path}: {header.format}{tuner}, {rank}, {alpha_text}",
        f"  layers: {layers}",
        f"  text-encoder layers: {len(header.text_encoder_layers) or 'none'}",
    ]
    if list_layers or len(ranks) > 1:
        lines += [
            f"    {layer.name}: rank {layer.rank}" for _, layer in sorted(header.layers.items())
        ]
    return lines


def _module_kind(name: str) -> str:
    """The last part of a module path (``to_q``, ``proj_in``, ``ff.net.2`` -> ``net.2``)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def format_plan(
    entries: Sequence[CatalogEntry],
    max_rank: int,
    rejected: dict[Path, list[str]],
    plan: dict[str, Any] | None = None,
) -> list[str]:
    """Max rank, the union of targets, each file's two verdicts and its padding cost.

    ``plan`` is ``Catalog.plan(max_rank)`` of ``entries`` (computed when not given): the
    reference's verdict (LoRA padded onto the union of targets) and the padding; ``rejected``
    is ``DiffusersImplementation.refusals``, diffusers + PEFT's verdict (later files within the first's targets).
    """
    catalog = Catalog("", list(entries))
    plan = catalog.plan(max_rank) if plan is None else plan
    readable = [e.header for e in entries if e.header is not None]
    ranks = [h.rank for h in readable]
    lines = [f"max rank: {max(ranks, default='-')} (checked against --max-rank {max_rank})"]
    first = entries[0]
    if first.header is not None and len(entries) > 1:
        lines.append(f"{first.path}: loaded first; later files are hotswapped into it")
        if first.header.text_encoder_layers:
            lines.append(
                "  note: its text-encoder layers need the text-encoder opt-in to be hotswapped"
            )
    usable = [row for row in plan["files"] if row["verdict"] == "ok"]
    lines.append(
        f"union of targets: {len(plan['union_targets'])} layers from {len(usable)} usable files "
        "(padding every layer any of them targets lets each hotswap, reference implementation)"
    )
    for entry, row in zip(entries, plan["files"], strict=True):
        lines += [
            f"{entry.path}:",
            f"  {REFERENCE}: {row['verdict']}",
            f"  {DIFFUSERS}: {diffusers_verdict(entry, entries, rejected)}",
        ]
        cost = row.get("padding")
        if cost is not None and plan["union_targets"]:
            lines.append(
                f"  padding at rank {max_rank}: {cost['macs_x']}x its LoRA multiply-adds and "
                f"{_mib(cost['padded_bytes'])} against {_mib(cost['own_bytes'])} at its own rank; "
                f"{cost['zero_layers']} union layers it leaves zero"
            )
    refused = len(plan["files"]) - len(usable)
    not_taken = sum(1 for problems in rejected.values() if problems)
    lines.append(
        f"{REFERENCE}: {len(usable)} ok, {refused} refused; "
        f"{DIFFUSERS}: {len(entries) - not_taken} ok, {not_taken} rejected"
    )
    return lines


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def run(args: argparse.Namespace) -> int:
    entries, failures = _entries(args.paths)
    catalog = Catalog(", ".join(map(str, args.paths)), list(entries))
    try:
        max_rank, rank_file = resolve_max_rank(
            args.max_rank, catalog, flag="--max-rank", catalog_flag="adapter paths"
        )
    except CatalogError as error:
        print(f"pytest-hotswap inspect: {error}", file=sys.stderr)
        return 2
    rejected = DiffusersImplementation().refusals(entries, max_rank)
    plan = catalog.plan(max_rank)
    checks = dict.fromkeys(args.check or ())
    for implementation in ImplementationRegistry().choose(list(checks)):
        refusals = implementation.refusals(entries, max_rank)
        refused = [str(entry.path) for entry in entries if refusals[entry.path]]
        if refused:
            failures.append(
                f"--check {implementation.name}: {len(refused)} of {len(entries)} files "
                f"{implementation.inspect_refused}: {sample(refused)}"
            )
    if args.json:
        plan["max_rank_file"] = rank_file
        for row, entry in zip(plan["files"], entries, strict=True):
            row["verdict_diffusers"] = diffusers_verdict(entry, entries, rejected)
            row["rejected"] = rejected[entry.path]
            row["subset_of_first"] = _subset_of_first(entry, entries)
        plan["limit"] = max_rank
        ranks = [e.header.rank for e in entries if e.header is not None]
        plan["max_rank"] = max(ranks, default=None)
        plan["check"] = list(dict.fromkeys(args.check or ()))
        plan["failures"] = failures
        print(json.dumps(plan, indent=2))
    else:
        for entry in entries:
            print("\n".join(format_adapter(entry, list_layers=args.layers)))
        single = entries[0]
        if len(entries) > 1 or (
            single.header is not None
            and (rejected[single.path] or plan["files"][0]["verdict"] != "ok")
        ):
            print("\n".join(format_plan(entries, max_rank, rejected, plan)))
    for failure in failures:
        print(f"pytest-hotswap inspect: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _subset_of_first(entry: CatalogEntry, entries: Sequence[CatalogEntry]) -> bool | None:
    first: AdapterHeader | None = entries[0].header
    if entry is entries[0] or first is None or entry.header is None:
        return None
    return all(key in first.layers for key in entry.header.denoiser_keys)


def _max_rank(text: str) -> int | str:
    try:
        return parse_max_rank_or_auto(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_command(commands: Any) -> None:
    """Add the command to the ``pytest-hotswap`` subcommands (an argparse subparsers action)."""
    insp = commands.add_parser(
        "inspect",
        help="Plan a hotswap of LoRA .safetensors files or a catalog folder (headers only)",
        description="Read adapter headers (no tensors) and report rank, alpha, targeted layers, "
        "text-encoder keys and format; with several files (or a folder), the plan: max rank, the "
        "union of targets, each file's two verdicts and its padding cost. Verdicts: the "
        "reference's (LoRA padded onto the union of every usable file's targets) and diffusers + "
        "PEFT's (upstream: the first file is loaded before compiling and each later file may "
        "target only its layers). Exit 0 when the inspection ran: verdicts are information, "
        "refused files are listed, not failures. Exit 1 when a path given cannot be read as an "
        "adapter (missing, unreadable, not a LoRA .safetensors file; a file inside a given folder "
        "is a refused entry instead) or, with --check, when a file is refused; 2 on usage errors",
    )
    insp.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="Adapter files or folders"
    )
    insp.add_argument(
        "--max-rank",
        type=_max_rank,
        default=MAX_RANK.default,
        help=f"The rank adapters are padded to (--hotswap-max-rank), or auto: the largest rank "
        f"of the files. Default: {MAX_RANK.default}",
    )
    insp.add_argument(
        "--check",
        choices=[i.name for i in ImplementationRegistry().values() if i.inspect_label],
        action="append",
        help="Also exit 1 when any file is refused by this implementation's verdict: reference "
        "(union padding) or diffusers (diffusers + PEFT, the first file's targets). Repeat for both",
    )
    insp.add_argument("--layers", action="store_true", help="List every targeted layer")
    insp.add_argument("--json", action="store_true", help="Print JSON for machines")
    insp.set_defaults(run=run)
