"""The recipe that makes any pipeline hotswap-ready and compiled, one function per step.

``build_hotswap_pipeline`` runs them in order::

    implementation.before_load(spec, preparation)     # diffusers: pad before the first load
    implementation.load_first(spec, first_lora)       # plain load, adapter "default"
    implementation.after_load(spec, preparation)      # reference / PEFT: pad after the load
    quantize_denoiser(spec.denoiser, quantize)        # optional torchao weight quantization
    compile_denoiser(spec.denoiser, backend, mode)    # in place, isolate_recompiles=True
    warm_up(pipeline)                                  # the exact call used later
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from pytest_hotswap.adapterfile import check_adapter_path, parse_metadata
from pytest_hotswap.implementations import ADAPTER_NAME, Implementation, Preparation
from pytest_hotswap.options import QUANTIZE
from pytest_hotswap.pipelines.registry import PipelineSpec
from pytest_hotswap.pipelines.saved import DENOISER_NAMES

if TYPE_CHECKING:
    import os

    from peft import LoraConfig

    from pytest_hotswap.options import HotswapOptions
    from pytest_hotswap.pipelines.ready import HotswapPipeline

LoraSource = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]
"""A LoRA adapter: a path to a ``.safetensors`` file or a state dict."""


def build_hotswap_pipeline(
    spec: PipelineSpec,
    implementation: Implementation | str,
    first_lora: LoraSource,
    options: HotswapOptions,
    *,
    targets: tuple[str, ...] | None = None,
    text_encoder: bool = False,
    slots: int = 1,
) -> HotswapPipeline:
    """Make ``spec`` hotswap-ready: prepare, load ``first_lora``, quantize, compile, warm up."""
    from pytest_hotswap import implementations
    from pytest_hotswap.pipelines.ready import HotswapPipeline

    if isinstance(implementation, str):
        implementation = implementations.get(implementation)
    options = options.resolved()
    preparation = Preparation(options.max_rank, targets, text_encoder, slots)
    implementation.check(preparation)
    check_quantization(options.quantize, options.device)  # before the spec is changed
    implementation.before_load(spec, preparation)
    implementation.load_first(spec, first_lora)
    implementation.after_load(spec, preparation)
    if slots > 1:
        implementation.load_slots(spec, first_lora, preparation)
    quantize_denoiser(spec.denoiser, options.quantize)
    compile_denoiser(spec.denoiser, options.backend, options.mode, fullgraph=spec.fullgraph)
    if text_encoder:
        for encoder in spec.text_encoders().values():
            compile_denoiser(encoder, options.backend, options.mode, fullgraph=False)
    pipeline = HotswapPipeline(spec, implementation, options, first_lora, preparation)
    if slots > 1:
        pipeline.reset_strengths()
    pipeline.warm_up()
    return pipeline


def load_first_adapter(spec: PipelineSpec, lora: LoraSource) -> None:
    """A plain (non-hotswap) load of ``lora`` as adapter ``"default"``."""
    if spec.has_lora_loader:
        with quiet_diffusers():
            spec.pipe.load_lora_weights(loadable(lora), adapter_name=ADAPTER_NAME)
        return
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state_dict, config = read_peft_adapter(lora, spec)
    inject_adapter_in_model(config, spec.denoiser, adapter_name=ADAPTER_NAME, state_dict=state_dict)
    result = set_peft_model_state_dict(spec.denoiser, state_dict, ADAPTER_NAME)
    unexpected = [key for key in result.unexpected_keys if ".lora_" in key]
    if unexpected:
        raise ValueError(
            f"adapter keys match no LoRA layer of {type(spec.denoiser).__name__}: "
            f"{', '.join(unexpected[:5])}; write the adapter for this model (PEFT key format)"
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


# --- Adapters ------------------------------------------------------------------------------


def read_peft_adapter(
    lora: LoraSource, spec: PipelineSpec | None = None
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The state dict (PEFT keys, no adapter name) and ``LoraConfig`` of an adapter.

    For a diffusers pipeline, diffusers' own converters read it (any format ``load_lora_weights``
    reads). For a bare model, a ``transformer.`` / ``unet.`` key prefix is dropped and the config
    is the file's diffusers metadata, else inferred from the shapes by diffusers' rule.
    """
    if spec is not None and spec.pipe is not None:
        from pytest_hotswap.reference.components import denoiser_prefix, lora_loader
        from pytest_hotswap.reference.formats import read_adapter

        adapter = read_adapter(loadable(lora), lora_loader(spec.pipe), denoiser_prefix(spec.pipe))
        return adapter.tensors, adapter.config
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig

    metadata: dict[str, Any] = {}
    if isinstance(lora, Mapping):
        state_dict = dict(lora)
    else:
        from safetensors import safe_open

        path = check_adapter_path(lora)
        with safe_open(str(path), framework="pt") as f:
            metadata = parse_metadata(str(path), f.metadata() or {}) or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
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
    for name in DENOISER_NAMES:
        if state_dict and all(key.startswith(f"{name}.") for key in state_dict):
            return f"{name}."
    return ""


def adapter_rank(lora: LoraSource) -> int:
    """The largest LoRA rank in an adapter (reads only the header of a file)."""
    if isinstance(lora, Mapping):
        down = ("lora_A", "lora_down")
        shapes = [t.shape for key, t in lora.items() if any(d in key for d in down) and t.ndim]
        return max((shape[0] for shape in shapes), default=0)
    from pytest_hotswap.adapterfile import read_header

    return read_header(lora).rank


def describe_adapter(lora: LoraSource) -> str:
    """``style_b (rank 32)``: the file's stem (or "state dict") and its largest rank."""
    name = "state dict" if isinstance(lora, Mapping) else Path(lora).stem
    try:
        rank: int | str = adapter_rank(lora)
    except ValueError:  # unreadable: the swap itself says why
        rank = "?"
    return f"{name} (rank {rank})"


def loadable(lora: LoraSource) -> str | dict[str, torch.Tensor]:
    """What diffusers' loaders take: a path string, or a copy of a state dict (they pop keys)."""
    return dict(lora) if isinstance(lora, Mapping) else str(check_adapter_path(lora))


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warnings (every SD load logs 'No LoRA keys associated to
    CLIPTextModel') and the progress bars diffusers and transformers show while loading."""
    from diffusers.utils import logging
    from transformers.utils import logging as transformers_logging

    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars[0]:
            logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()
