"""pytest glue for pytest-hotswap (entry point ``hotswap``). Filled in by the plugin-core work."""

from __future__ import annotations

import pytest


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_hotswap import hookspecs

    pluginmanager.add_hookspecs(hookspecs)
