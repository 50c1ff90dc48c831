"""The ``pytest-hotswap`` command: compare two reports, inspect LoRA adapter files or a catalog.

``inspect`` reads safetensors headers only (names, shapes, metadata, kohya's alpha scalars); no
weight is loaded, so it is instant on multi-GB adapters and safe on files of unknown origin, and
anything but a regular ``.safetensors`` file is refused unopened. No pytest, no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

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
from pytest_hotswap.report import (
    DEFAULT_FAIL_ON,
    Report,
    ReportError,
    Threshold,
    compare,
    parse_fail_on,
)


class _Parser(argparse.ArgumentParser):
    """argparse with the error first and the usage after it, not the other way round."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n{self.format_usage()}")


# --- inspect -------------------------------------------------------------------------------------

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


def _cmd_inspect(args: argparse.Namespace) -> int:
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


# --- compare -------------------------------------------------------------------------------------


def _cmd_compare(args: argparse.Namespace) -> int:
    try:
        old, new = Report.load(args.old), Report.load(args.new)
    except ReportError as error:
        print(f"pytest-hotswap compare: {error}", file=sys.stderr)
        return 2
    comparison = compare(old, new, args.fail_on)
    print("\n".join(comparison.lines()))
    return 1 if comparison.failed else 0


# --- stacks: one table from the conformance reports of several stacks ----------------------------


def conformance_matrix(name: str, report: Report) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The stack and the rows of a report's conformance matrix, every field checked: a problem
    is a ``ReportError`` naming ``name`` and the field."""
    matrix = report.extra.get("conformance")
    if matrix is None:
        raise ReportError(f"{name}: no conformance matrix in it (run the conformance suite)")
    _expect(name, "conformance", matrix, dict, "an object")
    stack = matrix.get("stack")
    if stack is not None:
        _string_map(name, "conformance.stack", stack, "package names to version strings")
    rows = matrix.get("rows", [])
    _expect(name, "conformance.rows", rows, list, "a list")
    for index, row in enumerate(rows):
        where = f"conformance.rows[{index}]"
        _expect(name, where, row, dict, "an object")
        _expect(name, f"{where}.scenario", row.get("scenario"), str, "a string")
        _string_map(name, f"{where}.results", row.get("results"), "columns to verdict strings")
    return (stack or report.versions), rows


def _expect(name: str, field: str, value: Any, kind: type, what: str) -> None:
    if not isinstance(value, kind):
        raise ReportError(f"{name}: '{field}' must be {what}, got {_json_kind(value)}")


def _string_map(name: str, field: str, value: Any, what: str) -> None:
    _expect(name, field, value, dict, f"an object mapping {what}")
    for key, item in value.items():
        _expect(name, f"{field}.{key}", item, str, "a string")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return f"a JSON {kinds.get(type(value), 'object' if isinstance(value, dict) else 'value')}"


def stack_table(reports: dict[str, Report]) -> list[str]:
    """Stack by scenario: one row per (scenario, pipeline-implementation) cell, one column per
    stack, then what changes between stacks (the answer to "what changes if we upgrade?")."""
    from pytest_hotswap.report import format_table

    cells: dict[tuple[str, str], dict[str, str]] = {}
    stacks: dict[str, dict[str, Any]] = {}
    for name, report in reports.items():
        stacks[name], rows = conformance_matrix(name, report)
        for row in rows:
            for column, verdict in row["results"].items():
                cells.setdefault((row["scenario"], column), {})[name] = verdict
    names = list(reports)
    lines = [
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in stack.items())
        for name, stack in stacks.items()
    ]
    rows = [[s, c, *(v.get(n, "-") for n in names)] for (s, c), v in cells.items()]
    lines += format_table(["scenario", "column", *names], rows, indent="")
    changed = [row for row in rows if len(set(row[2:])) > 1]
    lines.append(f"{len(changed)} cells differ between stacks" + (":" if changed else ""))
    for row in changed:
        steps = ", ".join(
            f"{name}: {verdict}" for name, verdict in zip(names, row[2:], strict=True)
        )
        lines.append(f"  {row[0]} [{row[1]}]: {steps}")
    return lines


def _cmd_stacks(args: argparse.Namespace) -> int:
    try:
        reports: dict[str, Report] = {}
        for path in args.reports:
            if path.stem in reports:
                raise ReportError(
                    f"{path}: a second report named {path.stem!r}; stacks are named by file "
                    "name, so give each report its own"
                )
            reports[path.stem] = Report.load(path)
            conformance_matrix(str(path), reports[path.stem])  # errors name the file
        print("\n".join(stack_table(reports)))
    except ReportError as error:
        print(f"pytest-hotswap stacks: {error}", file=sys.stderr)
        return 2
    return 0


def _thresholds(text: str) -> tuple[Threshold, ...]:
    try:
        return parse_fail_on(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _max_rank(text: str) -> int | str:
    try:
        return parse_max_rank_or_auto(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pytest-hotswap",
        description="Compare pytest-hotswap reports and inspect LoRA adapters before a hotswap",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    cmp = commands.add_parser(
        "compare",
        help="Compare two --hotswap-report JSON files; exit 1 on a regression",
        description="Compare NEW with the baseline OLD per test; exit 1 when a threshold is "
        "exceeded, 2 when a report cannot be read. Tests new or gone since OLD are listed, not failed",
    )
    cmp.add_argument("old", type=Path, metavar="OLD", help="The baseline report")
    cmp.add_argument("new", type=Path, metavar="NEW", help="The report to check")
    cmp.add_argument(
        "--fail-on",
        type=_thresholds,
        default=parse_fail_on(DEFAULT_FAIL_ON),
        metavar="EXPR",
        help="Comma list of METRIC:N (cap) or METRIC:+P%% (growth over OLD); METRIC is compiles, "
        "recompiles, cache_switches, layout_changes, graph_breaks, compile_s or swap_ms (median). "
        f"Default: {DEFAULT_FAIL_ON}",
    )
    cmp.set_defaults(run=_cmd_compare)

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
    insp.set_defaults(run=_cmd_inspect)

    stk = commands.add_parser(
        "stacks",
        help="One table from the conformance reports of several stacks (make stacks)",
        description="Combine --hotswap-report files of conformance runs on different stacks: "
        "scenario by stack, then every cell that differs between stacks. A report's name is "
        "its file name without .json",
    )
    stk.add_argument("reports", nargs="+", type=Path, metavar="REPORT", help="Conformance reports")
    stk.set_defaults(run=_cmd_stacks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
