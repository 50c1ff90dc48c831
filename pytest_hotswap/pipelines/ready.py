"""``HotswapPipeline``: a prepared, adapted and compiled pipeline that swaps adapters in place."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from pytest_hotswap.adapters.loading import LoraSource, describe_adapter
from pytest_hotswap.implementations import Implementation, Preparation
from pytest_hotswap.pipelines.layout import TensorLayout, lora_layout, record_layout_change
from pytest_hotswap.pipelines.registry import PipelineSpec
from pytest_hotswap.reference.components import unwrap_compiled
from pytest_hotswap.watch import CompileWatcher
from pytest_hotswap.watch.caches import entries_of_region, region_of
from pytest_hotswap.watch.watcher import call_or_run_eagerly

if TYPE_CHECKING:
    from pytest_hotswap.options import HotswapOptions


@dataclasses.dataclass(eq=False)
class HotswapPipeline:
    """A prepared, adapted and compiled pipeline; ``swap`` replaces the adapter in place.

    ``implementation`` is the name of the way it swaps (``"diffusers"``, ``"reference"`` ...),
    ``impl`` the :class:`~pytest_hotswap.implementations.Implementation` object.
    ``current_lora`` is the adapter loaded, or ``None`` when unknown: a swap that raised may have
    written part of its adapter (diffusers swaps the denoiser, then fails on text-encoder keys).
    """

    spec: PipelineSpec
    impl: Implementation
    options: HotswapOptions
    first_lora: LoraSource
    preparation: Preparation = dataclasses.field(default_factory=lambda: Preparation(0))
    #: What it was built from, as ``--hotswap-pipelines`` names it (a folder path, say); the
    #: ``name`` is the label reports show.
    source: str | None = None
    current_lora: LoraSource | None = dataclasses.field(init=False)
    swaps: int = dataclasses.field(default=0, init=False)
    _strength: dict[int | None, float] = dataclasses.field(default_factory=dict, init=False)
    _overrides: dict[str, Any] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _layout: dict[str, TensorLayout] = dataclasses.field(init=False, repr=False)
    _as_built: dict[Any, tuple[str, ...]] = dataclasses.field(default_factory=dict, init=False)
    _denoise_warm: bool = dataclasses.field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.current_lora = self.first_lora
        self._layout = self.lora_layout()

    # -- what it is ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def implementation(self) -> str:
        return self.impl.name

    @property
    def pipe(self) -> Any:
        return self.spec.pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.spec.denoiser

    @property
    def max_rank(self) -> int:
        return self.options.max_rank

    compiled = property(lambda self: all(map(_is_compiled, self.spec.denoisers)))

    @property
    def compiled_modules(self) -> list[torch.nn.Module]:
        """The modules compiled for this pipeline: the denoiser, and the text encoders when
        they are hotswapped too."""
        modules = list(self.spec.denoisers)  # Wan 2.2: both experts
        if self.preparation.text_encoder:
            modules += list(self.spec.text_encoders().values())
        return modules

    # -- swaps --------------------------------------------------------------------------------

    def swap(self, lora: LoraSource, *, slot: int = 0, label: str | None = None) -> float:
        """Hotswap ``lora`` into adapter ``"default"`` (or one of its slots); returns the swap's
        wall time in ms.

        An active ``CompileWatcher`` gets a step ``hotswap #N: <adapter> (rank R)`` (or ``label``)
        with that time, so a recompile on the next call names the swap that caused it; a swap
        that replaced, re-shaped or moved a LoRA tensor is a ``layout change`` event there.
        """
        self.current_lora = None  # until the swap is done: one that raises may have written part
        label = label or f"hotswap #{self.swaps + 1}: {describe_adapter(lora)}"
        before = self.lora_layout()
        start = time.perf_counter()
        try:
            self.impl.swap(self.spec, lora, slot=slot)
            if torch.device(self.options.device).type == "cuda":
                torch.cuda.synchronize()
            swap_ms = (time.perf_counter() - start) * 1000
        finally:
            self._check_layout(before, label)
        self.swaps += 1
        self.current_lora = lora
        watcher = CompileWatcher.current()
        if watcher is not None:
            watcher.step(label, swap_ms=swap_ms)
        return swap_ms

    def set_strength(self, scale: float, *, slot: int | None = None) -> None:
        """Set the LoRA strength (of one slot, or of all); kept for later calls and swaps."""
        self._overrides = self.impl.strength(self, scale, slot=slot)
        self._strength[slot] = scale
        watcher = CompileWatcher.current()
        if watcher is not None:
            where = "" if slot is None else f" of slot {slot}"
            watcher.step(f"strength{where} {scale:g}")

    def restore_first_adapter(self) -> None:
        """Put the pipeline back as built: first adapter, full strength, no recompile either way.

        With slots, slot 0 holds the first adapter at weight 1 and every other slot is off
        (weight 0), whatever the previous test put there.
        """
        if self._strength or self.impl.keeps_strength:
            self.reset_strengths()
        if self.current_lora is not self.first_lora:
            self.swap(self.first_lora, label=f"restore first adapter of {self.name}")

    def reset_strengths(self) -> None:
        """Full strength for the first adapter; every other slot switched off."""
        self._overrides = {}
        self._strength.clear()
        if self.preparation.slots == 1:
            self._overrides = self.impl.strength(self, 1.0)
            return
        self.impl.strength(self, 1.0, slot=0)
        for slot in range(1, self.preparation.slots):
            self.impl.strength(self, 0.0, slot=slot)

    # -- calls --------------------------------------------------------------------------------

    def run(self, **overrides: Any) -> torch.Tensor:
        """The deterministic end-to-end call (latents for the tiny pipelines); refused at its
        guard inside ``fail_at_guard(run_eagerly=True)``, it runs again eagerly."""
        with torch.no_grad():
            return call_or_run_eagerly(lambda: self.spec.run(**{**self._overrides, **overrides}))

    def denoise(self, **inputs: Any) -> torch.Tensor:
        """One direct call of the compiled denoiser (``spec.inputs()`` when none are given).
        Its first call compiles its own graph, so it must come while the first adapter is loaded
        (after a swap it could hide a recompile the swap caused); later compiles are recompiles."""
        if not inputs:
            if self.spec.inputs is None:
                raise ValueError(
                    f"pipeline {self.name!r} has no default denoiser inputs; pass them as keywords "
                    "or set PipelineSpec.inputs"
                )
            inputs = self.spec.inputs()
        with torch.no_grad():
            if self._denoise_warm:
                return _first_tensor(call_or_run_eagerly(lambda: self.denoiser(**inputs)))
            if self.current_lora is not self.first_lora:
                raise RuntimeError(
                    f"{self.name}-{self.implementation}: the first denoise() call compiles its own "
                    "graph and must come before the first swap of a test (while the first adapter "
                    "is loaded), so that a recompile caused by a swap cannot pass as that compile"
                )
            with self._warmup("denoise"):
                out = self.denoiser(**inputs)
            self._denoise_warm = True
        return _first_tensor(out)

    def warm_up(self) -> torch.Tensor:
        """First call, the exact one used later, labelled a warm-up for an active watcher.

        Only the pipeline call is warmed here: a direct ``denoise()`` call compiles another graph
        (a full inductor compile per configuration), so it is warmed on its first use instead.
        """
        with self._warmup("run"):
            return self.run()

    @contextlib.contextmanager
    def _warmup(self, call: str) -> Iterator[None]:
        watcher = CompileWatcher.current()
        label = f"warm-up {self.name}-{self.implementation} {call}"
        with watcher.warmup(label) if watcher is not None else contextlib.nullcontext():
            yield
        self._as_built = self.compiled_entries()

    # -- state the session cache checks ----------------------------------------------------------

    def compiled_entries(self) -> dict[Any, tuple[str, ...]]:
        """Dynamo's cache entries of this pipeline's compiled modules, per frame and region."""
        entries: dict[Any, tuple[str, ...]] = {}
        for part in self.compiled_parts():
            entries.update(entries_of_region(region_of(part)))  # type: ignore[arg-type]
        return entries

    def compiled_parts(self) -> list[torch.nn.Module]:
        """The modules that hold compiled code, one per ``isolate_recompiles`` region: each
        compiled module itself, or under regional compilation its compiled blocks."""
        parts: dict[int, torch.nn.Module] = {}
        for module in self.compiled_modules:
            region = region_of(module)
            if region is not None:
                parts.setdefault(region, module)
                continue
            for block in unwrap_compiled(module).modules():
                region = region_of(block)
                if region is not None:
                    parts.setdefault(region, block)
        return list(parts.values())

    def entries_as_built(self) -> bool:
        """Whether the compiled code holds exactly what warming up compiled: no entry an earlier
        test added (a recompile it caused), none lost (a ``torch.compiler.reset()``)."""
        now = self.compiled_entries()
        return {k: set(v) for k, v in now.items()} == {k: set(v) for k, v in self._as_built.items()}

    def adopt_into(self, watcher: CompileWatcher) -> None:
        """Tell a test's watcher that this pipeline's compiled entries belong to its setup."""
        for part in self.compiled_parts():
            watcher.adopt(part)

    def lora_layout(self) -> dict[str, TensorLayout]:
        """Every LoRA tensor of the compiled modules: object, shape, dtype, device, storage."""
        # With several denoisers, each tensor is named by its denoiser (transformer_2.blocks...).
        denoisers = self.spec.denoisers
        owners = dict(zip(map(id, denoisers), self.spec.denoiser_names(), strict=True))
        return lora_layout(self.compiled_modules, owners if len(denoisers) > 1 else {})

    def layout_changed(self) -> bool:
        """Whether a LoRA tensor changed object, shape, dtype, device or storage since the build."""
        return self.lora_layout() != self._layout

    def _check_layout(self, before: dict[str, TensorLayout], label: str) -> None:
        frame = f"{self.name}-{self.implementation}"
        record_layout_change(before, self.lora_layout(), frame, label)


def _first_tensor(out: Any) -> torch.Tensor:
    """A denoiser's output tensor, whether returned bare, in a tuple or in a diffusers output."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _is_compiled(module: torch.nn.Module) -> bool:
    """``module.compile()`` was called on it or, under ``compile_scope="regional"``, on the
    blocks ``compile_repeated_blocks`` compiled."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())
