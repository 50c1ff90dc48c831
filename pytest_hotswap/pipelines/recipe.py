"""The recipe that makes any pipeline hotswap-ready and compiled, one function per step.

``build_hotswap_pipeline`` runs them in order::

    implementation.before_load(spec, preparation)     # diffusers: pad before the first load
    implementation.load_first(spec, first_lora)       # plain load, adapter "default"
    implementation.after_load(spec, preparation)      # reference / PEFT: pad after the load
    quantize_denoiser(denoiser, quantize)             # each of spec.denoisers: torchao weights
    compile_denoiser(denoiser, backend, mode, scope)  # each, in place, isolate_recompiles=True;
                                                       # regional: compile_repeated_blocks
    warm_up(pipeline)                                  # the exact call used later
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pytest_hotswap.adapters.loading import LoraSource
from pytest_hotswap.implementations import Implementation, Preparation, UnsupportedFeatureError
from pytest_hotswap.options import COMPILE, QUANTIZE
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
    compiled: bool = True,
) -> HotswapPipeline:
    """Make ``spec`` hotswap-ready: prepare, load ``first_lora``, quantize, compile, warm up.

    ``preparation``: one the caller built and checked against ``implementation`` already (the
    pipeline cache does, before it builds the spec), instead of ``targets``, ``text_encoder`` and
    ``slots``. ``compiled=False`` leaves out ``torch.compile`` (everything else as built).
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
    check_compile_scope(spec, options.compile_scope)
    implementation.check_spec(spec)
    implementation.before_load(spec, preparation)
    implementation.load_first(spec, first_lora)
    implementation.after_load(spec, preparation)
    if preparation.slots > 1:
        implementation.load_slots(spec, first_lora, preparation)
    for denoiser in spec.denoisers:  # Wan 2.2: both experts
        quantize_denoiser(denoiser, options.quantize)
        if compiled:
            compile_denoiser(
                denoiser,
                options.backend,
                options.mode,
                fullgraph=spec.fullgraph,
                scope=options.compile_scope,
            )
    if (
        compiled and preparation.text_encoder
    ):  # whole under either scope: CLIP and T5 declare no _repeated_blocks
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


def check_compile_scope(spec: PipelineSpec, scope: str) -> None:
    """Refuse ``regional`` for a denoiser that has no repeated blocks, before anything is built.

    A silent fall back to whole compilation would label the matrix ``compile=regional`` for a
    model compiled whole; "not supported" tells the user what was not tested and why.
    """
    if scope != "regional":
        return
    for name, denoiser in zip(spec.denoiser_names(), spec.denoisers, strict=True):
        blocks = tuple(getattr(denoiser, "_repeated_blocks", None) or ())
        what = f"{type(denoiser).__name__} ({name})"
        if not blocks or not hasattr(denoiser, "compile_repeated_blocks"):
            raise UnsupportedFeatureError(
                f"{what} declares no _repeated_blocks, so it cannot be compiled regionally "
                f"({COMPILE.cli}=regional); use {COMPILE.cli}=whole"
            )
        if not any(type(module).__name__ in blocks for module in denoiser.modules()):
            raise UnsupportedFeatureError(
                f"{what} declares _repeated_blocks {list(blocks)} but holds no such module; use "
                f"{COMPILE.cli}=whole"
            )


def compile_denoiser(
    denoiser: torch.nn.Module,
    backend: str,
    mode: str = "default",
    *,
    fullgraph: bool = True,
    scope: str = "whole",
) -> None:
    """Compile in place, so the pipeline's reference to its denoiser calls the compiled code.

    Each model gets its own cache entries and its own ``recompile_limit`` budget
    (``isolate_recompiles=True``, torch >= 2.13): what another model or an earlier test compiled
    is never reused, so a swap recompiles here exactly when it would in a fresh process.
    ``mode`` only means something to inductor; ``fullgraph`` also turns a recompile past the
    limit into an error instead of a silent fall back to eager.

    ``scope="regional"`` compiles with diffusers' ``compile_repeated_blocks`` (each module whose
    class is in ``_repeated_blocks``) instead, then lets the blocks of one class share one
    isolated region (:func:`share_region_per_class`), as they share one in production.
    """
    from pytest_hotswap.watch.isolation import supported

    kwargs: dict[str, Any] = {"isolate_recompiles": True} if supported() else {}
    kwargs.update(
        backend=backend, mode=mode if backend == "inductor" else None, fullgraph=fullgraph
    )
    if scope == "regional":
        denoiser.compile_repeated_blocks(**kwargs)
        if kwargs.get("isolate_recompiles"):
            share_region_per_class(denoiser)
        return
    denoiser.compile(**kwargs)


def share_region_per_class(model: torch.nn.Module) -> bool:
    """Give every compiled block of one class in ``model`` the region of the first such block.

    ``compile_repeated_blocks`` calls ``block.compile()`` once per block: with
    ``isolate_recompiles=True`` each call is its own region, so each of N blocks compiles the
    shared block code again (N first compiles, N entries on the code object towards dynamo's
    ``accumulated_recompile_limit`` of 256, counted over all regions and never freed), where
    production (no isolation) compiles it once and every block reuses that entry. Re-applying
    the first block's dynamo context to the other blocks keeps production's sharing inside the
    model (a block whose layout changed is one recompile of that shared region) and the
    isolation from every other model. Returns ``False`` where the context cannot be found (a
    torch whose compiled wrapper looks otherwise): each block then keeps its own region, with
    the same verdicts and one compile per block.
    """
    first: dict[type, Any] = {}
    for module in model.modules():
        compiled = getattr(module, "_compiled_call_impl", None)
        if compiled is None:
            continue
        context = _dynamo_context(compiled)
        if context is None:
            return False
        shared = first.setdefault(type(module), context)
        if shared is not context:
            module._compiled_call_impl = shared(module._call_impl)
    return True


def _dynamo_context(compiled: Any) -> Any:
    """The dynamo context (``torch._dynamo.optimize(...)``) a ``torch.compile`` wrapper runs in."""
    code = getattr(compiled, "__code__", None)
    closure = getattr(compiled, "__closure__", None) or ()
    if code is None or "self" not in code.co_freevars:
        return None
    context = closure[code.co_freevars.index("self")].cell_contents
    if not callable(context) or getattr(context, "_isolate_recompiles_id", -1) < 0:
        return None
    return context
