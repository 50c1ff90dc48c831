"""Hooks and fixtures of the conformance suite; its library is :mod:`.support`, the matrix :mod:`.matrix`."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from pytest_hotswap.conformance.matrix import register_matrix
from pytest_hotswap.conformance.support import (
    DEFECT_SCENARIOS,
    EAGER_PROPERTY,
    CatalogCase,
    catalog_for,
    take_eager_seconds,
)
from pytest_hotswap.stacks import KnownDefect


def pytest_configure(config: pytest.Config) -> None:
    register_matrix(config)


@pytest.hookimpl(tryfirst=True)  # before the teardown report is made from the item
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    if call.when == "teardown":
        item.user_properties.append((EAGER_PROPERTY, take_eager_seconds()))


@pytest.hookimpl(wrapper=True)  # around pytest-xdist's, which reads the groups
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Generator[None, None, None]:
    """Run the suite in blocks that share compiled pipelines, in an order that shares compiles.

    A block is a column (pipeline x implementation), with the column's catalog cells and its
    known-defect cells in blocks of their own: neither uses the column's default pipeline (the
    catalog's pipelines are built from the catalog, known-defect cells build eager ones). Under
    ``pytest-xdist --dist loadgroup`` each block is one group, run by one worker in this order
    (``make conformance`` passes ``--no-loadscope-reorder`` so groups start in this order too;
    :func:`_block_order` says why this order). Verdicts do not depend on the order (the suite's
    promise); this saves compiles only.
    """
    _order_blocks(config, items)
    result = yield
    from pytest_hotswap.plugin.xdist_groups import restore_group_suffixes

    restore_group_suffixes(config, items)  # pytest-xdist#1386: see the module
    return result


def _order_blocks(config: pytest.Config, items: list[pytest.Item]) -> None:
    from pytest_hotswap.plugin.fixtures import session_of

    implementations = session_of(config).implementations
    blocks: dict[pytest.Item, tuple[str, str, str]] = {}
    breaks: dict[pytest.Item, int] = {}
    for item in items:
        column = _column(item)
        if column is None:
            continue
        defect = _static_defect(item, implementations.get(column[1]))
        part = CATALOG if "catalog_case" in getattr(item, "fixturenames", ()) else ""
        blocks[item] = (*column, DEFECTS if defect is not None else part)
        breaks[item] = BREAKING.get(defect.failure, 0) if defect is not None else 0
    order = _block_order(list(dict.fromkeys(blocks.values())), implementations)
    positions = {item: index for index, item in enumerate(items)}
    items.sort(
        key=lambda item: (
            order.get(blocks.get(item), -1),  # type: ignore[arg-type]
            breaks.get(item, 0),
            positions[item],
        )
    )
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item, block in blocks.items():
        item.add_marker(pytest.mark.xdist_group("-".join(filter(None, block))))


#: The names of a column's block of known-defect cells (``sd-diffusers-defects``) and of its
#: catalog cells (``sd-diffusers-catalog``: pipelines of their own, built from the catalog).
DEFECTS, CATALOG = "defects", "catalog"
#: Known-defect cells that leave their pipeline changed run after the others of their block,
#: so the others share it before it must be rebuilt: a failed swap that changed the model (the
#: cell's own pipeline, mostly), then an accepted adapter that re-shaped the shared one.
BREAKING = {KnownDefect.MODEL_CHANGED: 1, KnownDefect.NOT_REJECTED: 2}


def _static_defect(item: pytest.Item, implementation: Any) -> KnownDefect | None:
    """The scenario's known defect as collection can tell it (the catalog's and a pipeline
    trait's are known only once the files or the pipeline are built: those cells stay in the
    column's block)."""
    if implementation is None or "hotswap_pipeline" not in getattr(item, "fixturenames", ()):
        return None
    scenario = getattr(item, "originalname", item.name).removeprefix("test_")
    return implementation.defect(DEFECT_SCENARIOS.get(scenario, scenario))


def _block_order(
    blocks: list[tuple[str, str, str]], implementations: Any
) -> dict[tuple[str, str, str], int]:
    """First the columns of the implementation with the most features (the reference: union
    padding, text encoders, slots), pipeline by pipeline: they compile the most configurations,
    among them the default and quantized graphs every implementation's passing cells compile
    alike. Then, pipeline by pipeline, the blocks with graphs of their own (the other
    implementations' catalogs, the known-defect blocks, eager), the first implementation's
    catalog, and last the other implementations' columns: by then the graphs they share are in
    inductor's FX graph cache, where a column started at once on the other worker would compile
    them again at the same time. Bigger pipelines come first, so the small blocks end the run."""
    names = [
        name for name in dict.fromkeys(block[1] for block in blocks) if name in implementations
    ]
    first = max(names, key=lambda name: len(implementations[name].features), default=None)
    pipelines = list(dict.fromkeys(block[0] for block in blocks))

    def rank(block: tuple[str, str, str]) -> tuple[int, int, int]:
        pipeline, implementation, part = block
        if implementation == first and not part:
            return (0, pipelines.index(pipeline), 0)
        if part == DEFECTS:
            within = 1
        elif part == CATALOG:
            within = 2 if implementation == first else 0
        else:
            within = 3
        return (1, pipelines.index(pipeline), within)

    return {block: index for index, block in enumerate(sorted(blocks, key=rank))}


def _column(item: pytest.Item) -> tuple[str, str] | None:
    """``(pipeline, implementation)`` of a scenario or catalog cell, else ``None``."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    column = callspec.params.get("hotswap_pipeline")
    if column is not None:
        return tuple(column)  # type: ignore[return-value]
    case = callspec.params.get("catalog_case")
    return (case[0], case[1]) if case is not None else None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``catalog_case``: every file of the catalog x pipeline x implementation, ids
    ``sd-reference|file.safetensors`` (the matrix shows one row per file)."""
    if "catalog_case" not in metafunc.fixturenames:
        return
    from pytest_hotswap.adapters import catalog_recipe_names
    from pytest_hotswap.pipelines.saved import label_of
    from pytest_hotswap.plugin.fixtures import session_of

    session = session_of(metafunc.config)
    catalog = session.catalog
    files = [e.name for e in catalog.entries] if catalog is not None else catalog_recipe_names()
    params = [
        (pipeline, implementation, file)
        for pipeline in session.options.pipelines
        for implementation in session.options.implementations
        for file in files
    ]
    ids = [f"{label_of(p, session.options.pipelines)}-{i}|{f}" for p, i, f in params]
    metafunc.parametrize("catalog_case", params, ids=ids, indirect=True)


@pytest.fixture
def catalog_case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> CatalogCase:
    from pytest_hotswap.plugin.fixtures import session_of

    pipeline, implementation, file = request.param
    session = session_of(request.config)
    catalog, diffusers = catalog_for(session, pipeline, tmp_path_factory)
    entry = next((e for e in catalog.entries if e.name == file), None)
    if entry is None:
        pytest.skip(f"n/a: the generated catalog of {pipeline} has no {file}")
    max_rank = session.resolved_options.max_rank
    usable = catalog.usable(max_rank, diffusers=diffusers)
    if not usable:
        pytest.fail(
            f"no file of the catalog {catalog.source} can be hotswapped at max rank {max_rank}"
        )
    impl = session.implementations[implementation]
    return CatalogCase(
        pipeline, implementation, entry, usable[0], usable, max_rank, impl.features, diffusers
    )
