"""The session's built pipelines and adapter files: a cache of ready pipelines, one per
:class:`Configuration`, and a :class:`LoraFactory` that writes each adapter once.

No pytest here: the plugin's fixtures hand these out over one session object. Nothing heavy is
imported at module level: torch and diffusers load when a pipeline is first built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_hotswap.adapters.catalog import Catalog
    from pytest_hotswap.implementations import Implementation
    from pytest_hotswap.options import HotswapOptions
    from pytest_hotswap.pipelines.ready import HotswapPipeline
    from pytest_hotswap.pipelines.registry import PipelineSpec

#: Options that change what gets built: part of the session cache's key.
BUILD_OPTIONS = ("max_rank", "backend", "mode", "device", "dtype", "quantize", "compile_scope")
FIRST_ADAPTER_RANK = 8


class UnknownImplementationError(KeyError):
    """A configuration names an implementation the session does not know."""


class LoraFactory:
    """``lora_factory(target, rank=8, ...) -> Path``: ``make_lora`` into a session directory.

    Files are cached per arguments, so asking twice for the same adapter writes it once.
    ``target`` is a pipeline name ("sd", "flux"), a pipeline, a model or a ``HotswapPipeline``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[tuple[Any, ...], Path] = {}
        self._targets: list[Any] = []  # keeps targets alive, so id() in a key stays unique

    def __call__(
        self,
        target: Any,
        rank: int = 8,
        alpha: float | None = None,
        targets: str | Sequence[str] = "all",
        text_encoder: bool = False,
        fmt: str = "diffusers",
        seed: int = 0,
        *,
        rank_pattern: Mapping[str, int] | None = None,
        alpha_pattern: Mapping[str, float] | None = None,
        use_dora: bool = False,
        denoisers: Sequence[str] | None = None,
    ) -> Path:
        """The arguments of ``make_lora``; the same arguments give the same file."""
        from pytest_hotswap.adapters import make_lora
        from pytest_hotswap.pipelines import HotswapPipeline

        if isinstance(target, HotswapPipeline):
            target = target.spec.lora_target
        chosen = targets if isinstance(targets, str) else tuple(targets)
        key = (
            target if isinstance(target, str) else id(target),
            rank,
            alpha,
            chosen,
            text_encoder,
            fmt,
            seed,
            tuple(sorted((rank_pattern or {}).items())),
            tuple(sorted((alpha_pattern or {}).items())),
            use_dora,
            None if denoisers is None else tuple(denoisers),
        )
        if key not in self._files:
            self._targets.append(target)
            folder = self.directory / f"{len(self._files):03d}"
            self._files[key] = make_lora(
                target,
                folder,
                rank,
                alpha,
                targets,
                text_encoder,
                fmt,
                seed,
                rank_pattern=rank_pattern,
                alpha_pattern=alpha_pattern,
                use_dora=use_dora,
                denoisers=denoisers,
            )
        return self._files[key]


@dataclasses.dataclass(frozen=True)
class Configuration:
    """What a cached pipeline is: its name, implementation, build options and preparation."""

    name: str
    implementation: str
    options: HotswapOptions
    first_targets: str | tuple[str, ...] = "all"
    first_lora: str | None = None
    targets: tuple[str, ...] | None = None
    text_encoder: bool = False
    slots: int = 1
    compiled: bool = True  # False: prepared and adapted, not compiled (see PipelineFactory)

    def key(self) -> tuple[Any, ...]:
        built_with = tuple(getattr(self.options, field) for field in BUILD_OPTIONS)
        return (
            self.name,
            self.implementation,
            self.first_targets,
            self.first_lora,
            self.targets,
            self.text_encoder,
            self.slots,
            self.compiled,
            built_with,
        )


class PipelineCache:
    """Built pipelines of the session, one per :class:`Configuration`."""

    def __init__(
        self,
        implementations: Mapping[str, Implementation],
        build_spec: Callable[[str, HotswapOptions], PipelineSpec],
        loras: LoraFactory,
        catalog: Catalog | None = None,
    ) -> None:
        self.implementations = implementations
        self.build_spec = build_spec
        self.loras = loras
        self.catalog = catalog
        self._built: dict[tuple[Any, ...], HotswapPipeline | BaseException] = {}
        # Dynamo's automatic-dynamic profile each pipeline's build left (watch.profile).
        self._profiles: dict[tuple[Any, ...], dict[Any, Any]] = {}

    def get(self, configuration: Configuration) -> HotswapPipeline:
        """The configuration's pipeline on its first adapter at full strength, built if need be."""
        key = configuration.key()
        cached = self._built.get(key)
        if isinstance(cached, BaseException):  # a broken configuration fails each test, built once
            raise cached
        from pytest_hotswap.watch import profile

        if cached is not None:
            profile.restore(self._profiles[key])  # what a fresh process has after this build
            if reusable(cached):
                return cached
        before = profile.snapshot()
        try:
            self._built[key] = self.build(configuration)
        except Exception as error:
            self._built[key] = error
            raise
        # A rebuild starts from the record put back above, so keep it under what the build changed.
        self._profiles[key] = {
            **self._profiles.get(key, {}),
            **profile.changed(before, profile.snapshot()),
        }
        return self._built[key]  # type: ignore[return-value]

    def discard(self, pipeline: HotswapPipeline) -> None:
        """Forget ``pipeline``: the next request for its configuration builds a fresh one."""
        self._built = {k: v for k, v in self._built.items() if v is not pipeline}

    def build(self, configuration: Configuration) -> HotswapPipeline:
        from pytest_hotswap.implementations import FEATURE_TARGETS, Preparation
        from pytest_hotswap.pipelines import build_hotswap_pipeline

        try:
            implementation = self.implementations[configuration.implementation]
        except KeyError as error:
            raise UnknownImplementationError(error.args[0]) from None
        options = configuration.options
        preparation = Preparation(
            options.max_rank,
            configuration.targets,
            configuration.text_encoder,
            configuration.slots,
        )
        # Refused before anything is built: UnsupportedFeatureError names what is missing.
        implementation.check(preparation)
        spec = self.build_spec(configuration.name, options)
        chose_layers = configuration.first_targets != "all"
        if (
            preparation.targets is None
            and not chose_layers
            and FEATURE_TARGETS in implementation.features  # checked: targets are supported
        ):
            catalog_targets = self._catalog_targets(spec, configuration)
            if catalog_targets is not None:
                preparation = dataclasses.replace(preparation, targets=catalog_targets)
        first: Any = configuration.first_lora
        if first is None:
            rank = min(FIRST_ADAPTER_RANK, options.max_rank)
            first = self.loras(
                spec.lora_target,
                rank=rank,
                targets=configuration.first_targets,
                text_encoder=configuration.text_encoder,
            )
        pipeline = build_hotswap_pipeline(
            spec,
            implementation,
            first,
            options,
            preparation=preparation,
            compiled=configuration.compiled,
        )
        pipeline.source = configuration.name
        return pipeline

    def _catalog_targets(
        self, spec: PipelineSpec, configuration: Configuration
    ) -> tuple[str, ...] | None:
        """With ``--hotswap-adapters``, every usable file of the catalog: an implementation that
        can pad the union of targets does, so any catalog file hotswaps into its pipelines
        (``first_lora=<a catalog file>``, then any other). A configuration that chose its
        layers (``targets``, ``first_targets``) gets exactly what it chose."""
        catalog = self.catalog
        if catalog is None:
            return None
        usable = catalog.usable(
            configuration.options.max_rank,
            text_encoder=configuration.text_encoder,
            diffusers=spec.has_lora_loader,
        )
        return tuple(str(entry.path) for entry in usable) or None


def reusable(pipeline: HotswapPipeline) -> bool:
    """Put a cached pipeline back as built; ``False`` when that is not possible, so it is rebuilt.

    A test may have re-shaped its LoRA tensors (a rank above max_rank through PEFT: no longer
    padded to max_rank), made it recompile (an entry a later test could hit, where a fresh
    process would recompile), or left it half-swapped in a way the first adapter cannot undo.
    After ``torch.compiler.reset()`` (``no_recompile(fresh=True)``) it is warmed up again.
    """
    if pipeline.layout_changed():
        return False
    if not pipeline.compiled_entries():
        pipeline.warm_up()
    if not pipeline.entries_as_built():
        return False
    try:
        pipeline.restore_first_adapter()
    except Exception:  # the test that broke it has failed already; the next one gets a new build
        return False
    return not pipeline.layout_changed() and pipeline.entries_as_built()
