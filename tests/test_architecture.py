"""The package's shape, checked from its source text (``ast``; nothing of it is imported).

* No import circle between package files. Every runtime import counts, also one inside a
  function (a lazy import still runs, and a circle through it breaks whoever imports first);
  imports under ``if TYPE_CHECKING:`` are left out, since they never run. ``from pkg import
  name`` counts as an import of ``pkg.name`` when that is a module of the package, else of
  ``pkg``; a package's ``__init__`` imported on the way to a submodule is not counted (the
  lazy ``__getattr__`` re-exports of ``pytest_hotswap.adapters`` and ``.pipelines`` import
  nothing until a name is asked for).
* No module over 500 lines, no class over 220.
* No implementation is chosen by comparing a string with its name: implementations answer
  for themselves (``Implementation.refusals``, ``features``, ``rejection`` ...).

Each checker runs on a small synthetic source first, where it must report what it is for.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_hotswap"
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 220
#: The names of the built-in implementations: comparing a string with one of them chooses by name.
IMPLEMENTATION_NAMES = ("diffusers", "peft", "reference")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(name: str, source: str, modules: set[str], *, package: bool) -> set[str]:
    """The package modules ``source`` (module ``name``) imports at run time, wherever it does."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_node(other)
                continue
            visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if package else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        visit(node)

    visit(ast.parse(source))
    return {module for module in found if module in modules and module != name}


def import_graph(sources: Mapping[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """``{module: (source, is_package)}`` to ``{module: modules it imports}``."""
    modules = set(sources)
    return {
        name: runtime_imports(name, text, modules, package=package)
        for name, (text, package) in sources.items()
    }


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def oversize_classes(source: str, limit: int = MAX_CLASS_LINES) -> list[tuple[str, int]]:
    """``(class name, lines)`` of every class (nested ones too) longer than ``limit``."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)  # type: ignore[operator]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > limit  # type: ignore[operator]
    ]


#: Names of what holds an adapter file's format, where "peft" is a key format, not an
#: implementation.
FORMAT_NAMES = ("format", "fmt")


def _names_a_format(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id in FORMAT_NAMES) or (
        isinstance(node, ast.Attribute) and node.attr in FORMAT_NAMES
    )


def name_comparisons(source: str) -> list[str]:
    """Comparisons (``==``, ``!=``, ``in``, ``not in``) of anything but an adapter's format with
    an implementation's name written as a string, and ``match`` cases on one: choosing an
    implementation by name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names_a_format(operand) for operand in operands):
                continue
            for operand in operands:
                texts = []
                if isinstance(operand, ast.Constant):
                    texts = [operand.value]
                elif isinstance(operand, (ast.Tuple, ast.List, ast.Set)):
                    texts = [e.value for e in operand.elts if isinstance(e, ast.Constant)]
                if any(text in IMPLEMENTATION_NAMES for text in texts):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
                    break
        elif (
            isinstance(node, ast.MatchValue)
            and isinstance(node.value, ast.Constant)
            and node.value.value in IMPLEMENTATION_NAMES
        ):
            found.append(f"line {node.lineno}: case {node.value.value!r}")
    return found


def _package_sources() -> dict[str, tuple[str, bool]]:
    return {
        module_name(path, PACKAGE): (path.read_text(), path.name == "__init__.py")
        for path in sorted(PACKAGE.rglob("*.py"))
    }


FILES = sorted(PACKAGE.rglob("*.py"))
IDS = [str(path.relative_to(PACKAGE.parent)) for path in FILES]


# --- the checkers, on synthetic sources: each must report what it is for ---------------------------


def test_the_circle_checker_finds_a_circle_through_a_function_level_import():
    sources = {
        "pkg": ("", True),
        "pkg.a": ("from pkg.b import thing\n", False),
        "pkg.b": ("def f():\n    from pkg import c\n    return c\n", False),
        "pkg.c": ("import pkg.a\n", False),
        "pkg.d": ("from pkg.a import thing\n", False),  # imports into the circle, not part of it
    }
    assert circles(import_graph(sources)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_circle_checker_leaves_out_type_checking_imports_and_resolves_relative_ones():
    sources = {
        "pkg": ("", True),
        "pkg.a": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.b\n", False),
        "pkg.b": ("from . import a\n", False),
    }
    graph = import_graph(sources)
    assert graph == {"pkg": set(), "pkg.a": set(), "pkg.b": {"pkg.a"}}
    assert circles(graph) == []
    # the same import outside TYPE_CHECKING closes the circle
    sources["pkg.a"] = ("import pkg.b\n", False)
    assert circles(import_graph(sources)) == [["pkg.a", "pkg.b"]]


def test_the_class_checker_reports_an_oversize_class_and_not_a_small_one():
    big = "class Big:\n" + "    x = 1\n" * MAX_CLASS_LINES
    small = "class Small:\n" + "    x = 1\n" * (MAX_CLASS_LINES - 1)
    assert oversize_classes(big + small) == [("Big", MAX_CLASS_LINES + 1)]


def test_the_name_checker_reports_choosing_by_name_and_not_other_comparisons():
    source = (
        "if impl == 'reference': pass\n"
        "if 'diffusers' != name: pass\n"
        "ok = check in ('reference', 'diffusers')\n"
        "match name:\n    case 'peft': pass\n"
        "fine = fmt == 'peft' or header.format != 'peft' or impl.name == other.name\n"
    )
    assert name_comparisons(source) == [
        "line 1: impl == 'reference'",
        "line 2: 'diffusers' != name",
        "line 3: check in ('reference', 'diffusers')",
        "line 5: case 'peft'",
    ]


# --- the package ---------------------------------------------------------------------------------


def test_no_import_circle_between_package_files():
    graph = import_graph(_package_sources())
    assert sum(len(imported) for imported in graph.values()) > 50  # the graph was read at all
    assert circles(graph) == []


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_module_size(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines"
    assert oversize_classes(path.read_text()) == []


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_no_implementation_is_chosen_by_comparing_its_name(path: Path):
    assert name_comparisons(path.read_text()) == []


def test_inspect_check_loops_over_implementation_objects():
    """``--check`` offers the implementations that give a verdict on files, by their objects."""
    from pytest_hotswap.cli import build_parser
    from pytest_hotswap.implementations import ImplementationRegistry

    registry = ImplementationRegistry()
    with_verdict = [i.name for i in registry.values() if i.inspect_label]
    assert with_verdict == ["diffusers", "reference"]
    check = next(
        a
        for a in build_parser()._subparsers._group_actions[0].choices["inspect"]._actions
        if a.dest == "check"
    )
    assert list(check.choices) == with_verdict
    with pytest.raises(NotImplementedError, match="'peft' implementation gives no verdict"):
        registry["peft"].refusals([], 8)
