"""Finding the denoiser (and the LoRA layers PEFT injected into it) in a model or a pipeline."""

from __future__ import annotations

from typing import Any

import torch

from pytest_hotswap.adapters.header import DENOISER_NAMES, TEXT_ENCODER_NAMES


def unwrap_compiled(module: torch.nn.Module) -> torch.nn.Module:
    """The eager module behind ``torch.compile(module)`` (an ``OptimizedModule``), else itself."""
    return getattr(module, "_orig_mod", module)


def is_compiled(module: torch.nn.Module) -> bool:
    """True for ``torch.compile(module)`` wrappers and for modules compiled in place
    (``.compile()``), also when only some of their blocks are (``compile_repeated_blocks``)."""
    if hasattr(module, "_orig_mod"):
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def find_denoiser(model_or_pipeline: Any) -> tuple[str | None, torch.nn.Module]:
    """Return ``(attribute name, module)`` of the pipeline's denoiser, or ``(None, model)`` for a model.

    The module is returned as stored, so a compiled wrapper stays visible to the caller.
    """
    if isinstance(model_or_pipeline, torch.nn.Module):
        return None, model_or_pipeline
    for name in DENOISER_NAMES:
        module = getattr(model_or_pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    raise TypeError(
        f"expected a torch.nn.Module or a diffusers pipeline with a {' or '.join(DENOISER_NAMES)} "
        f"component, got {type(model_or_pipeline).__name__}; pass the denoiser model itself"
    )


def find_text_encoders(model_or_pipeline: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders as stored (a compiled wrapper stays visible), by attribute
    name; none for a bare model."""
    if isinstance(model_or_pipeline, torch.nn.Module):
        return {}
    found = {name: getattr(model_or_pipeline, name, None) for name in TEXT_ENCODER_NAMES}
    return {name: module for name, module in found.items() if isinstance(module, torch.nn.Module)}


def denoiser_prefix(model_or_pipeline: Any) -> str:
    """The key prefix diffusers gives the denoiser's LoRA keys: ``unet`` or ``transformer``.

    A pipeline uses its own attribute name; a bare model is a UNet (Stable Diffusion naming) or,
    for any other model, a transformer, the name diffusers' transformer pipelines use.
    """
    name, module = find_denoiser(model_or_pipeline)
    if name is not None:
        return name
    from diffusers import UNet2DConditionModel

    return "unet" if isinstance(unwrap_compiled(module), UNet2DConditionModel) else "transformer"


def lora_loader(model_or_pipeline: Any) -> Any:
    """The diffusers LoRA loader class for the object: a pipeline's own, else SD's or Flux's."""
    if not isinstance(model_or_pipeline, torch.nn.Module):
        if not hasattr(model_or_pipeline, "lora_state_dict"):
            raise TypeError(
                f"{type(model_or_pipeline).__name__} has no LoRA support in diffusers "
                "(no lora_state_dict / save_lora_weights); pass its denoiser model instead"
            )
        return type(model_or_pipeline)
    from diffusers.loaders import FluxLoraLoaderMixin, StableDiffusionLoraLoaderMixin

    if denoiser_prefix(model_or_pipeline) == "unet":
        return StableDiffusionLoraLoaderMixin
    return FluxLoraLoaderMixin
