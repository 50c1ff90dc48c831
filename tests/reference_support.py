"""Shared helpers of the reference hotswap tests: tiny models, eager references, checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pytest_hotswap import pipelines


@dataclass(frozen=True)
class Arch:
    """A tiny denoiser architecture: how to build it, call it, and its LoRA key prefix."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    prefix: str
    scale_kwarg: str  # the call argument diffusers reads a LoRA scale from

    def with_lora(self, path: Path, adapter_name: str = "default") -> torch.nn.Module:
        """A fresh eager model with ``path`` loaded the plain diffusers way (no padding)."""
        model = self.build()
        # use_safetensors=True: without it diffusers 0.42 drops the file's alpha metadata
        # (see test_reference_crosscheck.py::test_model_level_load_keeps_file_alpha).
        model.load_lora_adapter(
            str(path), prefix=self.prefix, adapter_name=adapter_name, use_safetensors=True
        )
        return model

    def run(self, model: Any, scale: float | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(self.inputs())
        if scale is not None:
            kwargs[self.scale_kwarg] = {"scale": scale}
        with torch.no_grad():
            return model(**kwargs, return_dict=False)[0]


UNET = Arch(
    "unet", pipelines.build_tiny_unet, pipelines.unet_inputs, "unet", "cross_attention_kwargs"
)
FLUX = Arch(
    "flux",
    pipelines.build_tiny_flux_transformer,
    pipelines.flux_inputs,
    "transformer",
    "joint_attention_kwargs",
)
ARCHS = {"unet": UNET, "flux": FLUX}


def model_checksum(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, every LoRA scaling and every adapter config."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=True).items():
        digest.update(name.encode())
        digest.update(_tensor_bytes(tensor))
    for name, module in model.named_modules():
        for adapter, scaling in sorted(getattr(module, "scaling", {}).items()):
            digest.update(f"{name}.scaling.{adapter}".encode())
            digest.update(
                _tensor_bytes(scaling)
                if isinstance(scaling, torch.Tensor)
                else repr(scaling).encode()
            )
    for adapter, config in sorted(getattr(model, "peft_config", {}).items()):
        digest.update(adapter.encode())
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=repr).encode())
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return (
        repr((tuple(tensor.shape), tensor.dtype)).encode()
        + flat.view(torch.uint8).numpy().tobytes()
    )


def parameter_identity(
    model: torch.nn.Module,
) -> dict[str, tuple[int, torch.Size, torch.dtype, torch.device]]:
    """What must not change under a compiled model: each parameter's object, shape, dtype, device."""
    return {n: (id(p), p.shape, p.dtype, p.device) for n, p in model.named_parameters()}


@contextlib.contextmanager
def compile_environment() -> Iterator[None]:
    """What every reference test module compiles under; each wraps it in a module fixture.

    diffusers is quieted (every SD load logs about the text encoder) and dynamo's
    ``recompile_limit`` raised: every diffusers model compiles the same frame, so all models of
    this process share the limit; this leaves room for the ones other test modules compiled.
    """
    with pipelines.quiet_diffusers(), torch._dynamo.config.patch(recompile_limit=64):
        yield
