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
        for adapter, scaling in sorted(_lora_scalings(module).items()):
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


def _lora_scalings(module: torch.nn.Module) -> dict[str, Any]:
    """PEFT's per-adapter scalings of a LoRA layer; not the float ``scaling`` of T5's attention."""
    scaling = getattr(module, "scaling", None)
    return scaling if isinstance(scaling, dict) else {}


def tensor_layout(model: torch.nn.Module) -> dict[str, tuple[Any, ...]]:
    """Every parameter, buffer and LoRA scaling tensor: object, shape, stride, dtype, device and
    storage (pointer and offset). A swap or a refused swap must leave all of it as it was."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name, module in model.named_modules():
        for adapter, scaling in _lora_scalings(module).items():
            if isinstance(scaling, torch.Tensor):
                tensors[f"{name}.scaling.{adapter}"] = scaling
    return {
        name: (
            id(t),
            tuple(t.shape),
            t.stride(),
            t.dtype,
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
        )
        for name, t in tensors.items()
    }


def write_with_metadata(path: Path, state: dict[str, torch.Tensor], metadata: Any) -> Path:
    """A safetensors adapter whose ``lora_adapter_metadata`` is ``metadata`` as JSON (any value)."""
    import safetensors.torch

    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(path),
        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)},
    )
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``lora_adapter_metadata`` object of an adapter file."""
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as handle:
        return json.loads((handle.metadata() or {})["lora_adapter_metadata"])


def parameter_identity(
    model: torch.nn.Module,
) -> dict[str, tuple[int, torch.Size, torch.dtype, torch.device]]:
    """What must not change under a compiled model: each parameter's object, shape, dtype, device."""
    return {n: (id(p), p.shape, p.dtype, p.device) for n, p in model.named_parameters()}


@contextlib.contextmanager
def compile_environment() -> Iterator[None]:
    """What every reference test module compiles under (the ``reference_compile_environment``
    fixture of tests/conftest.py, which each asks for in its ``pytestmark``).

    diffusers is quieted (every SD load logs about the text encoder) and dynamo's
    ``recompile_limit`` raised: every diffusers model compiles the same frame, so all models of
    this process share the limit; this leaves room for the ones other test modules compiled.
    """
    with pipelines.quiet_diffusers(), torch._dynamo.config.patch(recompile_limit=64):
        yield


@dataclass
class Served:
    """A prepared, compiled (eager backend) and warmed-up tiny model, and its first adapter."""

    arch: Arch
    model: torch.nn.Module  # the eager model the compiled one wraps
    compiled: torch.nn.Module
    output: torch.Tensor  # the compiled model's output with the first adapter
    first: Path  # the first adapter's file
    state: dict[str, torch.Tensor]  # its tensors
    metadata: dict[str, Any]  # its lora_adapter_metadata

    @classmethod
    def build(cls, arch: Arch, directory: Path, max_rank: int, **lora: Any) -> Served:
        """Built once per process and arguments: compiling a tiny UNet costs seconds, and the
        test modules that share one (refusals, fuzzing) each leave it as they found it."""
        key = (arch.name, max_rank, tuple(sorted(lora.items())))
        if key not in _SERVED:
            _SERVED[key] = cls._build(arch, directory, max_rank, **lora)
        return _SERVED[key]

    @classmethod
    def _build(cls, arch: Arch, directory: Path, max_rank: int, **lora: Any) -> Served:
        import safetensors.torch

        from pytest_hotswap.adapters import make_lora
        from pytest_hotswap.reference import prepare_for_hotswap
        from pytest_hotswap.watch import CompileWatcher

        first = make_lora(arch.build(), directory / f"{arch.name}_first.safetensors", **lora)
        model = arch.with_lora(first)
        prepare_for_hotswap(model, max_rank)
        compiled = torch.compile(model, backend="eager")
        with CompileWatcher() as watch, watch.warmup(arch.name):
            output = arch.run(compiled)
        return cls(
            arch,
            model,
            compiled,
            output,
            first,
            safetensors.torch.load_file(first),
            read_metadata(first),
        )

    def untouched(self) -> Callable[[], None]:
        """Snapshot the model; the returned check asserts it is bit-for-bit the same, with the
        same tensor objects and storage, and that the compiled model still gives the first
        output without compiling anything."""
        from pytest_hotswap.watch import CompileWatcher

        checksum, layout = model_checksum(self.model), tensor_layout(self.model)

        def check() -> None:
            __tracebackhide__ = True
            assert model_checksum(self.model) == checksum, "the model changed"
            assert tensor_layout(self.model) == layout, "a tensor changed object or storage"
            with CompileWatcher() as watch:
                again = self.arch.run(self.compiled)
            assert watch.compiles == 0 and watch.recompiles == 0, watch.events
            assert torch.equal(again, self.output)

        return check


_SERVED: dict[tuple[Any, ...], Served] = {}
