"""Fixtures shared by the test modules under tests/ (the root conftest.py sets the environment)."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest


@pytest.fixture(scope="module")
def reference_compile_environment() -> Iterator[None]:
    """:func:`reference_support.compile_environment` around one test module. The reference test
    modules ask for it in their ``pytestmark`` (``usefixtures`` comes before the fixtures a test
    names, so it is set up before their module fixtures build and compile models); the other
    modules compile without it."""
    from reference_support import compile_environment

    with compile_environment():
        yield


#: Module fixtures that run a whole pytest session or the bench in a subprocess: every test that
#: uses one is slow (``make test-slow``), so ``make test`` never pays for them.
SLOW_FIXTURES = frozenset({"conformance_run", "smoke", "batch"})


@pytest.hookimpl(wrapper=True)  # before -m deselects; after pytest-xdist names the groups
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Generator[None, None, None]:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    result = yield
    from pytest_hotswap.plugin.xdist_groups import restore_group_suffixes

    restore_group_suffixes(config, items)  # `make test`'s --dist loadgroup (xdist#1386)
    return result
