"""pytest glue for pytest-hotswap (entry point ``hotswap``).

Options with their ini twins, the ``no_recompile`` and ``hotswap`` markers, a ``CompileWatcher``
around every watched test's setup and call, the ``compile_watcher`` and ``hotswap_options``
fixtures, the ``pytest_hotswap_recompile`` hook and the header line. Loading the plugin imports
neither torch nor diffusers: torch comes in with the first watched test (or when ``auto`` device
needs resolving at session start).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Callable, Generator, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from pytest_hotswap import options as opts
from pytest_hotswap.watch import CompileWatcher, RecompileError

OPTIONS_KEY = pytest.StashKey[opts.HotswapOptions]()
WATCHER_KEY = pytest.StashKey[CompileWatcher]()
_ALLOWANCE_KEY = pytest.StashKey["int | None"]()
_HOOKED_KEY = pytest.StashKey[int]()
_FAILED_BY_US_KEY = pytest.StashKey[bool]()
_OUTCOME_KEY = pytest.StashKey[str]()
_REPORTER_KEY = pytest.StashKey[Any]()

FIXTURES_PLUGIN = "pytest_hotswap.plugin.fixtures"
_WATCHING_FIXTURES = ("compile_watcher",)
_WATCHING_PREFIX = "hotswap_"
_HEADER_PACKAGES = ("torch", "diffusers", "peft")


def _parse_fail_on(value: str) -> str:
    from pytest_hotswap.report import parse_fail_on

    parse_fail_on(value)
    return value


@dataclasses.dataclass(frozen=True)
class _Option:
    """One ``--hotswap-NAME`` option, its ``hotswap_NAME`` ini key and its parser."""

    name: str
    help: str
    parse: Callable[[str], object] = str
    flag: bool = False

    @property
    def cli(self) -> str:
        return f"--hotswap-{self.name}"

    @property
    def field(self) -> str:
        return self.name.replace("-", "_")

    @property
    def ini(self) -> str:
        return f"hotswap_{self.field}"


def _choice(values: tuple[str, ...]) -> Callable[[str], str]:
    return lambda value: opts.parse_choice(value, values)


_OPTIONS = (
    _Option(
        "max-rank",
        "Rank every LoRA is padded to before compiling (default: 128)",
        opts.parse_max_rank,
    ),
    _Option(
        "backend",
        f"torch.compile backend: {', '.join(opts.BACKENDS)} (default: inductor)",
        _choice(opts.BACKENDS),
    ),
    _Option(
        "mode",
        f"torch.compile mode: {', '.join(opts.MODES)} (default: default)",
        _choice(opts.MODES),
    ),
    _Option(
        "device",
        f"Device for the built pipelines: {', '.join(opts.DEVICES)} (default: auto, cuda when available)",
        _choice(opts.DEVICES),
    ),
    _Option(
        "dtype",
        f"Dtype: {', '.join(opts.DTYPES)} (default: auto, bfloat16 on cuda, float32 on cpu)",
        _choice(opts.DTYPES),
    ),
    _Option(
        "quantize",
        f"Quantize the base model with torchao: {', '.join(opts.QUANTIZE)} (default: none)",
        _choice(opts.QUANTIZE),
    ),
    _Option(
        "pipelines",
        "Comma list of pipelines to build: sd, flux and names downstream hooks add (default: sd,flux)",
        opts.parse_list,
    ),
    _Option(
        "implementations",
        f"Comma list of hotswap implementations: {', '.join(opts.IMPLEMENTATIONS)} (default: both)",
        lambda v: opts.parse_list(v, opts.IMPLEMENTATIONS),
    ),
    _Option("strict", "Every test behaves as if marked no_recompile", flag=True),
    _Option("report", "Write the JSON compile report to this path", Path),
    _Option("baseline", "Compare with this JSON report (written by --hotswap-report)", Path),
    _Option(
        "fail-on",
        "Thresholds against the baseline, e.g. recompiles:0,compile_s:+50%",
        _parse_fail_on,
    ),
)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_hotswap import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hotswap", "LoRA hotswap without recompiles (pytest-hotswap)")
    for option in _OPTIONS:
        cli_help = option.help.replace("%", "%%")  # argparse formats help with %
        if option.flag:
            group.addoption(
                option.cli, action="store_true", default=None, dest=option.ini, help=cli_help
            )
            parser.addini(option.ini, option.help, type="bool", default=None)
        else:
            group.addoption(
                option.cli, dest=option.ini, metavar=option.field.upper(), help=cli_help
            )
            parser.addini(option.ini, option.help, default=None)


def resolve_options(config: pytest.Config) -> opts.HotswapOptions:
    """Command line beats ini beats default; ``auto`` device and dtype stay ``auto`` here."""
    values: dict[str, object] = {}
    for option in _OPTIONS:
        raw = config.getoption(option.ini)
        source = option.cli
        if raw is None:
            raw = config.getini(option.ini)
            source = f"ini option {option.ini}"
            if option.parse is Path and raw:  # relative to the ini file, like pytest's paths
                raw = _ini_dir(config) / str(raw)
        if raw is None or raw == "":
            continue
        if option.flag:
            values[option.field] = bool(raw)
            continue
        try:
            values[option.field] = option.parse(raw)
        except ValueError as error:
            raise pytest.UsageError(f"{source}={raw}: {error}") from None
    for field in ("device", "dtype"):
        values.setdefault(field, "auto")
    return opts.HotswapOptions(**values)  # type: ignore[arg-type]


def _ini_dir(config: pytest.Config) -> Path:
    """The directory ini-given paths are relative to: the ini file's, else the rootdir."""
    return config.inipath.parent if config.inipath is not None else config.rootpath


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "no_recompile(max_recompiles=0): fail the test when dynamo recompiles more than "
        "max_recompiles times during its setup and call (first compiles are fine)",
    )
    config.addinivalue_line(
        "markers",
        "hotswap(pipeline=None, max_rank=None, backend=None, quantize=None): per-test overrides "
        "for the hotswap fixtures",
    )
    options = resolve_options(config)
    config.stash[OPTIONS_KEY] = options
    if importlib.util.find_spec(FIXTURES_PLUGIN) is not None:
        config.pluginmanager.register(importlib.import_module(FIXTURES_PLUGIN), "hotswap-fixtures")
    from pytest_hotswap.plugin.reporting import HotswapReporter

    reporter = HotswapReporter(config, options)
    config.stash[_REPORTER_KEY] = reporter
    config.pluginmanager.register(reporter, "hotswap-reporter")


def pytest_unconfigure(config: pytest.Config) -> None:
    reporter = config.stash.get(_REPORTER_KEY, None)
    if reporter is not None:
        del config.stash[_REPORTER_KEY]
        config.pluginmanager.unregister(reporter)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Resolve ``auto`` device and dtype (this imports torch) once a session really runs."""
    options = session.config.stash[OPTIONS_KEY]
    device = opts.resolve_device(options.device)
    session.config.stash[OPTIONS_KEY] = dataclasses.replace(
        options, device=device, dtype=opts.resolve_dtype(options.dtype, device)
    )


def pytest_report_header(config: pytest.Config) -> str:
    options = config.stash[OPTIONS_KEY]
    versions = ", ".join(f"{name} {_version(name)}" for name in _HEADER_PACKAGES)
    settings = (
        f"max_rank={options.max_rank} backend={options.backend} mode={options.mode} "
        f"device={options.device} dtype={options.dtype} quantize={options.quantize} "
        f"pipelines={','.join(options.pipelines)} "
        f"implementations={','.join(options.implementations)}"
    )
    return f"hotswap: {versions} | {settings}{' strict' if options.strict else ''}"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


# -- which tests are watched, and how strictly -------------------------------------------------


def max_recompiles(item: pytest.Item, strict: bool) -> int | None:
    """The ``no_recompile`` allowance of ``item`` (0 under ``--hotswap-strict``), else ``None``."""
    marker = item.get_closest_marker("no_recompile")
    if marker is None:
        return 0 if strict else None
    where = f"{item.nodeid}: @pytest.mark.no_recompile"
    unknown = sorted(set(marker.kwargs) - {"max_recompiles"})
    if unknown or len(marker.args) > 1 or (marker.args and marker.kwargs):
        got = ", ".join([*map(repr, marker.args), *(f"{k}=" for k in unknown)])
        raise pytest.UsageError(
            f"{where} got unexpected arguments ({got}); accepted: max_recompiles=N"
        )
    value = marker.args[0] if marker.args else marker.kwargs.get("max_recompiles", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise pytest.UsageError(f"{where}(max_recompiles={value!r}): expected an integer >= 0")
    return value


def _is_watched(item: pytest.Item, allowance: int | None) -> bool:
    names = getattr(item, "fixturenames", ())
    return (
        allowance is not None
        or any(name in _WATCHING_FIXTURES for name in names)
        or any(name.startswith(_WATCHING_PREFIX) for name in names)
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    strict = config.stash[OPTIONS_KEY].strict
    for item in items:
        item.stash[_ALLOWANCE_KEY] = max_recompiles(item, strict)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    allowance = item.stash.get(_ALLOWANCE_KEY, None)
    if _is_watched(item, allowance):
        watcher = CompileWatcher()
        watcher.__enter__()
        item.stash[WATCHER_KEY] = watcher
        item.stash[_HOOKED_KEY] = 0
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    watcher = item.stash.get(WATCHER_KEY, None)
    if watcher is None:
        return (yield)
    allowance = item.stash.get(_ALLOWANCE_KEY, None)
    try:
        result = yield
    except BaseException as error:
        # Under fullgraph, a frame past dynamo's recompile_limit raises instead of falling back
        # to eager: the watcher recorded that storm, so fail the same clean way as without it.
        if allowance is None or not watcher.had_storm or not _is_recompile_limit_error(error):
            raise
        result = None
    finally:
        _call_recompile_hooks(item, watcher)
    if allowance is None:
        return result
    try:
        watcher.assert_no_recompile(allowance)
    except RecompileError as error:
        message = f"no_recompile: {error}"
    else:
        return result
    item.stash[_FAILED_BY_US_KEY] = True
    pytest.fail(message, pytrace=False)


def _is_recompile_limit_error(error: BaseException) -> bool:
    exc = sys.modules.get("torch._dynamo.exc")
    return exc is not None and isinstance(error, exc.FailOnRecompileLimitHit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    watcher = item.stash.get(WATCHER_KEY, None)
    if watcher is None or report.when == "teardown":
        return report
    if hasattr(report, "wasxfail"):  # an expected failure: a baseline check leaves it out
        item.stash[_OUTCOME_KEY] = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        item.stash[_OUTCOME_KEY] = "error" if report.when == "setup" else "failed"
    elif report.skipped and _OUTCOME_KEY not in item.stash:
        item.stash[_OUTCOME_KEY] = "skipped"
    if report.failed and watcher.recompiles and not item.stash.get(_FAILED_BY_US_KEY, False):
        report.sections.append((f"hotswap recompiles ({report.when})", watcher.report()))
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    watcher = item.stash.get(WATCHER_KEY, None)
    if watcher is None:
        return (yield)
    watcher.__exit__(None, None, None)
    _call_recompile_hooks(item, watcher)  # the call phase did not run when setup failed
    try:
        return (yield)
    finally:
        reporter = item.config.stash.get(_REPORTER_KEY, None)
        if reporter is not None:
            from pytest_hotswap.report import TestRecord

            outcome = item.stash.get(_OUTCOME_KEY, "passed")
            reporter.add_record(TestRecord.from_watcher(item.nodeid, outcome, watcher), item)


def _call_recompile_hooks(item: pytest.Item, watcher: CompileWatcher) -> None:
    recompiles = [event for event in watcher.events if event.is_recompile]
    for event in recompiles[item.stash.get(_HOOKED_KEY, 0) :]:
        item.config.hook.pytest_hotswap_recompile(item=item, event=event)
    item.stash[_HOOKED_KEY] = len(recompiles)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def compile_watcher(request: pytest.FixtureRequest) -> Iterator[CompileWatcher]:
    """The ``CompileWatcher`` around this test's setup and call (fixtures put context in it)."""
    watcher = request.node.stash.get(WATCHER_KEY, None)
    if watcher is not None:
        yield watcher
        return
    with CompileWatcher() as watcher:  # requested late, through request.getfixturevalue
        yield watcher


@pytest.fixture(scope="session")
def hotswap_options(pytestconfig: pytest.Config) -> opts.HotswapOptions:
    """The resolved ``--hotswap-*`` options (device and dtype resolved from ``auto``)."""
    return pytestconfig.stash[OPTIONS_KEY]
