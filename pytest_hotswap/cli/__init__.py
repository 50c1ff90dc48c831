"""The ``pytest-hotswap`` command: compare two reports, inspect LoRA adapter files or a catalog,
combine the conformance reports of several stacks; one module per command.

``inspect`` reads safetensors headers only (names, shapes, metadata, kohya's alpha scalars); no
weight is loaded, so it is instant on multi-GB adapters and safe on files of unknown origin, and
anything but a regular ``.safetensors`` file is refused unopened. No pytest, no torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from pytest_hotswap.cli import compare, inspect, stacks
from pytest_hotswap.cli.inspect import diffusers_verdict, format_adapter, format_plan
from pytest_hotswap.cli.stacks import conformance_matrix, stack_table

__all__ = [
    "build_parser",
    "conformance_matrix",
    "diffusers_verdict",
    "format_adapter",
    "format_plan",
    "main",
    "stack_table",
]


class _Parser(argparse.ArgumentParser):
    """argparse with the error first and the usage after it, not the other way round."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n{self.format_usage()}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pytest-hotswap",
        description="Compare pytest-hotswap reports and inspect LoRA adapters before a hotswap",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for command in (compare, inspect, stacks):
        command.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
