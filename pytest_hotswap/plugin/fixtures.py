"""Fixtures for ready pipelines and adapter files.

``hotswap_pipeline`` is parametrized over ``--hotswap-pipelines`` x ``--hotswap-implementations``
(ids like ``sd-diffusers``). Built pipelines are cached for the session per distinct configuration,
so a file of many tests compiles each configuration once; every test starts from the pipeline's
first adapter at full strength, put back by a hotswap, not a recompile, and with exactly the
compiled entries its warm-up made: a pipeline an earlier test re-shaped, recompiled, or left
running eagerly after a storm is rebuilt, so a test's verdict is the one it gets alone.

Nothing heavy is imported at module level: torch and diffusers load when a fixture first runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_hotswap.pipelines.cache import (
    BUILD_OPTIONS,
    Configuration,
    LoraFactory,
    PipelineCache,
    UnknownImplementationError,
)
from pytest_hotswap.plugin.session import SESSION_KEY

if TYPE_CHECKING:
    from pytest_hotswap.options import HotswapOptions
    from pytest_hotswap.pipelines import HotswapPipeline, PipelineSpec
    from pytest_hotswap.plugin.session import HotswapSession
    from pytest_hotswap.watch import CompileWatcher

MARKER = "hotswap"
#: Keyword arguments of the ``hotswap`` marker; all but ``pipeline`` are option overrides.
MARKER_KWARGS = ("pipeline", "max_rank", "backend", "quantize", "compile_scope")


def session_of(config: pytest.Config) -> HotswapSession:
    return config.stash[SESSION_KEY]


# --- Marker ----------------------------------------------------------------------------------


def marker_overrides(node: pytest.Item) -> dict[str, Any]:
    """The ``hotswap(...)`` marker's keyword arguments, validated; the closest marker wins."""
    overrides: dict[str, Any] = {}
    for mark in reversed(list(node.iter_markers(MARKER))):
        if mark.args:
            raise pytest.UsageError(
                f"{node.nodeid}: @pytest.mark.hotswap takes keyword arguments only "
                f"({', '.join(MARKER_KWARGS)}), got positional {mark.args!r}"
            )
        unknown = sorted(set(mark.kwargs) - set(MARKER_KWARGS))
        if unknown:
            raise pytest.UsageError(
                f"{node.nodeid}: @pytest.mark.hotswap got unknown argument(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(MARKER_KWARGS)}"
            )
        overrides.update(mark.kwargs)
    return overrides


def _apply(options: HotswapOptions, overrides: dict[str, Any], where: str) -> HotswapOptions:
    unknown = sorted(set(overrides) - set(BUILD_OPTIONS))
    if unknown:
        raise TypeError(
            f"{where}: unknown override(s) {', '.join(unknown)}; accepted: {', '.join(BUILD_OPTIONS)}"
        )
    try:
        return options.replace(**overrides)
    except ValueError as error:
        raise pytest.UsageError(f"{where}: {error}") from None


# --- Parametrization -------------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``hotswap_pipeline`` over pipelines x implementations, ids ``sd-diffusers``."""
    if "hotswap_pipeline" not in metafunc.fixturenames:
        return
    from pytest_hotswap.pipelines.saved import identity_of, label_of

    options = session_of(metafunc.config).options
    pipeline = marker_overrides(metafunc.definition).get("pipeline")
    if pipeline is None:
        names = options.pipelines
    else:
        given = (pipeline,) if isinstance(pipeline, str) else tuple(pipeline)
        names = tuple(identity_of(name) for name in given)
    params = [(name, impl) for name in names for impl in options.implementations]
    ids = [f"{label_of(n, names)}-{i}" for n, i in params]
    metafunc.parametrize("hotswap_pipeline", params, ids=ids, indirect=True)


# --- Fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lora_factory(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> LoraFactory:
    """``lora_factory(target, rank=8, alpha=None, targets="all", text_encoder=False,
    fmt="diffusers", seed=0) -> Path``: a ``.safetensors`` adapter for a pipeline or model."""
    return session_of(pytestconfig).lora_factory(tmp_path_factory)


@dataclasses.dataclass
class PipelineFactory:
    """``hotswap_pipeline_factory(name, implementation="diffusers", **overrides)``: a ready pipeline.

    Overrides (``max_rank``, ``backend``, ``mode``, ``device``, ``dtype``, ``quantize``) beat the
    ``hotswap`` marker, which beats the command line. ``first_targets`` chooses the layers the
    first adapter targets ("all", "half" or module names), e.g. to test a superset swap, or
    ``first_lora`` gives the first adapter's file; ``targets`` pads LoRA onto the union of these
    layers or adapters' targets (with ``--hotswap-adapters``, unless ``targets`` or
    ``first_targets`` is given: every usable file of the catalog) and ``text_encoder=True``
    hotswaps the text encoders too (reference implementation); ``slots=N`` gives N weighted
    adapter slots (reference; diffusers: adapters weighted with ``set_adapters``).
    ``compiled=False`` builds it without ``torch.compile``, for a check decided before any
    compiled call (the conformance suite's known defects that show in the swap itself). The
    pipeline comes from the session cache with its first adapter loaded, and describes itself in
    the test's ``compile_watcher.context``.
    """

    cache: PipelineCache
    options: HotswapOptions
    watcher: CompileWatcher
    where: str
    handed_out: list[HotswapPipeline] = dataclasses.field(default_factory=list)

    def __call__(
        self,
        name: str,
        implementation: str = "diffusers",
        *,
        first_targets: str | Sequence[str] = "all",
        first_lora: str | Path | None = None,
        targets: Sequence[str | Path] | None = None,
        text_encoder: bool = False,
        slots: int = 1,
        compiled: bool = True,
        **overrides: Any,
    ) -> HotswapPipeline:
        options = _apply(self.options, overrides, self.where)
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise pytest.UsageError(f"{self.where}: slots must be an integer >= 1, got {slots!r}")
        if not isinstance(compiled, bool):
            raise pytest.UsageError(
                f"{self.where}: compiled must be True or False, got {compiled!r}"
            )
        from pytest_hotswap.pipelines.saved import identity_of

        configuration = Configuration(
            name=identity_of(name),
            implementation=implementation,
            options=options,
            first_targets=first_targets if isinstance(first_targets, str) else tuple(first_targets),
            first_lora=None if first_lora is None else str(first_lora),
            targets=None if targets is None else tuple(str(t) for t in targets),
            text_encoder=text_encoder,
            slots=slots,
            compiled=compiled,
        )
        try:
            pipeline = self.cache.get(configuration)
        except UnknownImplementationError as error:
            raise pytest.UsageError(f"--hotswap-implementations: {error.args[0]}") from None
        pipeline.adopt_into(self.watcher)
        self.handed_out.append(pipeline)
        self.watcher.context.update(
            pipeline=pipeline.name,
            implementation=implementation,
            backend=options.backend if compiled else "none (not compiled)",
            device=options.device,
            quantize=options.quantize,
            max_rank=options.max_rank,
        )
        return pipeline

    def discard(self, pipeline: HotswapPipeline) -> None:
        """Drop ``pipeline`` from the session cache, after a test that may have broken it."""
        self.cache.discard(pipeline)

    def discard_after_storm(self) -> None:
        """Drop every pipeline handed out when the test's watcher saw a recompile storm.

        Past ``recompile_limit`` dynamo stops compiling that frame and runs it eagerly from then
        on, so a pipeline in that state would pass later tests without running compiled code.
        """
        if self.watcher.had_storm:
            for pipeline in self.handed_out:
                self.discard(pipeline)


@pytest.fixture
def hotswap_pipeline_factory(
    request: pytest.FixtureRequest,
    hotswap_options: HotswapOptions,
    compile_watcher: CompileWatcher,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PipelineFactory]:
    """``hotswap_pipeline_factory(name, implementation="diffusers", **overrides)``: a ready pipeline
    from the session cache; ``.discard(pipeline)`` drops one a test may have broken."""
    where = request.node.nodeid
    marked = {k: v for k, v in marker_overrides(request.node).items() if k != "pipeline"}
    options = _apply(hotswap_options, marked, where)
    cache = session_of(request.config).pipeline_cache(tmp_path_factory)
    factory = PipelineFactory(cache, options, compile_watcher, where)
    yield factory
    factory.discard_after_storm()


@pytest.fixture
def hotswap_pipeline(
    request: pytest.FixtureRequest, hotswap_pipeline_factory: PipelineFactory
) -> HotswapPipeline:
    """A ready pipeline for one (pipeline, implementation) pair of the parametrization."""
    param = getattr(request, "param", None)
    if param is None:
        raise pytest.UsageError(
            f"{request.node.nodeid}: hotswap_pipeline is parametrized by pytest-hotswap's "
            "pytest_generate_tests; request it as a test argument, or use hotswap_pipeline_factory"
        )
    from pytest_hotswap.implementations import UnsupportedFeatureError

    name, implementation = param
    try:
        return hotswap_pipeline_factory(name, implementation)
    except UnsupportedFeatureError as error:  # the matrix's "not supported"
        pytest.skip(f"not supported: {error}")


# --- Default hook implementations ------------------------------------------------------------


@pytest.hookimpl(trylast=True)
def pytest_hotswap_build_pipeline(name: str, options: HotswapOptions) -> PipelineSpec | None:
    """The registered pipelines ("sd", "flux"), saved pipeline folders and cached hub ids."""
    from pytest_hotswap.pipelines import build_spec

    return build_spec(name, options)


@pytest.fixture(scope="session")
def hotswap_catalog(pytestconfig: pytest.Config) -> Any:
    """The ``--hotswap-adapters`` catalog: ``.entries`` (path, format, ranks per layer and max,
    alpha, targets, text-encoder keys), ``.plan(max_rank)`` (each file's verdict under the current
    options, the union of targets, the padding cost). Skips the test when no catalog is given."""
    session = session_of(pytestconfig)
    catalog = session.catalog
    if catalog is None:
        pytest.skip("no adapter catalog: pass --hotswap-adapters=DIR|GLOB (ini hotswap_adapters)")
    return catalog
