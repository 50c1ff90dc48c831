"""``HotswapSession``: everything the plugin keeps for one pytest session, in one object.

The hooks in ``pytest_hotswap.plugin`` are a line or two that delegate here (pytest-benchmark's
``BenchmarkSession`` and syrupy's ``SnapshotSession`` are the models). It holds the options, the
implementations, the per-test watching, the pipeline cache and the report. Nothing heavy is
imported until a test needs it: a session with no hotswap fixture, marker or option never imports
torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import TYPE_CHECKING, Any

import pytest

from pytest_hotswap import options as opts
from pytest_hotswap.plugin.start import (
    check_pipelines,
    check_quantize,
    is_xdist_controller,
    read_catalog,
    read_options,
    resolve_max_rank,
)

if TYPE_CHECKING:
    from pytest_hotswap.adapters.catalog import Catalog
    from pytest_hotswap.implementations import ImplementationRegistry
    from pytest_hotswap.pipelines import PipelineSpec
    from pytest_hotswap.pipelines.cache import LoraFactory, PipelineCache
    from pytest_hotswap.plugin.reporting import HotswapReporter
    from pytest_hotswap.watch import CompileWatcher

#: Fixtures whose use makes a test watched (besides every ``hotswap_*`` fixture).
WATCHING_FIXTURES = ("compile_watcher",)
WATCHING_PREFIX = "hotswap_"
NO_RECOMPILE_KWARGS = ("max_recompiles", "fresh", "count_all")


@dataclasses.dataclass
class WatchedTest:
    """Per-test state, kept in ``item.stash`` under one key."""

    allowance: int | None  # the no_recompile allowance; None: watched, not judged
    fresh: bool = False
    count_all: bool = False  # compile on past the allowance (else: fail at the guard)
    run_eagerly: bool = False  # a pipeline call refused at the guard runs again eagerly
    watcher: CompileWatcher | None = None
    hooked: int = 0  # failing events already passed to pytest_hotswap_recompile
    failed_by_marker: bool = False
    outcome: str = "passed"

    @property
    def judged(self) -> bool:
        """Marked ``no_recompile`` (or strict) and watched."""
        return self.allowance is not None and self.watcher is not None

    def fail_at_guard(self) -> contextlib.AbstractContextManager[None]:
        """Around a marked test's call: the recompile past its allowance is refused at its
        guard, before compiling (unless ``count_all``)."""
        if not self.judged or self.count_all:
            return contextlib.nullcontext()
        return self.watcher.fail_at_guard(self.allowance, run_eagerly=self.run_eagerly)

    def is_guard_stop(self, error: BaseException) -> bool:
        """Whether ``error`` is dynamo's refusal of a recompile this test's watcher saw."""
        if not self.judged or not self.watcher.stopped_at_guard:
            return False
        from pytest_hotswap.watch.guard import is_refusal

        return is_refusal(error)

    def is_storm_failure(self, error: BaseException) -> bool:
        """Whether ``error`` is the storm this test's watcher recorded.

        Under fullgraph, a frame past dynamo's recompile_limit raises instead of falling back to
        eager: the watcher recorded that storm, so the test fails the same clean way as without.
        """
        return self.judged and self.watcher.had_storm and _is_recompile_limit_error(error)


ITEM_KEY = pytest.StashKey[WatchedTest]()
#: The run's :class:`HotswapSession`, in ``config.stash``.
SESSION_KEY = pytest.StashKey["HotswapSession"]()


class HotswapSession:
    """The plugin's state for one pytest run; registered as the plugin ``hotswap-session``."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        options = read_options(config)
        options = dataclasses.replace(options, pipelines=check_pipelines(options.pipelines, config))
        check_quantize(options.quantize)
        self._catalog: Catalog | None = read_catalog(options.adapters)  # read once, here
        self.options, self.max_rank_source = resolve_max_rank(options, self._catalog)
        self._reporter: HotswapReporter | None = None
        if (
            self.options.report
            or self.options.baseline
            or self.options.fail_on
            or is_xdist_controller(config)
        ):
            self.reporter  # noqa: B018 (checks the report options now: a usage error before any test)
        self.uses_hotswap = bool(self.options.strict)
        self._resolved: opts.HotswapOptions | None = None
        self._implementations: ImplementationRegistry | None = None
        self._cache: PipelineCache | None = None
        self._loras: LoraFactory | None = None
        self._undo_isolation: Any = None
        self.isolation_route: str | None = None  # isolation.ISOLATE or RESET, set by collect()

    # -- options ----------------------------------------------------------------------------------

    @property
    def reporter(self) -> HotswapReporter:
        """The report's state, made (and registered as a plugin) when first needed: a session
        with no watched test and no report option never imports the report's modules."""
        if self._reporter is None:
            from pytest_hotswap.plugin.reporting import HotswapReporter

            self._reporter = HotswapReporter(self.config, self.options)
            self.config.pluginmanager.register(self._reporter, "hotswap-reporter")
        return self._reporter

    @property
    def resolved_options(self) -> opts.HotswapOptions:
        """The options with ``auto`` device and dtype resolved (imports torch, once, when needed)."""
        if self._resolved is None:
            self._resolved = self.options.resolved()
        return self._resolved

    @property
    def implementations(self) -> ImplementationRegistry:
        if self._implementations is None:
            from pytest_hotswap.implementations import ImplementationRegistry

            extra = [
                i
                for found in self.config.hook.pytest_hotswap_implementations(config=self.config)
                for i in found
            ]
            self._implementations = ImplementationRegistry(extra)
        return self._implementations

    @property
    def catalog(self) -> Catalog | None:
        """The ``--hotswap-adapters`` catalog (headers only), read when the session starts."""
        return self._catalog

    # -- which tests are watched, and how ------------------------------------------------------------

    def collect(self, items: list[pytest.Item]) -> None:
        """Read every item's ``no_recompile`` marker; decide whether this session uses hotswap.

        A session that does needs the stack pytest-hotswap was run on: an older torch, diffusers,
        PEFT or transformers is a usage error naming the package and both versions.
        """
        for item in items:
            allowance, fresh = no_recompile_marker(item, self.options.strict, self.options.fresh)
            if allowance is not None or _uses_fixtures(item):
                count_all = no_recompile_count_all(item, self.options.count_all)
                item.stash[ITEM_KEY] = WatchedTest(allowance, fresh, count_all)
                self.uses_hotswap = True
        if self.uses_hotswap:
            from pytest_hotswap.stacks import too_old
            from pytest_hotswap.watch.isolation import route

            problems = too_old()
            if problems:
                raise pytest.UsageError("pytest-hotswap: " + "; ".join(problems))
            self.isolation_route = route()  # imports torch

    def isolate(self) -> None:
        """Give every ``torch.compile`` call its own cache entries, once torch is in use.

        Only a session that watches tests does it, and only when torch is imported: a plain
        suite is left exactly as it is.
        """
        if self.uses_hotswap and self._undo_isolation is None and "torch" in sys.modules:
            from pytest_hotswap.watch.isolation import isolate_compiles

            self._undo_isolation = isolate_compiles()

    def start_test(self, item: pytest.Item) -> None:
        state = item.stash.get(ITEM_KEY, None)
        if state is None:
            self.isolate()  # an unwatched test that compiles must not share entries either
            return
        from pytest_hotswap.watch import CompileWatcher, isolation, profile

        self.isolate()
        if state.fresh or self.isolation_route == isolation.RESET:
            self.reset_dynamo()
        profile.reset()  # dynamo's automatic-dynamic record starts empty, as in a fresh process
        state.watcher = CompileWatcher().__enter__()

    def reset_dynamo(self) -> None:
        """``torch.compiler.reset()``, for ``fresh`` and on a torch without isolate_recompiles:
        all compiles again as in a fresh process (cached pipelines warm up again, as setup)."""
        import torch

        torch.compiler.reset()

    def verdict(self, item: pytest.Item) -> str | None:
        """After the call: the failure message of ``no_recompile``, or ``None``."""
        state = item.stash[ITEM_KEY]
        if state.allowance is None or state.watcher is None:
            return None
        from pytest_hotswap.watch import RecompileError

        try:
            state.watcher.assert_no_recompile(state.allowance)
        except RecompileError as failure:
            state.failed_by_marker = True
            return f"no_recompile: {failure}"
        return None

    def note_report(self, item: pytest.Item, report: pytest.TestReport) -> None:
        state = item.stash.get(ITEM_KEY, None)
        if state is None or state.watcher is None or report.when == "teardown":
            return
        if hasattr(report, "wasxfail"):  # an expected failure: a baseline check leaves it out
            state.outcome = "xfailed" if report.skipped else "xpassed"
        elif report.failed:
            state.outcome = "error" if report.when == "setup" else "failed"
        elif report.skipped and state.outcome == "passed":
            state.outcome = "skipped"
        if report.failed and state.watcher.recompiles and not state.failed_by_marker:
            report.sections.append((f"hotswap recompiles ({report.when})", state.watcher.report()))

    def end_test(self, item: pytest.Item) -> None:
        """Before teardown: close the watcher, call the hooks, and record the test."""
        state = item.stash.get(ITEM_KEY, None)
        if state is None or state.watcher is None:
            return
        state.watcher.__exit__(None, None, None)
        self.call_recompile_hooks(item)  # the call phase did not run when setup failed

    def finish_test(self, item: pytest.Item) -> None:
        """After teardown: the test's record (its JUnit properties go on the teardown report)."""
        state = item.stash.get(ITEM_KEY, None)
        if state is None or state.watcher is None:
            return
        from pytest_hotswap.report import TestRecord

        self.reporter.add_record(
            TestRecord.from_watcher(item.nodeid, state.outcome, state.watcher), item
        )

    def call_recompile_hooks(self, item: pytest.Item) -> None:
        state = item.stash[ITEM_KEY]
        assert state.watcher is not None
        failing = [event for event in state.watcher.events if event.is_recompile]
        for event in failing[state.hooked :]:
            item.config.hook.pytest_hotswap_recompile(item=item, event=event)
        state.hooked = len(failing)

    def watcher_of(self, item: pytest.Item) -> CompileWatcher | None:
        state = item.stash.get(ITEM_KEY, None)
        return None if state is None else state.watcher

    # -- fixtures' state ---------------------------------------------------------------------------

    def pipeline_cache(self, tmp_path_factory: pytest.TempPathFactory) -> PipelineCache:
        if self._cache is None:
            from pytest_hotswap.pipelines.cache import PipelineCache

            self._cache = PipelineCache(
                self.implementations,
                self.build_spec,
                self.lora_factory(tmp_path_factory),
                self.catalog,
            )
        return self._cache

    def lora_factory(self, tmp_path_factory: pytest.TempPathFactory) -> LoraFactory:
        if self._loras is None:
            from pytest_hotswap.pipelines.cache import LoraFactory

            self._loras = LoraFactory(tmp_path_factory.mktemp("hotswap-loras"))
        return self._loras

    def build_spec(self, name: str, options: opts.HotswapOptions) -> PipelineSpec:
        return build_spec(self.config, name, options)

    def close(self) -> None:
        if self._reporter is not None and self.config.pluginmanager.is_registered(self._reporter):
            self.config.pluginmanager.unregister(self._reporter)
        if self._undo_isolation is not None:
            self._undo_isolation()
            self._undo_isolation = None


# --- the session's parts that need no state of their own ---


def build_spec(config: pytest.Config, name: str, options: opts.HotswapOptions) -> PipelineSpec:
    """The built, not yet adapted pipeline ``name``: from a hook, the registry or a folder."""
    from pytest_hotswap.pipelines import PipelineNotFoundError, PipelineSpec
    from pytest_hotswap.pipelines.families_driver import UnsupportedPipelineError

    try:
        spec = config.hook.pytest_hotswap_build_pipeline(name=name, options=options)
    except PipelineNotFoundError as error:
        raise pytest.UsageError(f"--hotswap-pipelines: {error}") from None
    except UnsupportedPipelineError as error:
        raise pytest.UsageError(f"--hotswap-pipelines: {name!r}: {error}") from None
    if not isinstance(spec, PipelineSpec):
        raise TypeError(
            f"pytest_hotswap_build_pipeline returned {type(spec).__name__} for {name!r}; "
            "return a pytest_hotswap.pipelines.PipelineSpec (or None for names it does not build)"
        )
    return spec


# --- options -----------------------------------------------------------------------------------------


def no_recompile_marker(
    item: pytest.Item, strict: bool, fresh_default: bool
) -> tuple[int | None, bool]:
    """``(allowance, fresh)`` of ``item``: its ``no_recompile`` marker, or the strict default."""
    marker = item.get_closest_marker("no_recompile")
    if marker is None:
        return (0 if strict else None), (fresh_default and strict)
    where = f"{item.nodeid}: @pytest.mark.no_recompile"
    unknown = sorted(set(marker.kwargs) - set(NO_RECOMPILE_KWARGS))
    if unknown or len(marker.args) > 1 or (marker.args and "max_recompiles" in marker.kwargs):
        got = ", ".join([*map(repr, marker.args), *(f"{k}=" for k in unknown)])
        raise pytest.UsageError(
            f"{where} got unexpected arguments ({got}); accepted: max_recompiles=N, "
            "fresh=True|False, count_all=True|False"
        )
    value = marker.args[0] if marker.args else marker.kwargs.get("max_recompiles", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise pytest.UsageError(f"{where}(max_recompiles={value!r}): expected an integer >= 0")
    fresh = marker.kwargs.get("fresh", fresh_default)
    if not isinstance(fresh, bool):
        raise pytest.UsageError(f"{where}(fresh={fresh!r}): expected True or False")
    return value, fresh


def no_recompile_count_all(item: pytest.Item, default: bool) -> bool:
    """``count_all`` of ``item``'s ``no_recompile`` marker (else ``--hotswap-count-all``)."""
    marker = item.get_closest_marker("no_recompile")
    value = default if marker is None else marker.kwargs.get("count_all", default)
    if not isinstance(value, bool):
        where = f"{item.nodeid}: @pytest.mark.no_recompile"
        raise pytest.UsageError(f"{where}(count_all={value!r}): expected True or False")
    return value


def _uses_fixtures(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return any(name in WATCHING_FIXTURES or name.startswith(WATCHING_PREFIX) for name in names)


def _is_recompile_limit_error(error: BaseException) -> bool:
    exc = sys.modules.get("torch._dynamo.exc")
    return exc is not None and isinstance(error, exc.FailOnRecompileLimitHit)


def run_eagerly_past_allowance(item: pytest.Item) -> None:
    """Let a watched test go on past its allowance without compiling: the recompile is refused
    at its guard and recorded, and the refused pipeline call runs again eagerly
    (``CompileWatcher.fail_at_guard(run_eagerly=True)``).

    For a test whose verdict is decided further on than a recompile, at a price of a guard check
    instead of a compile: the conformance suite's known defects that show as a wrong output
    after a recompile (dynamo's guards decide a recompile the same way for every backend, and
    the eager run computes what the recompiled graph would).
    """
    state = item.stash.get(ITEM_KEY, None)
    if state is not None:
        state.run_eagerly = True
        if state.watcher is not None and state.watcher.active:  # asked from inside the call
            state.watcher.eager_after_refusal = True
