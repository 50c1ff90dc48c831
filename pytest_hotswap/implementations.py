"""Ways of hotswapping a LoRA, one object each: how it prepares, swaps, sets strength, and what
it is known to get wrong.

* ``diffusers``: diffusers + PEFT as installed: ``enable_lora_hotswap`` before the first load,
  ``load_lora_weights(..., hotswap=True)`` per swap, strength through the pipeline's
  ``*_attention_kwargs={"scale": s}`` call argument, adapter slots as adapters weighted with
  ``set_adapters`` (a model without a diffusers loader goes through PEFT, which is what
  diffusers calls inside);
* ``peft``: PEFT's own functions on the loaded model: ``prepare_model_for_compiled_hotswap`` after
  the first load, ``hotswap_adapter_from_state_dict`` per swap;
* ``reference``: pytest-hotswap's strict, atomic reference (``pytest_hotswap.reference``).

Pipelines, fixtures, the conformance suite and the bench ask these objects instead of comparing
names; a downstream project adds its own through the ``pytest_hotswap_implementations`` hook.
Nothing here imports torch, diffusers or PEFT at module level.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pytest_hotswap.adapters.loading import (
    ADAPTER_NAME,
    load_first_adapter,
    load_routes,
    loadable,
    named_denoisers,
    quiet_diffusers,
    read_peft_adapter,
    zero_adapter,
)
from pytest_hotswap.adapters.verdicts import first_file_refusals
from pytest_hotswap.defects import DIFFUSERS_DEFECTS, PEFT_DEFECTS, REFERENCE_DEFECTS
from pytest_hotswap.stacks import KnownDefect

if TYPE_CHECKING:
    from pathlib import Path

    from pytest_hotswap.adapters.catalog import CatalogEntry
    from pytest_hotswap.adapters.loading import LoraSource
    from pytest_hotswap.pipelines import HotswapPipeline, PipelineSpec

#: Features beyond the pattern; an implementation lists those it supports in ``features``.
FEATURE_TARGETS = "union of targets"
FEATURE_TEXT_ENCODER = "text-encoder hotswap"
FEATURE_SLOTS = "adapter slots"
#: More than one denoiser carries the LoRA (Wan 2.2's ``transformer`` and ``transformer_2``).
FEATURE_DENOISERS = "several denoisers"


class UnsupportedFeatureError(ValueError):
    """The implementation cannot do what was asked (text-encoder hotswap, slots, ...)."""


@dataclasses.dataclass(frozen=True)
class Preparation:
    """What the first adapter is prepared for: max rank, and the features beyond the pattern."""

    max_rank: int
    targets: tuple[str, ...] | None = None  # module names (or adapter paths) to pad LoRA onto
    text_encoder: bool = False
    slots: int = 1

    def features(self) -> set[str]:
        wanted = set()
        if self.targets is not None:
            wanted.add(FEATURE_TARGETS)
        if self.text_encoder:
            wanted.add(FEATURE_TEXT_ENCODER)
        if self.slots > 1:
            wanted.add(FEATURE_SLOTS)
        return wanted


class Implementation:
    """One way of hotswapping. Subclasses override the steps they do differently.

    The recipe calls, in order: :meth:`before_load`, :meth:`load_first` (a plain load),
    :meth:`after_load`, :meth:`load_slots` (with adapter slots); then quantizes, compiles and
    warms up. A test's pipeline then calls :meth:`swap` and :meth:`strength`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    features: ClassVar[frozenset[str]] = frozenset()
    #: Upstream defects this implementation is known to show, per conformance scenario.
    known_defects: ClassVar[tuple[KnownDefect, ...]] = ()
    #: Its strength is state on the model that outlives swaps (and can be set on the model
    #: directly), so a pipeline handed to the next test is put back to full strength always.
    keeps_strength: ClassVar[bool] = False
    #: How ``pytest-hotswap inspect`` names this implementation's verdict on adapter files, and
    #: how it says a file is not taken; empty when it gives no verdict on files (``--check``
    #: offers the implementations that do).
    inspect_label: ClassVar[str] = ""
    inspect_refused: ClassVar[str] = ""
    #: It refuses an adapter in PEFT's own key format (``base_model.model.``) with a clean error;
    #: otherwise it cannot read one at all (diffusers' loaders), and the conformance suite skips.
    refuses_peft_native_keys: ClassVar[bool] = False

    def refusals(self, entries: Sequence[CatalogEntry], max_rank: int) -> dict[Path, list[str]]:
        """Why it would refuse each file of ``entries`` (the first loaded before compiling, the
        others hotswapped into it) prepared for ``max_rank``: an empty list when it takes the
        file. Headers only, nothing is loaded."""
        raise NotImplementedError(f"the {self.name!r} implementation gives no verdict on files")

    def check(self, preparation: Preparation) -> None:
        """Refuse, before anything is built, what this implementation cannot prepare."""
        missing = sorted(preparation.features() - self.features)
        if missing:
            raise UnsupportedFeatureError(
                f"the {self.name!r} implementation does not support {', '.join(missing)}; "
                f"use implementation 'reference' for it"
            )

    def check_spec(self, spec: PipelineSpec) -> None:
        """Refuse, before anything is loaded, a pipeline this implementation cannot prepare:
        one with several denoisers unless it supports them."""
        if len(spec.denoisers) > 1 and FEATURE_DENOISERS not in self.features:
            names = ", ".join(spec.denoiser_names())
            raise UnsupportedFeatureError(
                f"the {self.name!r} implementation hotswaps one denoiser; {spec.name} has "
                f"{len(spec.denoisers)} ({names}): use implementation 'diffusers' for it"
            )

    def before_load(self, spec: PipelineSpec, preparation: Preparation) -> None:
        """Anything that must happen before the first adapter is loaded."""

    def load_first(self, spec: PipelineSpec, lora: LoraSource) -> None:
        """A plain (non-hotswap) load of ``lora`` as adapter ``"default"``."""
        load_first_adapter(spec, lora)

    def after_load(self, spec: PipelineSpec, preparation: Preparation) -> None:
        """Pad to the max rank and turn scalings into tensors, if done after loading."""

    def load_slots(self, spec: PipelineSpec, lora: LoraSource, preparation: Preparation) -> None:
        """Fill adapter slots 1 .. N-1 before compiling (only called with ``slots > 1``)."""

    def swap(self, spec: PipelineSpec, lora: LoraSource, *, slot: int = 0) -> None:
        raise NotImplementedError

    def strength(
        self, pipeline: HotswapPipeline, scale: float, *, slot: int | None = None
    ) -> dict[str, Any]:
        """Set the LoRA strength; returns the call keywords the pipeline must now be run with."""
        raise NotImplementedError

    def rejection(self, reference_error: str) -> tuple[type[Exception], ...]:
        """The exceptions by which it refuses what the reference refuses with ``reference_error``.

        diffusers and PEFT raise ``ValueError`` (or ``RuntimeError`` for PEFT's unexpected
        keys); a harness error (a missing file, a ``TypeError``) is never a rejection.
        """
        return (ValueError, RuntimeError)

    def defects_for(
        self, stack: Mapping[str, str] | None = None, traits: frozenset[str] | None = None
    ) -> list[KnownDefect]:
        """One known defect per scenario: the one verified on ``stack`` (the installed one by
        default) where a defect shows differently across versions, else the first listed.
        ``traits``: a pipeline's (``adapters.loading.pipeline_traits``), leaving out the defects
        it does not show; ``None``: every defect (the stack's verdict counts them all)."""
        chosen: dict[str, KnownDefect] = {}
        for defect in self.known_defects:
            if traits is not None and not defect.shows_with(traits):
                continue
            if defect.scenario not in chosen or (
                not chosen[defect.scenario].verified_on(stack) and defect.verified_on(stack)
            ):
                chosen[defect.scenario] = defect
        return list(chosen.values())

    def defect(self, scenario: str, traits: frozenset[str] = frozenset()) -> KnownDefect | None:
        """The known defect of ``scenario`` on a pipeline with ``traits``, if any."""
        return next((d for d in self.defects_for(traits=traits) if d.scenario == scenario), None)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def slot_adapter_name(slot: int) -> str:
    """The adapter name of a slot in diffusers + PEFT: ``"default"``, then ``"slot1"`` ..."""
    return ADAPTER_NAME if slot == 0 else f"slot{slot}"


class DiffusersImplementation(Implementation):
    """Slots are what diffusers offers for several weighted adapters: one loaded adapter per
    slot (the first adapter again until a swap fills it), weights through ``set_adapters``."""

    name = "diffusers"
    description = "diffusers + PEFT as installed (load_lora_weights(hotswap=True))"
    features = frozenset({FEATURE_SLOTS, FEATURE_DENOISERS})
    known_defects = DIFFUSERS_DEFECTS

    def __init__(self) -> None:
        # The weight of each slot, per diffusers pipeline (set_adapters takes them all at once).
        self._weights: weakref.WeakKeyDictionary[Any, list[float]] = weakref.WeakKeyDictionary()

    inspect_label = "diffusers + PEFT (first file's targets)"
    inspect_refused = f"rejected by {inspect_label}"

    def refusals(self, entries: Sequence[CatalogEntry], max_rank: int) -> dict[Path, list[str]]:
        """Upstream's hotswap after loading the first file: a later file may target only the
        first file's layers (or a subset), with the same shapes, and no text-encoder layers."""
        return first_file_refusals(entries, max_rank)

    def before_load(self, spec: PipelineSpec, preparation: Preparation) -> None:
        """diffusers pads the first adapter while loading it: it needs the max rank before."""
        if spec.has_lora_loader:
            spec.pipe.enable_lora_hotswap(target_rank=preparation.max_rank)

    def after_load(self, spec: PipelineSpec, preparation: Preparation) -> None:
        if not spec.has_lora_loader:  # a bare model: what diffusers does inside, through PEFT
            PeftImplementation().after_load(spec, preparation)

    def load_slots(self, spec: PipelineSpec, lora: LoraSource, preparation: Preparation) -> None:
        """Load the first adapter again as ``slot1`` ..., every slot but the first weighted 0."""
        if not spec.has_lora_loader:
            raise UnsupportedFeatureError(
                f"the {self.name!r} implementation has adapter slots only through a diffusers "
                "pipeline's set_adapters; use implementation 'reference' for a bare model"
            )
        for slot in range(1, preparation.slots):
            load_first_adapter(spec, lora, slot_adapter_name(slot))
        weights = [1.0] + [0.0] * (preparation.slots - 1)
        self._set_adapters(spec.pipe, weights)

    def _set_adapters(self, pipe: Any, weights: list[float]) -> None:
        names = [slot_adapter_name(slot) for slot in range(len(weights))]
        pipe.set_adapters(names, adapter_weights=weights)
        self._weights[pipe] = weights

    def swap(self, spec: PipelineSpec, lora: LoraSource, *, slot: int = 0) -> None:
        if not spec.has_lora_loader:
            PeftImplementation().swap(spec, lora, slot=slot)
            return
        name = slot_adapter_name(slot)
        named = named_denoisers(spec, lora)
        with quiet_diffusers():  # every denoiser in one swap: Wan 2.2's experts both
            for kwargs in load_routes(spec, lora):
                spec.pipe.load_lora_weights(
                    loadable(lora), hotswap=True, adapter_name=name, **kwargs
                )
        if named is not None:  # for some experts only: the others' LoRA to zero, as PEFT does
            for denoiser, module in zip(spec.denoiser_names(), spec.denoisers, strict=True):
                if denoiser not in named:
                    zero_adapter(module, name)

    def strength(
        self, pipeline: HotswapPipeline, scale: float, *, slot: int | None = None
    ) -> dict[str, Any]:
        weights = self._weights.get(pipeline.spec.pipe) if pipeline.spec.has_lora_loader else None
        if weights is not None:  # slots: every adapter's weight through set_adapters
            weights = list(weights)
            for index in range(len(weights)) if slot is None else [slot]:
                weights[index] = scale
            self._set_adapters(pipeline.spec.pipe, weights)
            return {}
        if slot:
            raise UnsupportedFeatureError(f"{pipeline.name}: no adapter slots were prepared")
        keyword = pipeline.spec.strength_keyword
        if keyword is None:
            raise UnsupportedFeatureError(
                f"{pipeline.name}: no call keyword to pass a LoRA scale with (the pipeline's "
                "__call__ takes no *_attention_kwargs); set PipelineSpec.strength_keyword"
            )
        return {} if scale == 1.0 else {keyword: {"scale": scale}}


class PeftImplementation(Implementation):
    name = "peft"
    description = (
        "PEFT directly (prepare_model_for_compiled_hotswap, hotswap_adapter_from_state_dict)"
    )
    known_defects = PEFT_DEFECTS

    def after_load(self, spec: PipelineSpec, preparation: Preparation) -> None:
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        prepare_model_for_compiled_hotswap(
            spec.denoiser, target_rank=preparation.max_rank, config=spec.denoiser.peft_config
        )

    def swap(self, spec: PipelineSpec, lora: LoraSource, *, slot: int = 0) -> None:
        from peft.utils.hotswap import (
            check_hotswap_configs_compatible,
            hotswap_adapter_from_state_dict,
        )
        from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

        state_dict, config = read_peft_adapter(lora, spec)
        model = spec.denoiser
        check_hotswap_configs_compatible(model.peft_config[ADAPTER_NAME], config)
        state_dict = _insert_adapter_name_into_state_dict(
            state_dict, adapter_name=ADAPTER_NAME, parameter_prefix="lora_"
        )
        hotswap_adapter_from_state_dict(model, state_dict, ADAPTER_NAME, config)

    def strength(
        self, pipeline: HotswapPipeline, scale: float, *, slot: int | None = None
    ) -> dict[str, Any]:
        from peft.tuners.lora import LoraLayer

        for module in pipeline.spec.denoiser.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(ADAPTER_NAME, scale)
        return {}


class ReferenceImplementation(Implementation):
    name = "reference"
    description = "pytest-hotswap's strict, atomic reference (pytest_hotswap.reference)"
    features = frozenset({FEATURE_TARGETS, FEATURE_TEXT_ENCODER, FEATURE_SLOTS})
    known_defects = REFERENCE_DEFECTS
    keeps_strength = True
    inspect_label = "reference (union padding)"
    refuses_peft_native_keys = True
    inspect_refused = f"refused by the {inspect_label}"

    def refusals(self, entries: Sequence[CatalogEntry], max_rank: int) -> dict[Path, list[str]]:
        """The pattern's limit of each file: LoRA is padded onto the union of every usable
        file's targets, so only what no padding can take is refused."""
        limits = {entry.path: entry.pattern_limit(max_rank) for entry in entries}
        return {path: [] if limit is None else [str(limit)] for path, limit in limits.items()}

    def after_load(self, spec: PipelineSpec, preparation: Preparation) -> None:
        from pytest_hotswap.reference import prepare_for_hotswap

        extra: dict[str, Any] = {}
        if preparation.targets is not None:
            extra["targets"] = preparation.targets
        if preparation.text_encoder:
            extra["text_encoder"] = True
        if preparation.slots > 1:
            extra["slots"] = preparation.slots
        prepare_for_hotswap(
            spec.lora_target, preparation.max_rank, adapter_name=ADAPTER_NAME, **extra
        )

    def swap(self, spec: PipelineSpec, lora: LoraSource, *, slot: int = 0) -> None:
        from pytest_hotswap.reference import hotswap

        if slot:
            hotswap(spec.lora_target, loadable(lora), ADAPTER_NAME, slot=slot)
        else:
            hotswap(spec.lora_target, loadable(lora), ADAPTER_NAME)

    def strength(
        self, pipeline: HotswapPipeline, scale: float, *, slot: int | None = None
    ) -> dict[str, Any]:
        from pytest_hotswap.reference import set_lora_scale

        if slot is None:
            set_lora_scale(pipeline.spec.lora_target, scale, ADAPTER_NAME)
        else:
            set_lora_scale(pipeline.spec.lora_target, scale, ADAPTER_NAME, slot=slot)
        return {}

    def rejection(self, reference_error: str) -> tuple[type[Exception], ...]:
        from pytest_hotswap import reference

        return (getattr(reference, reference_error),)


BUILTIN: tuple[type[Implementation], ...] = (
    DiffusersImplementation,
    PeftImplementation,
    ReferenceImplementation,
)


class ImplementationRegistry(Mapping[str, Implementation]):
    """The implementations of a session by name: the built-in ones, then those hooks add."""

    def __init__(self, extra: Iterable[Implementation] = ()) -> None:
        self._by_name: dict[str, Implementation] = {cls.name: cls() for cls in BUILTIN}
        for implementation in extra:
            self.add(implementation)

    def add(self, implementation: Implementation) -> None:
        if not isinstance(implementation, Implementation) or not implementation.name:
            raise TypeError(
                f"expected an instance of pytest_hotswap.implementations.Implementation with a "
                f"name, got {implementation!r}"
            )
        self._by_name[implementation.name] = implementation

    def __getitem__(self, name: str) -> Implementation:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(
                f"no hotswap implementation named {name!r}; known: {', '.join(self._by_name)}"
            ) from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def choose(self, names: Sequence[str]) -> list[Implementation]:
        """The implementations named by ``--hotswap-implementations``; unknown names refused."""
        unknown = [name for name in names if name not in self._by_name]
        if unknown:
            raise ValueError(
                f"unknown {', '.join(unknown)}; expected names from {', '.join(self._by_name)}"
            )
        return [self._by_name[name] for name in names]


def get(name: str) -> Implementation:
    """A built-in implementation by name (outside a pytest session, e.g. in the bench)."""
    try:
        return ImplementationRegistry()[name]
    except KeyError as error:
        raise ValueError(error.args[0]) from None
