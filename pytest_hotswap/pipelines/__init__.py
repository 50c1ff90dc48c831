"""Pipelines for hotswap tests: tiny builders, the registry of names, the recipe, the ready pipeline.

* ``tiny``: the tiny Stable Diffusion and Flux pipelines (configs of diffusers' fast tests);
* ``registry``: ``PipelineSpec`` (what a build hook returns), pipeline names with their strength
  keyword, saved pipeline folders and cached hub ids;
* ``recipe``: prepare, load, quantize, compile, warm up (``build_hotswap_pipeline``);
* ``ready``: ``HotswapPipeline``, with ``swap``, ``set_strength``, ``run`` and ``denoise``;
* ``saved``: pipeline folders and cached hub ids, found without importing torch.

Names are loaded on first use, so importing the package imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ADAPTER_NAME": "pytest_hotswap.implementations",
    "FLUX_CONFIG": "pytest_hotswap.pipelines.tiny",
    "REGISTRY": "pytest_hotswap.pipelines.registry",
    "UNET_CONFIG": "pytest_hotswap.pipelines.tiny",
    "HotswapPipeline": "pytest_hotswap.pipelines.ready",
    "LoraSource": "pytest_hotswap.adapters.loading",
    "PipelineEntry": "pytest_hotswap.pipelines.registry",
    "PipelineNotFoundError": "pytest_hotswap.pipelines.saved",
    "PipelineSpec": "pytest_hotswap.pipelines.registry",
    "adapter_rank": "pytest_hotswap.adapters.loading",
    "build_hotswap_pipeline": "pytest_hotswap.pipelines.recipe",
    "build_spec": "pytest_hotswap.pipelines.registry",
    "build_tiny_flux_pipeline": "pytest_hotswap.pipelines.tiny",
    "build_tiny_flux_transformer": "pytest_hotswap.pipelines.tiny",
    "build_tiny_sd_pipeline": "pytest_hotswap.pipelines.tiny",
    "build_tiny_unet": "pytest_hotswap.pipelines.tiny",
    "check_quantization": "pytest_hotswap.pipelines.recipe",
    "compile_denoiser": "pytest_hotswap.pipelines.recipe",
    "describe_adapter": "pytest_hotswap.adapters.loading",
    "flux_call_kwargs": "pytest_hotswap.pipelines.tiny",
    "flux_inputs": "pytest_hotswap.pipelines.tiny",
    "flux_spec": "pytest_hotswap.pipelines.registry",
    "load_first_adapter": "pytest_hotswap.adapters.loading",
    "quantize_denoiser": "pytest_hotswap.pipelines.recipe",
    "quiet_diffusers": "pytest_hotswap.adapters.loading",
    "read_peft_adapter": "pytest_hotswap.adapters.loading",
    "sd_call_kwargs": "pytest_hotswap.pipelines.tiny",
    "sd_spec": "pytest_hotswap.pipelines.registry",
    "unet_inputs": "pytest_hotswap.pipelines.tiny",
    "label_of": "pytest_hotswap.pipelines.saved",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_hotswap.pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
