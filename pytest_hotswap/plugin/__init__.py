"""pytest glue for pytest-hotswap (entry point ``hotswap``): hooks that delegate to the session.

Options come from ``pytest_hotswap.options`` (each declared once), the state of a run lives in
``session.HotswapSession``, fixtures in ``fixtures``, the report in ``reporting``. Loading the
plugin imports neither torch nor diffusers: a session that uses no hotswap fixture, marker or
option never imports them, and costs a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pytest

from pytest_hotswap import options as opts
from pytest_hotswap.plugin.fixtures import (
    hotswap_catalog,
    hotswap_pipeline,
    hotswap_pipeline_factory,
    lora_factory,
    pytest_generate_tests,
    pytest_hotswap_build_pipeline,
)
from pytest_hotswap.plugin.session import (
    ITEM_KEY,
    SESSION_KEY,
    HotswapSession,
)
from pytest_hotswap.plugin.start import check_implementations, header_lines, is_xdist_controller

if TYPE_CHECKING:
    from pytest_hotswap.watch import CompileWatcher

#: Registered with this module: ``--hotswap-devices`` and ``--hotswap-compile-cache`` act first.
pytest_plugins = ("pytest_hotswap.plugin.scale",)

__all__ = [
    "SESSION_KEY",
    "compile_watcher",
    "hotswap_catalog",
    "hotswap_options",
    "hotswap_pipeline",
    "hotswap_pipeline_factory",
    "lora_factory",
    "pytest_generate_tests",
    "pytest_hotswap_build_pipeline",
]


def _session(config: pytest.Config) -> HotswapSession:
    return config.stash[SESSION_KEY]


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_hotswap import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hotswap", "LoRA hotswap without recompiles (pytest-hotswap)")
    for option in opts.OPTIONS:
        text = option.help_text()
        if option.flag:
            group.addoption(
                option.cli, action="store_true", default=None, dest=option.ini, help=text
            )
            parser.addini(option.ini, text, type="bool", default=None)
        else:
            metavar = option.field.upper()
            group.addoption(
                option.cli, dest=option.ini, metavar=metavar, help=text.replace("%", "%%")
            )
            parser.addini(option.ini, text, default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "no_recompile(max_recompiles=0, fresh=False, count_all=False): fail the test when dynamo "
        "recompiles more than max_recompiles times during its setup and call (first compiles are "
        "fine), at the guard of the recompile past the allowance, before it compiles; "
        "count_all=True compiles on and counts every recompile; fresh=True resets dynamo first",
    )
    config.addinivalue_line(
        "markers",
        "hotswap(pipeline=None, max_rank=None, backend=None, quantize=None, compile_scope=None): "
        "per-test overrides for the hotswap fixtures",
    )
    session = HotswapSession(config)
    config.stash[SESSION_KEY] = session
    check_implementations(session)
    if is_xdist_controller(config) and any("conformance" in str(arg) for arg in config.args):
        from pytest_hotswap.conformance.matrix import register_matrix

        register_matrix(config)  # the suite's own conftest loads in the workers only


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.close()
        del config.stash[SESSION_KEY]


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    return header_lines(_session(config))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _session(config).collect(items)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    _session(item.config).start_test(item)
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    session = _session(item.config)
    if session.watcher_of(item) is None:
        return (yield)
    test = item.stash[ITEM_KEY]
    try:
        with test.fail_at_guard():
            result = yield
    except BaseException as error:
        if not (test.is_storm_failure(error) or test.is_guard_stop(error)):
            session.call_recompile_hooks(item)
            raise
        result = None
    session.call_recompile_hooks(item)
    message = session.verdict(item)
    if message is not None:
        pytest.fail(message, pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    _session(item.config).note_report(item, report)
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    session = _session(item.config)
    session.end_test(item)
    try:
        return (yield)
    finally:
        session.finish_test(item)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def compile_watcher(request: pytest.FixtureRequest) -> Iterator[CompileWatcher]:
    """The ``CompileWatcher`` around this test's setup and call (fixtures put context in it)."""
    state = request.node.stash.get(ITEM_KEY, None)
    if state is not None and state.watcher is not None:
        yield state.watcher
        return
    from pytest_hotswap.watch import CompileWatcher

    with CompileWatcher() as watcher:  # requested late, through request.getfixturevalue
        yield watcher


@pytest.fixture(scope="session")
def hotswap_options(pytestconfig: pytest.Config) -> opts.HotswapOptions:
    """The resolved ``--hotswap-*`` options (device and dtype resolved from ``auto``)."""
    return _session(pytestconfig).resolved_options
