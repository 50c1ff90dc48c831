"""Drive any diffusers pipeline with a LoRA loader from what the pipeline itself declares.

Nothing here asks which family a pipeline is. Its LoRA loader mixin declares the components it
loads into (``_lora_loadable_modules``); a component that is a diffusers model is a denoiser (the
UNet, transformer, Wan 2.2's second expert), the others are text encoders. Its ``__call__``
signature says which inputs it takes; its processors and VAE config say the size multiples. The
call is the cheapest one the pipeline allows: a prompt through its own tokenizers, no classifier-free
guidance, one frame, the smallest height and width, two steps, latents out, seeded.

What cannot be derived is data below, each with the reason. A pipeline the driver cannot drive
raises :class:`UnsupportedPipelineError` naming the class, what is missing and the build hook.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: Short: the offline tokenizers spend one token per character.
PROMPT = "a tiny cat"

#: Two steps: a multistep scheduler takes its second-order step, and a pipeline that hands steps
#: to experts by timestep (Wan 2.2's ``boundary_ratio``) reaches its second expert.
STEPS = 2

#: Token budget for pipelines that take ``max_sequence_length`` (T5, Qwen): the prompt fits, and
#: the text encoders and joint attention stay small. CLIP pads to its tokenizer's own length.
SEQUENCE_LENGTH = 16

#: Guidance scales set to 1 where ``__call__`` defaults them above 1: that turns classifier-free
#: guidance off (one denoiser pass per step instead of two). A default of None or 1 is left
#: alone (QwenImage warns about a ``guidance_scale`` given to a model without guidance).
GUIDANCE = ("guidance_scale", "true_cfg_scale")

#: Pipelines whose ``check_inputs`` require a size multiple whatever their VAE, by LoRA loader:
#: the Stable Diffusion 1.x/2.x and XL pipelines refuse a height or width not divisible by 8.
FIXED_MULTIPLE = {"StableDiffusionLoraLoaderMixin": 8, "StableDiffusionXLLoraLoaderMixin": 8}

#: Inputs the driver makes or that the pipeline reads only when asked (an IP adapter is loaded
#: with ``load_ip_adapter``): never a reason to refuse a pipeline.
OPTIONAL_INPUTS = ("ip_adapter_image", "negative_ip_adapter_image", "ip_adapter_image_embeds")

#: Pipelines whose image input is optional (they run text-to-image without it). A signature
#: cannot say so: an img2img pipeline's ``image`` also defaults to None and is then refused by
#: ``check_inputs``. Read in diffusers 0.42.1.
IMAGE_OPTIONAL = {
    "FluxKontextPipeline": ("image",),
    "Flux2Pipeline": ("image",),
    "Flux2KleinPipeline": ("image",),
}

#: Inputs taken by name where a signature has no annotation (a video is a list of PIL images).
MEDIA_INPUTS = ("image", "video", "mask_image", "control_image", "control_video")

BUILD_HOOK = (
    "build it yourself and return a PipelineSpec with its own run() from a "
    "pytest_hotswap_build_pipeline hook"
)


class UnsupportedPipelineError(ValueError):
    """A pipeline the driver cannot drive: the message names the class and what is missing."""


@dataclasses.dataclass(frozen=True)
class LoraRoute:
    """How one LoRA-loadable component receives an adapter through the pipeline's loader.

    ``prefix`` is the key prefix the loader selects (``unet.``, ``transformer.``); ``load_kwargs``
    go to ``load_lora_weights``.
    """

    component: str
    prefix: str
    load_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


#: Loaders that reach a component other than by its own key prefix. Read in diffusers 0.42.1's
#: ``WanLoraLoaderMixin.load_lora_weights``: it loads ``transformer.`` keys into ``transformer``,
#: or into ``transformer_2`` when passed ``load_into_transformer_2=True`` (a keyword it pops from
#: ``**kwargs``, so no signature shows it); ``transformer_2.`` keys are never read.
LOADER_ROUTES: dict[tuple[str, str], LoraRoute] = {
    ("WanLoraLoaderMixin", "transformer_2"): LoraRoute(
        "transformer_2", "transformer", {"load_into_transformer_2": True}
    ),
}


def _pipeline_class(pipe: Any) -> type:
    return pipe if isinstance(pipe, type) else type(pipe)


def lora_loader(pipe: Any) -> type:
    """The pipeline's LoRA loader mixin: the class in its MRO declaring ``_lora_loadable_modules``."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    cls = _pipeline_class(pipe)
    for base in cls.__mro__:
        if issubclass(base, LoraBaseMixin) and "_lora_loadable_modules" in vars(base):
            return base
    raise UnsupportedPipelineError(
        f"{cls.__name__} has no diffusers LoRA loader (no LoraLoaderMixin with "
        f"_lora_loadable_modules), so adapters cannot be loaded or hotswapped through it; "
        f"{BUILD_HOOK}"
    )


def lora_components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The components the loader declares that this pipeline holds, in the loader's order."""
    names = lora_loader(pipe)._lora_loadable_modules
    found = {name: getattr(pipe, name, None) for name in names}
    return {name: module for name, module in found.items() if isinstance(module, torch.nn.Module)}


def denoisers(pipe: Any) -> dict[str, torch.nn.Module]:
    """The LoRA-loadable diffusers models (``unet``, ``transformer``, ``transformer_2`` ...)."""
    from diffusers import ModelMixin

    found = {n: m for n, m in lora_components(pipe).items() if isinstance(m, ModelMixin)}
    if not found:
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__}: none of its LoRA-loadable components "
            f"({', '.join(lora_loader(pipe)._lora_loadable_modules)}) is a diffusers model in "
            f"this pipeline; {BUILD_HOOK}"
        )
    return found


def text_encoders(pipe: Any) -> dict[str, torch.nn.Module]:
    """The LoRA-loadable components that are not diffusers models: the text encoders."""
    found = denoisers(pipe)
    return {n: m for n, m in lora_components(pipe).items() if n not in found}


def lora_route(pipe: Any, component: str) -> LoraRoute:
    """How an adapter for ``component`` goes through the pipeline's loader."""
    route = LOADER_ROUTES.get((lora_loader(pipe).__name__, component))
    return route if route is not None else LoraRoute(component, component)


def check_drivable(pipe: Any) -> None:
    """Refuse, naming what is missing, a pipeline (or class) the driver cannot call.

    Works on the class alone, so a folder's pipeline class can be checked before loading it.
    """
    cls = _pipeline_class(pipe)
    lora_loader(cls)
    parameters = inspect.signature(cls.__call__).parameters
    if "prompt" not in parameters:
        raise UnsupportedPipelineError(
            f"{cls.__name__}.__call__ takes no prompt, the one input the driver makes; {BUILD_HOOK}"
        )
    missing = [
        name
        for name, parameter in list(parameters.items())[1:]
        if _needs_input(cls.__name__, name, parameter)
    ]
    if missing:
        raise UnsupportedPipelineError(
            f"{cls.__name__}.__call__ needs input the driver cannot make: "
            f"{', '.join(missing)} (an image, video or mask, or an argument without a default); "
            f"pytest-hotswap drives pipelines from a prompt alone; {BUILD_HOOK}"
        )


def _needs_input(pipeline: str, name: str, parameter: inspect.Parameter) -> bool:
    if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
        return False
    if name in OPTIONAL_INPUTS or name in IMAGE_OPTIONAL.get(pipeline, ()):
        return False
    if parameter.default is inspect.Parameter.empty:
        return name != "prompt"
    # PipelineImageInput and PIL images spell "Image"; an unannotated input by its name
    return "Image" in str(parameter.annotation) or name in MEDIA_INPUTS


def _spatial(value: Any) -> int:
    """The spatial entry of a patch size: ``2``, ``(1, 2, 2)`` (t, h, w) or ``(2,)``."""
    if isinstance(value, (list, tuple)):
        return int(value[-1])
    return int(value) if value else 1


def smallest_size(pipe: Any) -> int:
    """The smallest height (= width) every part of the pipeline accepts.

    The least common multiple of the image (or video) processor's ``vae_scale_factor`` (which
    includes the 2x2 packing of Flux-like pipelines), the VAE factor times the first denoiser's
    spatial patch and its down-sampling (a UNet halves the latent ``num_upsamplers`` times), and
    a multiple the pipeline's own checks fix (:data:`FIXED_MULTIPLE`).
    """
    processor = getattr(pipe, "image_processor", None) or getattr(pipe, "video_processor", None)
    vae = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8)
    outer = getattr(getattr(processor, "config", None), "vae_scale_factor", None) or vae
    denoiser = next(iter(denoisers(pipe).values()))
    config = denoiser.config
    patch = config.get("patch_size") or (config.get("all_patch_size") or (1,))[0]
    inner = vae * _spatial(patch) * 2 ** getattr(denoiser, "num_upsamplers", 0)
    fixed = FIXED_MULTIPLE.get(lora_loader(pipe).__name__, 1)
    return math.lcm(int(outer), int(inner), fixed)


def call_plan(pipe: Any, seed: int = 0, prompt: str = PROMPT) -> dict[str, Any]:
    """The keyword arguments of the smallest seeded call of ``pipe`` (latents out)."""
    check_drivable(pipe)
    parameters = inspect.signature(type(pipe).__call__).parameters
    size = smallest_size(pipe)
    device = getattr(pipe, "_execution_device", None) or pipe.device
    wanted: dict[str, Any] = {
        "prompt": prompt,
        "height": size,
        "width": size,
        # the smallest count of a causal video VAE: (num_frames - 1) % temporal factor == 0
        "num_frames": 1,
        "num_inference_steps": STEPS,
        "max_sequence_length": SEQUENCE_LENGTH,
        "output_type": "latent",
        "generator": torch.Generator(device).manual_seed(seed),
        "num_images_per_prompt": 1,
        "num_videos_per_prompt": 1,
    }
    for name in GUIDANCE:
        default = parameters[name].default if name in parameters else None
        if isinstance(default, (int, float)) and default > 1:
            wanted[name] = 1.0
    return {name: value for name, value in wanted.items() if name in parameters}


@contextmanager
def _count_calls(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, int]]:
    counts = dict.fromkeys(modules, 0)
    handles = []
    for name, module in modules.items():

        def hook(*_: Any, _name: str = name) -> None:
            counts[_name] += 1

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def drive(pipe: Any, seed: int = 0, **overrides: Any) -> torch.Tensor:
    """Call ``pipe`` the smallest way (see :func:`call_plan`) and return its latents.

    Every denoiser must run: a pipeline that leaves one idle at these steps is refused rather
    than tested on half its denoisers.
    """
    kwargs = {**call_plan(pipe, seed), **overrides}
    models = denoisers(pipe)
    with torch.no_grad(), _count_calls(models) as counts:
        output = pipe(**kwargs)
    idle = [name for name, count in counts.items() if count == 0]
    if idle:
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__}: {', '.join(idle)} never ran in a "
            f"{kwargs.get('num_inference_steps')}-step call; {BUILD_HOOK}"
        )
    latents = output[0]
    if not isinstance(latents, torch.Tensor):
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__} returned {type(latents).__name__} for output_type='latent', "
            f"not a tensor; {BUILD_HOOK}"
        )
    return latents
