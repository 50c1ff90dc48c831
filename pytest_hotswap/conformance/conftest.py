"""Hooks and fixtures of the conformance suite; its library is :mod:`.support`, the matrix :mod:`.matrix`."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from pytest_hotswap.conformance.matrix import register_matrix
from pytest_hotswap.conformance.support import (
    EAGER_PROPERTY,
    CatalogCase,
    catalog_for,
    take_eager_seconds,
)


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
    """Each column (pipeline x implementation) runs as one block, its catalog cells last: the
    scenarios that share a configuration's compiled pipeline run one after the other, and no
    other column's compiles come between them. Under ``pytest-xdist --dist loadgroup`` each
    column is one group, so one worker runs it in that order. Verdicts do not depend on the
    order (the suite's promise); this saves rebuilds, not correctness."""
    _group_by_column(config, items)
    result = yield
    from pytest_hotswap.plugin.xdist_groups import restore_group_suffixes

    restore_group_suffixes(config, items)  # pytest-xdist#1386: see the module
    return result


def _group_by_column(config: pytest.Config, items: list[pytest.Item]) -> None:
    columns: dict[pytest.Item, tuple[str, str]] = {}
    for item in items:
        column = _column(item)
        if column is not None:
            columns[item] = column
    order = {column: index for index, column in enumerate(dict.fromkeys(columns.values()))}
    positions = {item: index for index, item in enumerate(items)}
    items.sort(
        key=lambda item: (
            order.get(columns.get(item), -1),  # type: ignore[arg-type]
            "catalog_case" in getattr(item, "fixturenames", ()),
            positions[item],
        )
    )
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item, column in columns.items():
        item.add_marker(pytest.mark.xdist_group("-".join(map(str, column))))


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
