"""The reference hotswap: strict, atomic, index-based LoRA swapping for compiled diffusers models.

Workflow::

    pipe.load_lora_weights(first, adapter_name="default")  # plain diffusers load
    prepare_for_hotswap(pipe, max_rank=64)                   # pad + index, before compiling
    pipe.unet = torch.compile(pipe.unet)
    hotswap(pipe, "next.safetensors")                        # no recompile
    set_lora_scale(pipe, 0.6)                                # no recompile either

Opt-ins of ``prepare_for_hotswap``: ``targets=[...]`` (module names and / or adapters: every layer
any of them targets gets a zero LoRA, so adapters for disjoint layers swap in place),
``text_encoder=True`` (the pipeline's text encoders are padded too; a swap is one transaction
across all components) and ``slots=N`` (N weighted adapters per layer: ``hotswap(..., slot=k)``,
``set_lora_scale(..., slot=k)``). ``written_tensors`` lists the views a swap would write, the
copy floor of a benchmark.

It operates on the LoRA layers PEFT injected (what ``load_lora_adapter`` produces) with its own
prepare and swap logic, so the test suite can compare diffusers + PEFT's hotswap against it.
"""

from __future__ import annotations

import importlib
from typing import Any

from pytest_hotswap.reference.errors import (
    AdapterNotFoundError,
    AlreadyCompiledError,
    HotswapError,
    InvalidAdapterError,
    NotPreparedError,
    RankTooLargeError,
    ShapeMismatchError,
    TextEncoderLoraError,
    UnexpectedTargetsError,
)

#: The rank ``prepare_for_hotswap`` pads to when it is given none (the plugin's
#: ``--hotswap-max-rank`` default too).
DEFAULT_MAX_RANK = 128

# The functions import torch: loaded on first use, so importing the errors stays light.
_FUNCTIONS = {
    "prepare_for_hotswap": "pytest_hotswap.reference.prepare",
    "hotswap": "pytest_hotswap.reference.swap",
    "set_lora_scale": "pytest_hotswap.reference.swap",
    "written_tensors": "pytest_hotswap.reference.swap",
}

__all__ = [
    "DEFAULT_MAX_RANK",
    "AdapterNotFoundError",
    "AlreadyCompiledError",
    "HotswapError",
    "InvalidAdapterError",
    "NotPreparedError",
    "RankTooLargeError",
    "ShapeMismatchError",
    "TextEncoderLoraError",
    "UnexpectedTargetsError",
    "hotswap",
    "prepare_for_hotswap",
    "set_lora_scale",
    "written_tensors",
]


def __getattr__(name: str) -> Any:
    module = _FUNCTIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_hotswap.reference' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
