"""The recipe that makes any pipeline hotswap-ready and compiled, one function per step.

``build_hotswap_pipeline`` runs them in order::

    implementation.before_load(spec, preparation)     # diffusers: pad before the first load
    implementation.load_first(spec, first_lora)       # plain load, adapter "default"
    implementation.after_load(spec, preparation)      # reference / PEFT: pad after the load
    quantize_denoiser(denoiser, quantize)             # each of spec.denoisers: torchao weights
    compile_denoiser(denoiser, backend, mode)         # each, in place, isolate_recompiles=True
    warm_up(pipeline)                                  # the exact call used later
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pytest_hotswap.adapters.loading import LoraSource
from pytest_hotswap.implementations import Implementation, Preparation
from pytest_hotswap.options import QUANTIZE
from pytest_hotswap.pipelines.registry import PipelineSpec

if TYPE_CHECKING:
    from pytest_hotswap.options import HotswapOptions
    from pytest_hotswap.pipelines.ready import HotswapPipeline


def build_hotswap_pipeline(
    spec: PipelineSpec,
    implementation: Implementation | str,
    first_lora: LoraSource,
    options: HotswapOptions,
    *,
    targets: tuple[str, ...] | None = None,
    text_encoder: bool = False,
    slots: int = 1,
    preparation: Preparation | None = None,
) -> HotswapPipeline:
    """Make ``spec`` hotswap-ready: prepare, load ``first_lora``, quantize, compile, warm up.

    ``preparation``: one the caller built and checked against ``implementation`` already (the
    pipeline cache does, before it builds the spec), instead of ``targets``, ``text_encoder`` and
    ``slots``.
    """
    from pytest_hotswap import implementations
    from pytest_hotswap.pipelines.ready import HotswapPipeline

    if isinstance(implementation, str):
        implementation = implementations.get(implementation)
    options = options.resolved()
    if preparation is None:
        preparation = Preparation(options.max_rank, targets, text_encoder, slots)
        implementation.check(preparation)
    elif (targets, text_encoder, slots) != (None, False, 1):
        raise ValueError("pass either preparation or targets / text_encoder / slots, not both")
    elif preparation.max_rank != options.max_rank:
        raise ValueError(
            f"preparation.max_rank={preparation.max_rank} but options.max_rank="
            f"{options.max_rank}; build the preparation from the same options"
        )
    check_quantization(options.quantize, options.device)  # before the spec is changed
    implementation.check_spec(spec)
    implementation.before_load(spec, preparation)
    implementation.load_first(spec, first_lora)
    implementation.after_load(spec, preparation)
    if preparation.slots > 1:
        implementation.load_slots(spec, first_lora, preparation)
    for denoiser in spec.denoisers:  # Wan 2.2: both experts
        quantize_denoiser(denoiser, options.quantize)
        compile_denoiser(denoiser, options.backend, options.mode, fullgraph=spec.fullgraph)
    if preparation.text_encoder:
        for encoder in spec.text_encoders().values():
            compile_denoiser(encoder, options.backend, options.mode, fullgraph=False)
    pipeline = HotswapPipeline(spec, implementation, options, first_lora, preparation)
    if preparation.slots > 1:
        pipeline.reset_strengths()
    pipeline.warm_up()
    return pipeline


_QUANT_CONFIGS = {
    "int8-weight-only": "Int8WeightOnlyConfig",
    "float8-weight-only": "Float8WeightOnlyConfig",
    "float8-dynamic": "Float8DynamicActivationFloat8WeightConfig",
}


def check_quantization(quantize: str, device: str | torch.device) -> None:
    """Refuse early what cannot run here, before anything is built."""
    if quantize not in QUANTIZE:
        raise ValueError(
            f"unknown quantization {quantize!r}; expected one of {', '.join(QUANTIZE)}"
        )
    if quantize != "float8-dynamic":
        return
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = (
            "a CPU"
            if device.type != "cuda"
            else f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
        )
        raise ValueError(
            f"quantize='float8-dynamic' (torchao Float8DynamicActivationFloat8WeightConfig) needs a "
            f"CUDA GPU with compute capability >= 8.9, not {where}; use int8-weight-only or "
            "float8-weight-only here, or run with --hotswap-device=cuda on such a GPU"
        )


def quantize_denoiser(denoiser: torch.nn.Module, quantize: str) -> None:
    """Quantize the denoiser's base Linear weights with torchao; the LoRA weights stay as they are.

    LoRA ``lora_A`` / ``lora_B`` layers are left out so a hotswap can still copy into them, and
    ``set_inductor_config=False`` keeps torchao from changing global inductor settings.
    """
    if quantize == "none":
        return
    check_quantization(quantize, next(denoiser.parameters()).device)
    try:
        from torchao import quantization
    except ImportError:
        raise RuntimeError(
            f"quantize={quantize!r} needs torchao, which is not installed: "
            "pip install 'pytest-hotswap[quant]'"
        ) from None
    config = getattr(quantization, _QUANT_CONFIGS[quantize])(set_inductor_config=False)
    quantization.quantize_(denoiser, config, filter_fn=_is_base_linear)


def _is_base_linear(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and ".lora_" not in f".{fqn}"


def compile_denoiser(
    denoiser: torch.nn.Module, backend: str, mode: str = "default", *, fullgraph: bool = True
) -> None:
    """Compile in place, so the pipeline's reference to its denoiser calls the compiled code.

    Each model gets its own cache entries and its own ``recompile_limit`` budget
    (``isolate_recompiles=True``, torch >= 2.13): what another model or an earlier test compiled
    is never reused, so a swap recompiles here exactly when it would in a fresh process.
    ``mode`` only means something to inductor; ``fullgraph`` also turns a recompile past the
    limit into an error instead of a silent fall back to eager.
    """
    from pytest_hotswap.watch.isolation import supported

    kwargs: dict[str, Any] = {"isolate_recompiles": True} if supported() else {}
    denoiser.compile(
        backend=backend,
        mode=mode if backend == "inductor" else None,
        fullgraph=fullgraph,
        **kwargs,
    )
