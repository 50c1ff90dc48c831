"""Random LoRA files for any LoRA-loadable pipeline, written and read by the pipeline's own loader.

An adapter is made with PEFT on a copy of the component (``inject_adapter_in_model`` with random
non-zero weights, ``get_peft_model_state_dict``), written with the pipeline's
``save_lora_weights`` under the key prefix its loader reads (:func:`families_driver.lora_route`),
with the rank and alpha as metadata, and loaded with ``load_lora_weights`` (``hotswap=True`` to
swap). Which components exist and how each is reached comes from the driver, not the family.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch

from pytest_hotswap.pipelines.families_driver import (
    BUILD_HOOK,
    UnsupportedPipelineError,
    lora_components,
    lora_route,
)

#: The attention projections of diffusers' attention layers: every denoiser of the table has them.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v")


def random_lora(
    pipe: Any,
    component: str,
    rank: int,
    seed: int = 0,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
) -> tuple[dict[str, torch.Tensor], Any]:
    """A random rank-``rank`` LoRA state dict (PEFT keys, no prefix) and its ``LoraConfig``."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    module = lora_components(pipe).get(component)
    if module is None:
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__} has no LoRA-loadable component {component!r}; it has "
            f"{', '.join(lora_components(pipe)) or 'none'}"
        )
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False
    )
    shadow = copy.deepcopy(module)  # the pipeline's own module stays untouched
    torch.manual_seed(seed)
    inject_adapter_in_model(config, shadow)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(shadow).items()}
    return state, config


def write_lora(
    pipe: Any, folder: Path, component: str, state: dict[str, torch.Tensor], config: Any
) -> Path:
    """Write one component's adapter with the pipeline's ``save_lora_weights``; return the file."""
    route = lora_route(pipe, component)
    save = type(pipe).save_lora_weights
    layers = f"{route.prefix}_lora_layers"
    if layers not in inspect.signature(save).parameters:
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__}.save_lora_weights takes no {layers}; cannot write an "
            f"adapter for {component!r}; {BUILD_HOOK}"
        )
    folder = Path(folder) / component
    weight_name = "pytorch_lora_weights.safetensors"
    save(
        folder,
        weight_name=weight_name,
        **{layers: state, f"{route.prefix}_lora_adapter_metadata": config.to_dict()},
    )
    return folder / weight_name


def load_lora(pipe: Any, files: dict[str, Path], adapter_name: str, hotswap: bool = False) -> None:
    """Load each component's file through the pipeline's ``load_lora_weights`` (its route)."""
    for component, path in files.items():
        route = lora_route(pipe, component)
        pipe.load_lora_weights(
            str(path.parent),
            weight_name=path.name,
            adapter_name=adapter_name,
            hotswap=hotswap,
            local_files_only=True,
            **route.load_kwargs,
        )
