"""Tiny diffusers pipelines and the recipe that makes any pipeline hotswap-ready and compiled.

The tiny builders use the configs of diffusers' own fast tests: each pipeline builds in about two
seconds on a CPU from seeded random weights. Prompts are passed as embeddings, so no tokenizer or
text download is needed.

The recipe, one function per step (``build_hotswap_pipeline`` runs them in order)::

    spec = build_spec("sd", options)                  # build (or a downstream hook's PipelineSpec)
    enable_hotswap(spec, implementation, max_rank)    # diffusers: pad before the first load
    load_first_adapter(spec, first_lora)              # plain load, adapter "default"
    pad_loaded_adapter(spec, implementation, max_rank)  # reference / PEFT: pad after the load
    quantize_denoiser(spec.denoiser, quantize)        # optional torchao weight quantization
    compile_denoiser(spec.denoiser, backend, mode, fullgraph=spec.fullgraph)
    warm_up(pipeline)                                 # the exact calls used later
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from pytest_hotswap.options import IMPLEMENTATIONS, QUANTIZE

if TYPE_CHECKING:
    import os

    from peft import LoraConfig

    from pytest_hotswap.options import HotswapOptions

LoraSource = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]
"""A LoRA adapter: a path to a ``.safetensors`` file or a state dict."""

ADAPTER_NAME = "default"

UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "norm_num_groups": 2,
}

FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 4, 8],
}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _place(obj: Any, device: str, dtype: str | torch.dtype) -> Any:
    """Move a model or pipeline, skipping the no-op move (diffusers warns on every ``.to(dtype)``)."""
    if torch.device(device).type == "cpu" and _dtype(dtype) == torch.float32:
        return obj
    return obj.to(device, _dtype(dtype))


def build_tiny_unet(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return _place(UNet2DConditionModel(**UNET_CONFIG), device, dtype).eval()


def build_tiny_flux_transformer(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return _place(FluxTransformer2DModel(**FLUX_CONFIG), device, dtype).eval()


def unet_inputs(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> dict[str, torch.Tensor]:
    """Keyword arguments for one call of the tiny UNet."""
    g = torch.Generator().manual_seed(seed)
    dt = _dtype(dtype)
    return {
        "sample": torch.randn(1, 4, 16, 16, generator=g).to(device, dt),
        "timestep": torch.tensor([10], device=device),
        "encoder_hidden_states": torch.randn(1, 7, 32, generator=g).to(device, dt),
    }


def flux_inputs(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> dict[str, torch.Tensor]:
    """Keyword arguments for one call of the tiny Flux transformer."""
    g = torch.Generator().manual_seed(seed)
    dt = _dtype(dtype)
    return {
        "hidden_states": torch.randn(1, 16, 4, generator=g).to(device, dt),
        "encoder_hidden_states": torch.randn(1, 48, 32, generator=g).to(device, dt),
        "pooled_projections": torch.randn(1, 32, generator=g).to(device, dt),
        "timestep": torch.tensor([1.0], device=device, dtype=dt),
        "img_ids": torch.zeros(16, 3, device=device, dtype=dt),
        "txt_ids": torch.zeros(48, 3, device=device, dtype=dt),
    }


def build_tiny_sd_pipeline(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> Any:
    """A StableDiffusionPipeline: tiny UNet (conv + attention), CLIP text encoder, VAE, DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = build_tiny_unet(seed, device, dtype)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=64,
            layer_norm_eps=1e-05,
            num_attention_heads=8,
            num_hidden_layers=3,
            pad_token_id=1,
            vocab_size=1000,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return _place(pipe, device, dtype)


def build_tiny_flux_pipeline(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> Any:
    """A FluxPipeline: tiny transformer, CLIP + T5 text encoders, VAE, flow-matching scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = build_tiny_flux_transformer(seed, device, dtype)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            pad_token_id=1,
            vocab_size=1000,
            hidden_act="gelu",
            projection_dim=32,
        )
    )
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            vocab_size=1000,
        )
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        text_encoder_2=text_encoder_2,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return _place(pipe, device, dtype)


def sd_call_kwargs(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> dict[str, Any]:
    """Keyword arguments for a deterministic 2-step call of the tiny SD pipeline (latents out)."""
    g = torch.Generator().manual_seed(seed)
    dt = _dtype(dtype)
    return {
        "prompt_embeds": torch.randn(1, 7, 32, generator=g).to(device, dt),
        "negative_prompt_embeds": torch.randn(1, 7, 32, generator=g).to(device, dt),
        "num_inference_steps": 2,
        "height": 32,
        "width": 32,
        "output_type": "latent",
        "generator": torch.Generator(device).manual_seed(seed),
    }


def flux_call_kwargs(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> dict[str, Any]:
    """Keyword arguments for a deterministic 2-step call of the tiny Flux pipeline (latents out)."""
    g = torch.Generator().manual_seed(seed)
    dt = _dtype(dtype)
    return {
        "prompt_embeds": torch.randn(1, 48, 32, generator=g).to(device, dt),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=g).to(device, dt),
        "max_sequence_length": 48,
        "num_inference_steps": 2,
        "height": 16,
        "width": 16,
        "output_type": "latent",
        "generator": torch.Generator(device).manual_seed(seed),
    }


# --- What a builder hands to the recipe ------------------------------------------------------


@dataclasses.dataclass
class PipelineSpec:
    """A built pipeline, not yet adapted, padded or compiled: what a build hook returns.

    ``denoiser`` is the module that carries the LoRA and gets compiled. ``pipe`` is the diffusers
    pipeline around it, if any: adapters then go through ``pipe.load_lora_weights``; without one
    they go through PEFT directly, so any ``nn.Module`` works (adapter keys in PEFT's format,
    ``fc1.lora_A.weight``). ``run`` is the deterministic end-to-end call that returns a tensor and
    takes keyword overrides; ``inputs`` returns the keyword arguments of one direct denoiser call.
    The recipe compiles the denoiser in place (``nn.Module.compile``), so closures over ``pipe`` or
    ``denoiser`` call the compiled code.
    """

    name: str
    denoiser: torch.nn.Module
    run: Callable[..., torch.Tensor]
    pipe: Any = None
    inputs: Callable[[], dict[str, Any]] | None = None
    fullgraph: bool = True

    @property
    def lora_target(self) -> Any:
        """What adapters are loaded into: the pipeline when there is one, else the denoiser."""
        return self.pipe if self.pipe is not None else self.denoiser


def sd_spec(options: HotswapOptions, seed: int = 0) -> PipelineSpec:
    """The tiny Stable Diffusion pipeline; its denoiser is the UNet (Linear and Conv2d LoRA)."""
    device, dtype = options.device, options.dtype
    pipe = build_tiny_sd_pipeline(seed, device, dtype)

    def run(**overrides: Any) -> torch.Tensor:
        return pipe(**{**sd_call_kwargs(seed, device, dtype), **overrides}).images

    return PipelineSpec(
        "sd", pipe.unet, run, pipe=pipe, inputs=lambda: unet_inputs(seed, device, dtype)
    )


def flux_spec(options: HotswapOptions, seed: int = 0) -> PipelineSpec:
    """The tiny Flux pipeline; its denoiser is the transformer."""
    device, dtype = options.device, options.dtype
    pipe = build_tiny_flux_pipeline(seed, device, dtype)

    def run(**overrides: Any) -> torch.Tensor:
        return pipe(**{**flux_call_kwargs(seed, device, dtype), **overrides}).images

    return PipelineSpec(
        "flux", pipe.transformer, run, pipe=pipe, inputs=lambda: flux_inputs(seed, device, dtype)
    )


BUILTIN_SPECS: dict[str, Callable[[HotswapOptions], PipelineSpec]] = {
    "sd": sd_spec,
    "flux": flux_spec,
}


def build_spec(name: str, options: HotswapOptions) -> PipelineSpec:
    """Build the tiny built-in pipeline called ``name`` on ``options.device`` / ``options.dtype``."""
    try:
        builder = BUILTIN_SPECS[name]
    except KeyError:
        raise ValueError(
            f"no built-in pipeline named {name!r}; the built-in pipelines are "
            f"{', '.join(BUILTIN_SPECS)} (implement pytest_hotswap_build_pipeline for others)"
        ) from None
    return builder(options)


# --- The recipe, one function per step ------------------------------------------------------


def build_hotswap_pipeline(
    spec: PipelineSpec,
    implementation: str,
    first_lora: LoraSource,
    options: HotswapOptions,
) -> HotswapPipeline:
    """Make ``spec`` hotswap-ready: prepare, load ``first_lora``, quantize, compile, warm up."""
    check_implementation(implementation)
    check_quantization(options.quantize, options.device)  # before the spec is changed
    enable_hotswap(spec, implementation, options.max_rank)
    load_first_adapter(spec, first_lora)
    pad_loaded_adapter(spec, implementation, options.max_rank)
    quantize_denoiser(spec.denoiser, options.quantize)
    compile_denoiser(spec.denoiser, options.backend, options.mode, fullgraph=spec.fullgraph)
    pipeline = HotswapPipeline(spec, implementation, options, first_lora)
    warm_up(pipeline)
    return pipeline


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown hotswap implementation {implementation!r}; expected one of "
            f"{', '.join(IMPLEMENTATIONS)}"
        )


def enable_hotswap(spec: PipelineSpec, implementation: str, max_rank: int) -> None:
    """Diffusers pads the first adapter while loading it, so it must know the max rank before."""
    if implementation == "diffusers" and _has_lora_loader(spec):
        spec.pipe.enable_lora_hotswap(target_rank=max_rank)


def load_first_adapter(spec: PipelineSpec, lora: LoraSource) -> None:
    """A plain (non-hotswap) load of ``lora`` as adapter ``"default"``."""
    if _has_lora_loader(spec):
        with quiet_diffusers():
            spec.pipe.load_lora_weights(_loadable(lora), adapter_name=ADAPTER_NAME)
        return
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state_dict, config = read_peft_adapter(lora)
    inject_adapter_in_model(config, spec.denoiser, adapter_name=ADAPTER_NAME, state_dict=state_dict)
    result = set_peft_model_state_dict(spec.denoiser, state_dict, ADAPTER_NAME)
    unexpected = [key for key in result.unexpected_keys if ".lora_" in key]
    if unexpected:
        raise ValueError(
            f"adapter keys match no LoRA layer of {type(spec.denoiser).__name__}: "
            f"{', '.join(unexpected[:5])}; write the adapter for this model (PEFT key format)"
        )


def pad_loaded_adapter(spec: PipelineSpec, implementation: str, max_rank: int) -> None:
    """Pad to ``max_rank`` and turn scalings into tensors, for the loaders that do it after a load."""
    if implementation == "reference":
        from pytest_hotswap.reference import prepare_for_hotswap

        prepare_for_hotswap(spec.lora_target, max_rank=max_rank, adapter_name=ADAPTER_NAME)
    elif not _has_lora_loader(spec):
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        prepare_model_for_compiled_hotswap(
            spec.denoiser, target_rank=max_rank, config=spec.denoiser.peft_config
        )


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

    ``mode`` only means something to inductor; ``fullgraph`` also turns a recompile past dynamo's
    ``recompile_limit`` into an error instead of a silent fall back to eager.
    """
    denoiser.compile(
        backend=backend, mode=mode if backend == "inductor" else None, fullgraph=fullgraph
    )


_WARMUP_RECOMPILE_LIMIT = 64
"""Dynamo's ``recompile_limit`` while warming up.

All diffusers models compile the same frame (``apply_lora_scale``'s ``wrapper``), so the first
compile of every new model configuration in a process adds an entry to one cache, and the default
limit of 8 would refuse the ninth. Raised only around the warm-up calls, never around a test's calls.
"""


def warm_up(pipeline: HotswapPipeline) -> torch.Tensor:
    """First call, the exact one used later, labelled a warm-up for an active ``CompileWatcher``.

    Only the pipeline call is warmed here: a direct ``denoise()`` call compiles another graph (a
    full inductor compile per configuration), so it is warmed on its first use instead, which
    ``HotswapPipeline.denoise`` allows only while the first adapter is loaded.
    """
    with _warmup_scope(pipeline, "run"):
        return pipeline.run()


@contextlib.contextmanager
def _warmup_scope(pipeline: HotswapPipeline, call: str) -> Iterator[None]:
    """Mark the compiles inside as first compiles of this configuration, not recompiles."""
    watcher = _active_watcher()
    label = f"warm-up {pipeline.name}-{pipeline.implementation} {call}"
    with contextlib.ExitStack() as stack:
        if watcher is not None:
            stack.enter_context(watcher.warmup(label))
        limit = max(torch._dynamo.config.recompile_limit, _WARMUP_RECOMPILE_LIMIT)
        stack.enter_context(torch._dynamo.config.patch(recompile_limit=limit))
        yield


# --- The ready pipeline --------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class HotswapPipeline:
    """A prepared, adapted and compiled pipeline; ``swap`` replaces the adapter in place.

    ``current_lora`` is the adapter loaded, or ``None`` when unknown: a swap that raised may have
    written part of its adapter (diffusers swaps the denoiser, then fails on text-encoder keys).
    """

    spec: PipelineSpec
    implementation: str
    options: HotswapOptions
    first_lora: LoraSource
    current_lora: LoraSource | None = dataclasses.field(init=False)
    swaps: int = dataclasses.field(default=0, init=False)
    _layout: dict[str, tuple[Any, ...]] = dataclasses.field(init=False, repr=False)
    _denoise_warm: bool = dataclasses.field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.current_lora = self.first_lora
        self._layout = _lora_layout(self.denoiser)

    def layout_changed(self) -> bool:
        """Whether a LoRA tensor changed shape, dtype or storage since the build.

        A swap that did so (PEFT growing a rank above ``max_rank``) made the compiled code
        recompile and left the pipeline no longer padded to ``max_rank``: a cached pipeline in
        this state must be rebuilt, not handed to the next test.
        """
        return _lora_layout(self.denoiser) != self._layout

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pipe(self) -> Any:
        return self.spec.pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.spec.denoiser

    @property
    def max_rank(self) -> int:
        return self.options.max_rank

    def swap(self, lora: LoraSource, *, label: str | None = None) -> float:
        """Hotswap ``lora`` into adapter ``"default"``; returns the swap's wall time in ms.

        An active ``CompileWatcher`` gets a step ``hotswap #N: <adapter> (rank R)`` (or ``label``)
        with that time, so a recompile on the next call names the swap that caused it.
        """
        self.current_lora = None  # until the swap is done: one that raises may have written part
        start = time.perf_counter()
        _hotswap(self.spec, self.implementation, lora)
        if torch.device(self.options.device).type == "cuda":
            torch.cuda.synchronize()
        swap_ms = (time.perf_counter() - start) * 1000
        self.swaps += 1
        self.current_lora = lora
        watcher = _active_watcher()
        if watcher is not None:
            watcher.step(
                label or f"hotswap #{self.swaps}: {describe_adapter(lora)}", swap_ms=swap_ms
            )
        return swap_ms

    def restore_first_adapter(self) -> None:
        """Put the pipeline back as built: first adapter, full strength (no recompile either way).

        The first adapter is swapped back in unless it is known to be loaded. The reference keeps
        a ``set_lora_scale`` strength across swaps, so its strength is reset to 1.0.
        """
        if self.implementation == "reference":
            from pytest_hotswap.reference import set_lora_scale

            set_lora_scale(self.spec.lora_target, 1.0, adapter_name=ADAPTER_NAME)
        if self.current_lora is not self.first_lora:
            self.swap(self.first_lora, label=f"restore first adapter of {self.name}")

    def run(self, **overrides: Any) -> torch.Tensor:
        """The deterministic end-to-end call (latents for the tiny pipelines)."""
        with torch.no_grad():
            return self.spec.run(**overrides)

    def denoise(self, **inputs: Any) -> torch.Tensor:
        """One direct call of the compiled denoiser (``spec.inputs()`` when none are given).

        Its first call compiles its own graph, a first compile, so it must happen while the
        first adapter is loaded (each test starts so): after a swap that compile could hide a
        recompile the swap caused. Later calls that compile are recompiles like any other.
        """
        if not inputs:
            if self.spec.inputs is None:
                raise ValueError(
                    f"pipeline {self.name!r} has no default denoiser inputs; pass them as keywords "
                    "or set PipelineSpec.inputs"
                )
            inputs = self.spec.inputs()
        with torch.no_grad():
            if self._denoise_warm:
                return _first_tensor(self.denoiser(**inputs))
            if self.current_lora is not self.first_lora:
                raise RuntimeError(
                    f"{self.name}-{self.implementation}: the first denoise() call compiles its own "
                    "graph and must come before the first swap of a test (while the first adapter "
                    "is loaded), so that a recompile caused by a swap cannot pass as that compile"
                )
            with _warmup_scope(self, "denoise"):
                out = self.denoiser(**inputs)
            self._denoise_warm = True
        return _first_tensor(out)


def _hotswap(spec: PipelineSpec, implementation: str, lora: LoraSource) -> None:
    if implementation == "reference":
        from pytest_hotswap.reference import hotswap

        hotswap(spec.lora_target, _loadable(lora), adapter_name=ADAPTER_NAME)
    elif _has_lora_loader(spec):
        with quiet_diffusers():
            spec.pipe.load_lora_weights(_loadable(lora), hotswap=True, adapter_name=ADAPTER_NAME)
    else:
        _peft_hotswap(spec.denoiser, lora)


def _peft_hotswap(model: torch.nn.Module, lora: LoraSource) -> None:
    """PEFT's own hotswap for a module without a diffusers loader (what diffusers calls inside)."""
    from peft.utils.hotswap import check_hotswap_configs_compatible, hotswap_adapter_from_state_dict
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

    state_dict, config = read_peft_adapter(lora)
    check_hotswap_configs_compatible(model.peft_config[ADAPTER_NAME], config)
    state_dict = _insert_adapter_name_into_state_dict(
        state_dict, adapter_name=ADAPTER_NAME, parameter_prefix="lora_"
    )
    hotswap_adapter_from_state_dict(model, state_dict, ADAPTER_NAME, config)


# --- Adapters ------------------------------------------------------------------------------


def read_peft_adapter(lora: LoraSource) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The state dict (PEFT keys, no adapter name) and ``LoraConfig`` of an adapter for a model.

    A ``transformer.`` / ``unet.`` key prefix (what diffusers' ``save_lora_weights`` writes) is
    dropped. The config is the one in the file's diffusers metadata when there is one; otherwise
    it is inferred from the shapes by diffusers' own rule (alpha = rank).
    """
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig

    metadata: dict[str, Any] = {}
    if isinstance(lora, Mapping):
        state_dict = dict(lora)
    else:
        from safetensors import safe_open

        with safe_open(_adapter_path(lora), framework="pt") as f:
            raw = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
            state_dict = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        metadata = json.loads(raw) if raw else {}
    prefix = _component_prefix(state_dict)
    state_dict = {key.removeprefix(prefix): t for key, t in state_dict.items()}
    metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    if metadata:
        return state_dict, LoraConfig(**metadata)
    ranks = {
        f"^{key}": t.shape[1] for key, t in state_dict.items() if "lora_B" in key and t.ndim > 1
    }
    if not ranks:
        raise ValueError(
            "the adapter has no lora_B weights; expected PEFT keys like fc.lora_B.weight"
        )
    return state_dict, LoraConfig(**get_peft_kwargs(ranks, None, state_dict, is_unet=False))


def _component_prefix(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"transformer."`` when every key starts with one denoiser component name, else ``""``."""
    from pytest_hotswap.reference.components import DENOISER_NAMES

    for name in DENOISER_NAMES:
        if state_dict and all(key.startswith(f"{name}.") for key in state_dict):
            return f"{name}."
    return ""


def adapter_rank(lora: LoraSource) -> int:
    """The largest LoRA rank in an adapter (reads only the shapes of a file)."""
    down = ("lora_A", "lora_down")
    if isinstance(lora, Mapping):
        shapes = [t.shape for key, t in lora.items() if any(d in key for d in down)]
    else:
        from safetensors import safe_open

        with safe_open(_adapter_path(lora), framework="pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys() if any(d in k for d in down)]  # noqa: SIM118
    return max((shape[0] for shape in shapes), default=0)


def describe_adapter(lora: LoraSource) -> str:
    """``style_b (rank 32)``: the file's stem (or "state dict") and its largest rank."""
    name = "state dict" if isinstance(lora, Mapping) else Path(lora).stem
    return f"{name} (rank {adapter_rank(lora)})"


def _adapter_path(lora: str | os.PathLike[str]) -> Path:
    path = Path(lora)
    if path.suffix != ".safetensors" or not path.is_file():
        raise ValueError(f"expected an existing .safetensors adapter file, got {str(path)!r}")
    return path


def _loadable(lora: LoraSource) -> str | dict[str, torch.Tensor]:
    """What diffusers' loaders take: a path string, or a copy of a state dict (they pop keys)."""
    return dict(lora) if isinstance(lora, Mapping) else str(_adapter_path(lora))


# --- Small helpers -------------------------------------------------------------------------


def _has_lora_loader(spec: PipelineSpec) -> bool:
    return spec.pipe is not None and hasattr(spec.pipe, "load_lora_weights")


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warnings: every SD load logs 'No LoRA keys associated to CLIPTextModel'."""
    from diffusers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _active_watcher() -> Any:
    from pytest_hotswap.watch import CompileWatcher

    return CompileWatcher.current()


def _lora_layout(model: torch.nn.Module) -> dict[str, tuple[Any, ...]]:
    return {
        name: (tuple(t.shape), t.dtype, t.data_ptr())
        for name, t in model.named_parameters()
        if ".lora_" in name
    }


def _first_tensor(out: Any) -> torch.Tensor:
    """A denoiser's output tensor, whether returned bare, in a tuple or in a diffusers output."""
    return out if isinstance(out, torch.Tensor) else out[0]
