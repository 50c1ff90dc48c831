"""Pipelines by name: the registry of built-in tiny pipelines, saved folders and cached hub ids.

A name in ``--hotswap-pipelines`` is, in this order: one a ``pytest_hotswap_build_pipeline`` hook
builds, a registered name (``sd`` and ``flux`` from :mod:`.tiny`; ``sdxl``, ``sd3``, ``wan``,
``qwenimage``, ``chroma``, ``zimage`` from the families table), a folder holding a saved diffusers
pipeline, or a hub id found in the local Hugging Face cache (offline). Each entry knows the call keyword its
pipeline reads a LoRA strength from (``cross_attention_kwargs`` for Stable Diffusion,
``joint_attention_kwargs`` for Flux ...).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from pytest_hotswap.adapters.header import TEXT_ENCODER_NAMES
from pytest_hotswap.pipelines import tiny
from pytest_hotswap.pipelines.saved import SavedPipeline, find_saved_pipeline

if TYPE_CHECKING:
    from pytest_hotswap.options import HotswapOptions

#: The call keywords diffusers pipelines read a LoRA ``scale`` from, by pipeline family.
STRENGTH_KEYWORDS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


@dataclasses.dataclass
class PipelineSpec:
    """A built pipeline, not yet adapted, padded or compiled: what a build hook returns.

    ``denoiser`` is the module that carries the LoRA and gets compiled. ``pipe`` is the diffusers
    pipeline around it, if any: adapters then go through ``pipe.load_lora_weights``; without one
    they go through PEFT directly, so any ``nn.Module`` works (adapter keys in PEFT's format,
    ``fc1.lora_A.weight``). ``run`` is the deterministic end-to-end call that returns a tensor and
    takes keyword overrides; ``inputs`` returns the keyword arguments of one direct denoiser call.
    ``strength_keyword`` is the call keyword diffusers reads a LoRA ``scale`` from (found from the
    pipeline's signature when not given). ``denoisers`` lists every denoiser that carries LoRA
    and gets compiled (Wan 2.2's ``transformer`` and ``transformer_2``), ``denoiser`` first;
    it defaults to ``[denoiser]``. The recipe compiles the denoiser in place
    (``nn.Module.compile``), so closures over ``pipe`` or ``denoiser`` call the compiled code.
    """

    name: str
    denoiser: torch.nn.Module
    run: Callable[..., torch.Tensor]
    pipe: Any = None
    inputs: Callable[[], dict[str, Any]] | None = None
    fullgraph: bool = True
    strength_keyword: str | None = None
    denoisers: list[torch.nn.Module] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.strength_keyword is None and self.pipe is not None:
            self.strength_keyword = strength_keyword_of(self.pipe)
        if not self.denoisers:
            self.denoisers = [self.denoiser]
        elif self.denoisers[0] is not self.denoiser:
            raise ValueError("PipelineSpec.denoisers must start with PipelineSpec.denoiser")

    def denoiser_names(self) -> list[str]:
        """How the pipeline names each of ``denoisers`` (``transformer``, ``transformer_2``);
        ``denoiser`` for a bare model."""
        components = getattr(self.pipe, "components", None) or {}
        names = []
        for module in self.denoisers:
            found = (name for name, value in components.items() if value is module)
            names.append(next(found, "denoiser"))
        return names

    @property
    def lora_target(self) -> Any:
        """What adapters are loaded into: the pipeline when there is one, else the denoiser."""
        return self.pipe if self.pipe is not None else self.denoiser

    @property
    def has_lora_loader(self) -> bool:
        return self.pipe is not None and hasattr(self.pipe, "load_lora_weights")

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The pipeline's LoRA-loadable text encoders by attribute name (``text_encoder`` ...)."""
        if self.pipe is None:
            return {}
        # Those the pipeline's LoRA loader loads into, where it declares them (Wan's loads none).
        declared = getattr(type(self.pipe), "_lora_loadable_modules", TEXT_ENCODER_NAMES)
        found = {}
        for name in (n for n in TEXT_ENCODER_NAMES if n in declared):
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                found[name] = module
        return found


@dataclasses.dataclass(frozen=True)
class PipelineEntry:
    """A registered pipeline name: how to build it, and what it is."""

    name: str
    build: Callable[[HotswapOptions, int], PipelineSpec]
    description: str


def strength_keyword_of(pipe: Any) -> str | None:
    """The ``*_attention_kwargs`` keyword of the pipeline's ``__call__``, if it takes one."""
    try:
        parameters = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in STRENGTH_KEYWORDS if name in parameters), None)


def sd_spec(options: HotswapOptions, seed: int = 0) -> PipelineSpec:
    """The tiny Stable Diffusion pipeline; its denoiser is the UNet (Linear and Conv2d LoRA)."""
    options = options.resolved()
    device, dtype = options.device, options.dtype
    pipe = tiny.build_tiny_sd_pipeline(seed, device, dtype)

    def run(**overrides: Any) -> torch.Tensor:
        return pipe(**{**tiny.sd_encoded_call_kwargs(pipe, seed), **overrides}).images

    return PipelineSpec(
        "sd",
        pipe.unet,
        run,
        pipe=pipe,
        inputs=lambda: tiny.unet_inputs(seed, device, dtype),
        strength_keyword="cross_attention_kwargs",
    )


def flux_spec(options: HotswapOptions, seed: int = 0) -> PipelineSpec:
    """The tiny Flux pipeline; its denoiser is the transformer."""
    options = options.resolved()
    device, dtype = options.device, options.dtype
    pipe = tiny.build_tiny_flux_pipeline(seed, device, dtype)

    def run(**overrides: Any) -> torch.Tensor:
        return pipe(**{**tiny.flux_encoded_call_kwargs(pipe, seed), **overrides}).images

    return PipelineSpec(
        "flux",
        pipe.transformer,
        run,
        pipe=pipe,
        inputs=lambda: tiny.flux_inputs(seed, device, dtype),
        strength_keyword="joint_attention_kwargs",
    )


def driven_spec(name: str, pipe: Any, seed: int = 0) -> PipelineSpec:
    """A spec for any pipeline the families driver can drive (refused first, naming what is
    missing): the denoisers its LoRA loader declares, the first of them as ``denoiser``, and
    ``run`` the smallest seeded call of the pipeline's own ``__call__`` (latents out).
    ``inputs`` is None: a direct denoiser call is not derivable from the pipeline.

    One eager call first: it refuses a pipeline that leaves a denoiser idle, and fills what a
    model computes lazily on its first call (Z-Image's rotary table is built under
    ``with torch.device("cpu")``, which dynamo cannot trace with ``fullgraph=True``).
    """
    from pytest_hotswap.pipelines import families_driver as driver

    driver.check_drivable(pipe)
    models = list(driver.denoisers(pipe).values())
    driver.drive(pipe, seed)

    def run(**overrides: Any) -> torch.Tensor:
        return driver.drive(pipe, seed, **overrides)

    return PipelineSpec(name, models[0], run, pipe=pipe, denoisers=models)


def family_spec(family: str) -> Callable[[HotswapOptions, int], PipelineSpec]:
    """The build function of a built-in family of :mod:`families_table`."""

    def build(options: HotswapOptions, seed: int = 0) -> PipelineSpec:
        from pytest_hotswap.pipelines.families import build_family

        options = options.resolved()
        pipe = build_family(family, seed, options.device, options.dtype)
        return driven_spec(family, pipe, seed)

    return build


def _registry() -> dict[str, PipelineEntry]:
    """``sd`` and ``flux`` as :mod:`tiny` builds them (prompts as embeddings, the pipelines the
    rest of the suite was verified on); every other family of the table through the driver."""
    from pytest_hotswap.pipelines.families_table import FAMILIES

    entries = {
        "sd": PipelineEntry("sd", sd_spec, "tiny Stable Diffusion: UNet (Linear + Conv2d), CLIP"),
        "flux": PipelineEntry("flux", flux_spec, "tiny Flux: transformer, CLIP + T5"),
    }
    for name, family in FAMILIES.items():
        entries.setdefault(name, PipelineEntry(name, family_spec(name), family.description))
    return entries


REGISTRY: dict[str, PipelineEntry] = _registry()


def register(entry: PipelineEntry) -> None:
    """Add a pipeline name (a downstream conftest may call it at import)."""
    REGISTRY[entry.name] = entry


# --- pipelines saved on disk ------------------------------------------------------------------


def saved_spec(saved: SavedPipeline, options: HotswapOptions, seed: int = 0) -> PipelineSpec:
    """Load the saved pipeline offline on the options' device and dtype, driven by the families
    driver: its LoRA loader's denoisers, its own ``__call__`` with a prompt through its own
    tokenizers, the smallest size, two steps, latents out (see :func:`driven_spec`).

    A folder saved without tokenizers by pytest-hotswap's tiny ``sd`` / ``flux`` builders (their
    prompts are embeddings) is called as those are, recognised by its exact pipeline class.
    """
    from diffusers import DiffusionPipeline

    from pytest_hotswap.adapters.loading import quiet_diffusers
    from pytest_hotswap.pipelines.families_driver import check_drivable

    options = options.resolved()
    if saved.class_name is not None:
        check_drivable(saved.pipeline_class())  # before loading: what is missing, named
    with quiet_diffusers():
        pipe = DiffusionPipeline.from_pretrained(
            str(saved.folder),
            local_files_only=True,
            torch_dtype=getattr(torch, options.dtype),
            **dict.fromkeys(saved.missing),  # saved as null: diffusers wants them passed as None
        )
    pipe = pipe.to(options.device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    encoded = _tokenizer_free_call(pipe, saved, seed)
    if encoded is None:
        _check_tokenizers(pipe, saved)
        return driven_spec(saved.label, pipe, seed)

    def run(**overrides: Any) -> torch.Tensor:
        return pipe(**{**encoded(), **overrides}).images

    return PipelineSpec(saved.label, getattr(pipe, saved.denoiser), run, pipe=pipe)


def _tokenizer_free_call(
    pipe: Any, saved: SavedPipeline, seed: int
) -> Callable[[], dict[str, Any]] | None:
    """The embeddings call of a tiny ``sd`` / ``flux`` saved without tokenizers, else None."""
    from diffusers import FluxPipeline, StableDiffusionPipeline

    if "tokenizer" not in saved.missing:
        return None
    if type(pipe) is FluxPipeline:
        return lambda: tiny.flux_encoded_call_kwargs(pipe, seed)
    if type(pipe) is StableDiffusionPipeline:
        return lambda: tiny.sd_encoded_call_kwargs(pipe, seed)
    return None


def _check_tokenizers(pipe: Any, saved: SavedPipeline) -> None:
    from pytest_hotswap.pipelines.families_driver import BUILD_HOOK, UnsupportedPipelineError

    lacking = [name for name in saved.missing if name.startswith("tokenizer")]
    if lacking:
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__} in {saved.folder} was saved without {', '.join(lacking)}; "
            "the driver passes a prompt through the pipeline's own tokenizers: save the "
            f"pipeline with them, or {BUILD_HOOK}"
        )


def build_spec(name: str, options: HotswapOptions, seed: int = 0) -> PipelineSpec:
    """Build ``name``: a registered pipeline, else a saved folder or a cached hub id."""
    entry = REGISTRY.get(name)
    if entry is not None:
        return entry.build(options, seed)
    return saved_spec(find_saved_pipeline(name), options, seed)
