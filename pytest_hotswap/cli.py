"""The ``pytest-hotswap`` command: compare two reports, inspect LoRA adapter files.

``inspect`` reads safetensors headers only (names, shapes, metadata); no tensor is loaded, so it
is instant on multi-GB adapters and safe on files of unknown origin. No pytest, no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_hotswap.report import (
    DEFAULT_FAIL_ON,
    Report,
    ReportError,
    Threshold,
    compare,
    parse_fail_on,
)

DEFAULT_MAX_RANK = 128
# "<layer>.lora_A.weight", "<layer>.lora_A.<adapter>.weight", kohya's "<layer>.lora_down.weight",
# and the older diffusers "<layer>.lora.down.weight" / "<layer>.lora_linear_layer.down.weight".
_LORA_KEY = re.compile(
    r"^(?P<layer>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up"
    r"|lora_linear_layer\.down|lora_linear_layer\.up)(?:\.[^.]+)?\.weight$"
)
_DOWN_PARTS = ("lora_A", "lora_down", "lora.down", "lora_linear_layer.down")
_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_transformer_": "transformer",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
}
_COMPONENTS = ("unet", "transformer", "prior", "decoder")
_PICKLE_HINT = (
    "is a pickle (torch.save) file, not safetensors: loading a pickle can run code; convert it "
    "to .safetensors with a tool you trust (safetensors.torch.save_file)"
)


@dataclasses.dataclass
class AdapterInfo:
    """What a LoRA file's header says. Layers are keyed ``component/module_path`` with ``.`` and
    ``_`` unified, so a kohya file and a diffusers file for the same model compare equal."""

    path: str
    format: str = "unknown"
    error: str | None = None
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # layer key -> name in file
    io_shapes: dict[str, list[list[int]]] = dataclasses.field(default_factory=dict)
    alpha: Any = None
    kohya_alpha_keys: int = 0
    rejected: list[str] = dataclasses.field(default_factory=list)  # why a hotswap would refuse it
    subset_of_first: bool | None = None

    @property
    def rank(self) -> int | None:
        return max(self.ranks.values(), default=None)

    @property
    def text_encoder_layers(self) -> list[str]:
        return [self.names[key] for key in self.ranks if key.startswith("text_encoder")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "error": self.error,
            "format": self.format,
            "rank": self.rank,
            "ranks": {self.names[key]: rank for key, rank in self.ranks.items()},
            "alpha": self.alpha,
            "layers": [self.names[key] for key in self.ranks],
            "text_encoder_layers": self.text_encoder_layers,
            "subset_of_first": self.subset_of_first,
            "rejected": self.rejected,
        }


def read_adapter(path: str | Path) -> AdapterInfo:
    """Read one adapter's header; a file that cannot be read gets ``error``, never a traceback."""
    info = AdapterInfo(path=str(path))
    try:
        keys, shapes, metadata = _read_header(Path(path))
    except (OSError, ValueError) as error:
        info.error = str(error)
        return info
    down: dict[str, list[int]] = {}
    up: dict[str, list[int]] = {}
    for key in keys:
        if key.endswith(".alpha"):
            info.kohya_alpha_keys += 1
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        layer_key, name = _layer_key(match["layer"])
        info.names[layer_key] = name
        (down if match["part"] in _DOWN_PARTS else up)[layer_key] = shapes[key]
    if not down:
        info.error = "no LoRA weights in it (no lora_A / lora_down keys): is it a LoRA adapter?"
        return info
    info.format = _detect_format(keys)
    for layer_key, shape in down.items():
        info.ranks[layer_key] = shape[0]
        out = up.get(layer_key, [])
        info.io_shapes[layer_key] = [shape[1:], out[:1] + out[2:]]
    info.alpha = _alpha_from_metadata(metadata)
    return info


def _read_header(path: Path) -> tuple[list[str], dict[str, list[int]], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise ValueError("no such file")
    if path.is_dir():
        raise ValueError("is a directory; give the .safetensors file inside it")
    with path.open("rb") as handle:
        head = handle.read(2)
    if head == b"PK" or (len(head) == 2 and head[0] == 0x80 and head[1] <= 5):
        raise ValueError(_PICKLE_HINT)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in keys}
            return keys, shapes, handle.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"not a valid safetensors file ({error}); truncated or corrupt?") from None


def _layer_key(layer: str) -> tuple[str, str]:
    """``(component/module_path, name as written)``; kohya's ``_`` and diffusers' ``.`` unified."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if layer.startswith(prefix):
            return f"{component}/{layer[len(prefix) :]}", layer
    component, _, rest = layer.partition(".")
    if component in _COMPONENTS or component.startswith("text_encoder"):
        return f"{component}/{rest.replace('.', '_')}", layer
    return f"/{layer.removeprefix('base_model.model.').replace('.', '_')}", layer


def _detect_format(keys: Sequence[str]) -> str:
    if any(key.startswith(tuple(_KOHYA_PREFIXES)) for key in keys):
        return "kohya"
    if any(key.partition(".")[0] in _COMPONENTS or key.startswith("text_encoder") for key in keys):
        return "diffusers"
    return "peft"


def _alpha_from_metadata(metadata: dict[str, str]) -> Any:
    """``lora_alpha`` from the adapter config diffusers / PEFT save next to the weights, if any."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return None
    alphas = {
        key.removesuffix("lora_alpha").rstrip("."): value
        for key, value in config.items()
        if key.endswith("lora_alpha")
    }
    if len(set(map(str, alphas.values()))) == 1:
        return next(iter(alphas.values()))
    return alphas or None


def judge(adapters: Sequence[AdapterInfo], max_rank: int) -> None:
    """Fill in, for each adapter, why a hotswap after loading the first one would reject it."""
    readable = [a for a in adapters if a.error is None]
    for adapter in adapters:
        if adapter.error is not None:
            adapter.rejected.append("unreadable")
    for adapter in readable:
        if adapter.rank is not None and adapter.rank > max_rank:
            adapter.rejected.append(f"rank {adapter.rank} > max rank {max_rank}")
    if not readable or readable[0] is not adapters[0]:
        return
    first = adapters[0]
    for adapter in readable[1:]:
        extra = [
            adapter.names[key]
            for key in adapter.ranks
            if key not in first.ranks and not key.startswith("text_encoder")
        ]
        adapter.subset_of_first = not extra
        if extra:
            adapter.rejected.append(
                f"targets {len(extra)} layers the first does not ({_sample(extra)})"
            )
        if adapter.text_encoder_layers:
            adapter.rejected.append(
                f"has {len(adapter.text_encoder_layers)} text-encoder layers, which hotswap "
                "does not support"
            )
        mismatched = [
            adapter.names[key]
            for key, shapes in adapter.io_shapes.items()
            if key in first.io_shapes and shapes != first.io_shapes[key]
        ]
        if mismatched:
            adapter.rejected.append(
                f"{len(mismatched)} layers have other in/out shapes than in the first, "
                f"so it is for another model ({_sample(mismatched)})"
            )


def _sample(names: Sequence[str], count: int = 3) -> str:
    more = f", ... {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def format_adapter(adapter: AdapterInfo, *, list_layers: bool) -> list[str]:
    if adapter.error is not None:
        return [f"{adapter.path}: error: {adapter.error}"]
    ranks = set(adapter.ranks.values())
    rank = f"rank {adapter.rank}" if len(ranks) == 1 else f"rank {min(ranks)}-{max(ranks)} (varies)"
    if adapter.alpha is not None:
        alpha = f"alpha {adapter.alpha}"
    elif adapter.kohya_alpha_keys:
        alpha = f"alpha in {adapter.kohya_alpha_keys} per-layer tensors (not read)"
    else:
        alpha = "alpha not in metadata"
    components = Counter(key.partition("/")[0] or "model" for key in adapter.ranks)
    layers = ", ".join(f"{count} {component}" for component, count in components.items())
    if adapter.format != "kohya":  # kohya names have no dots to tell the module from its path
        modules = Counter(_module_kind(adapter.names[key]) for key in adapter.ranks)
        layers += f" ({', '.join(f'{kind} x{count}' for kind, count in modules.items())})"
    lines = [
        f"{adapter.path}: {adapter.format}, {rank}, {alpha}",
        f"  layers: {layers}",
        f"  text-encoder layers: {len(adapter.text_encoder_layers) or 'none'}",
    ]
    if list_layers or len(ranks) > 1:
        lines += [f"    {adapter.names[key]}: rank {r}" for key, r in adapter.ranks.items()]
    return lines


def _module_kind(name: str) -> str:
    """The last part of a module path (``to_q``, ``proj_in``, ``ff.net.2`` -> ``net.2``)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def format_verdicts(adapters: Sequence[AdapterInfo], max_rank: int) -> list[str]:
    ranks = [a.rank for a in adapters if a.rank is not None]
    lines = [f"max rank: {max(ranks, default='-')} (checked against --max-rank {max_rank})"]
    first = adapters[0]
    if first.error is None:
        lines.append(f"{first.path}: loaded first; later files are hotswapped into it")
        if first.text_encoder_layers:
            lines.append("  note: its text-encoder layers cannot be hotswapped later")
    for adapter in adapters:
        if adapter.rejected:
            lines.append(f"{adapter.path}: REJECTED: {'; '.join(adapter.rejected)}")
        elif adapter is not first and first.error is not None:
            lines.append(f"{adapter.path}: not compared, the first file is unreadable")
        elif adapter is not first:
            shared = len(adapter.ranks)
            kind = "same layers as" if shared == len(first.ranks) else "a subset of"
            lines.append(
                f"{adapter.path}: ok, targets {kind} the first ({shared} of {len(first.ranks)} layers)"
            )
    return lines


# --- commands ------------------------------------------------------------------------------------


def _cmd_compare(args: argparse.Namespace) -> int:
    try:
        old, new = Report.load(args.old), Report.load(args.new)
    except ReportError as error:
        print(f"pytest-hotswap compare: {error}", file=sys.stderr)
        return 2
    comparison = compare(old, new, args.fail_on)
    print("\n".join(comparison.format()))
    return 1 if comparison.failed else 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    adapters = [read_adapter(path) for path in args.paths]
    judge(adapters, args.max_rank)
    if args.json:
        ranks = [a.rank for a in adapters if a.rank is not None]
        data = {
            "max_rank": max(ranks, default=None),
            "limit": args.max_rank,
            "files": [a.to_dict() for a in adapters],
        }
        print(json.dumps(data, indent=2))
    else:
        for adapter in adapters:
            print("\n".join(format_adapter(adapter, list_layers=args.layers)))
        if len(adapters) > 1 or adapters[0].rejected:
            print("\n".join(format_verdicts(adapters, args.max_rank)))
    return 1 if any(a.rejected for a in adapters) else 0


def _thresholds(text: str) -> tuple[Threshold, ...]:
    try:
        return parse_fail_on(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pytest-hotswap",
        description="Compare pytest-hotswap reports and inspect LoRA adapters before a hotswap",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cmp = commands.add_parser(
        "compare",
        help="Compare two --hotswap-report JSON files; exit 1 on a regression",
        description="Compare NEW with the baseline OLD per test; exit 1 when a threshold is "
        "exceeded. Tests new or gone since OLD are listed, not failed",
    )
    cmp.add_argument("old", type=Path, metavar="OLD", help="The baseline report")
    cmp.add_argument("new", type=Path, metavar="NEW", help="The report to check")
    cmp.add_argument(
        "--fail-on",
        type=_thresholds,
        default=parse_fail_on(DEFAULT_FAIL_ON),
        metavar="EXPR",
        help="Comma list of METRIC:N (cap) or METRIC:+P%% (growth over OLD); METRIC is compiles, "
        f"recompiles, graph_breaks, compile_s or swap_ms (median). Default: {DEFAULT_FAIL_ON}",
    )
    cmp.set_defaults(run=_cmd_compare)

    insp = commands.add_parser(
        "inspect",
        help="Show rank, alpha, targets and format of LoRA .safetensors files (headers only)",
        description="Read adapter headers (no tensors) and report rank, alpha, targeted layers, "
        "text-encoder keys and format. With several files the first is the one loaded before "
        "compiling: each later file is checked as a hotswap into it. Exit 1 when a file is "
        "unreadable or would be rejected",
    )
    insp.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="Adapter files")
    insp.add_argument(
        "--max-rank",
        type=_positive_int,
        default=DEFAULT_MAX_RANK,
        help=f"The rank adapters are padded to (--hotswap-max-rank); default {DEFAULT_MAX_RANK}",
    )
    insp.add_argument("--layers", action="store_true", help="List every targeted layer")
    insp.add_argument("--json", action="store_true", help="Print JSON for machines")
    insp.set_defaults(run=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
