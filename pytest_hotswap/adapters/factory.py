"""LoRA factory: seeded random adapters for a given model or pipeline, written as ``.safetensors``.

PEFT makes the tensors (``inject_adapter_in_model`` with ``init_lora_weights=False``) and diffusers
writes the file (``save_lora_weights`` with the adapter metadata), so a file from here loads with a
plain ``pipe.load_lora_weights(path)`` at the intended rank and alpha. The LoRA layers are injected
into a shape-only copy of the targeted layers, not into the model: the model is never touched, may
already hold adapters, may be compiled or quantized, and a large one is not duplicated in memory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pytest_hotswap.adapters.header import DENOISERS_KEY
from pytest_hotswap.reference.components import (
    denoiser_prefix,
    find_denoiser,
    lora_loader,
    unwrap_compiled,
)

FORMATS = ("diffusers", "kohya", "peft")
#: Text-encoder layers an adapter targets with ``text_encoder=True``: the attention projections
#: that diffusers' training scripts adapt.
#: CLIP's ``self_attn.q_proj`` ..., T5's ``SelfAttention.q`` ... (Chroma's text encoder is a T5).
_TEXT_ENCODER_TARGET = re.compile(
    r".*\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|SelfAttention\.(q|k|v|o))"
)


def lora_targets(target: Any) -> list[str]:
    """Names of the modules a LoRA may target in ``target``'s denoiser, in module order.

    Those are the ``nn.Linear`` and ``nn.Conv2d`` layers (quantized ones included). Where PEFT already
    injected LoRA layers, the adapted layer counts under its own name, not its ``base_layer``.
    """
    return _linear_and_conv_names(_denoiser(_resolve(target, text_encoder=False)))


def make_lora(
    target: Any,
    path: str | Path,
    rank: int = 8,
    alpha: float | None = None,
    targets: str | Sequence[str] = "all",
    text_encoder: bool = False,
    fmt: str = "diffusers",
    seed: int = 0,
    *,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_dora: bool = False,
    denoisers: Sequence[str] | None = None,
) -> Path:
    """Write a random LoRA adapter for ``target`` and return the file's path.

    Args:
        target: a diffusers pipeline, a denoiser model, or a registered pipeline name ("sd", "flux").
        path: a ``.safetensors`` file to write, or a directory to write a descriptively named file in.
        rank: LoRA rank ``r`` (>= 1).
        alpha: ``lora_alpha``; ``None`` means ``rank`` (scaling 1).
        targets: "all" (every Linear and Conv2d of the denoiser), "half" (every second of them, in
            module order), or a list of module names from :func:`lora_targets`.
        text_encoder: also adapt the attention projections of the pipeline's ``text_encoder``.
        fmt: "diffusers" (``unet.`` / ``transformer.`` keys and adapter metadata), "kohya"
            (``lora_unet_...`` keys with ``.alpha`` tensors, UNet pipelines only) or "peft"
            (PEFT's own ``base_model.model.`` keys, as ``PeftModel.save_pretrained`` writes them).
        seed: the same seed, arguments and model shapes give bit-identical files.
        rank_pattern / alpha_pattern: PEFT's per-layer overrides of ``rank`` / ``alpha``, keyed
            by denoiser module name (a rank per layer, as trainers write them; kohya files get
            one ``.alpha`` per layer). The text encoder's LoRA, if any, is uniform.
        use_dora: a DoRA adapter on the denoiser (PEFT's ``use_dora=True``), which hotswapping
            cannot take.
        denoisers: the pipeline's denoisers the adapter is for (``["transformer_2"]``: Wan 2.2's
            low-noise expert only), written into the file's metadata (``hotswap_denoisers``);
            the keys are those the pipeline's loader reads for them (Wan: ``transformer.``,
            loaded with ``load_into_transformer_2=True``). ``None``: every denoiser the loader
            reaches with the first one's keys.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be > 0 (or None for alpha = rank), got {alpha!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    alpha = rank if alpha is None else alpha

    resolved = _resolve(target, text_encoder=text_encoder or denoisers is not None)
    denoiser_name = denoiser_prefix(resolved)
    if fmt == "kohya" and denoiser_name != "unet":
        raise ValueError(
            "fmt='kohya' is only written for UNet models (Stable Diffusion): diffusers reads kohya "
            "transformer LoRAs only in the original (non-diffusers) layer names; use fmt='diffusers'"
        )
    denoiser = _denoiser(resolved)
    if denoisers is not None:
        denoiser_name, denoiser = _named_denoiser(resolved, denoisers, fmt)
    chosen = select_targets(denoiser, targets)

    layers: dict[str, dict[str, torch.Tensor]] = {}
    metadata: dict[str, dict[str, Any]] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers[denoiser_name], metadata[denoiser_name] = _random_lora(
            denoiser, chosen, rank, alpha, rank_pattern, alpha_pattern, use_dora
        )
        if text_encoder:
            encoder = _text_encoder(resolved)
            te_targets = [
                n for n in _linear_and_conv_names(encoder) if _TEXT_ENCODER_TARGET.fullmatch(n)
            ]
            layers["text_encoder"], metadata["text_encoder"] = _random_lora(
                encoder, te_targets, rank, alpha
            )

    label = targets if isinstance(targets, str) else f"{len(chosen)}targets"
    te = "_te" if text_encoder else ""
    te += "".join(f"_for-{name}" for name in denoisers or ())
    # Whatever the short name leaves out (which layers of a list, patterns) goes into a digest,
    # so two different adapters written into one directory never share a file.
    dora = "_dora" if use_dora else ""
    left_out = (
        None if isinstance(targets, str) else chosen,
        sorted((rank_pattern or {}).items()),
        sorted((alpha_pattern or {}).items()),
    )
    digest = (
        "_" + hashlib.sha1(repr(left_out).encode()).hexdigest()[:8]
        if left_out != (None, [], [])
        else ""
    )
    default_name = (
        f"lora_{denoiser_name}_r{rank}_a{alpha:g}_{label}{te}{dora}_{fmt}_s{seed}{digest}"
    )
    default_name += ".safetensors"
    file = _output_file(Path(path), default_name)
    if fmt == "kohya":
        _write_kohya(file, layers, metadata)
    elif fmt == "peft":
        _write_peft(file, layers, metadata)
    else:
        _write_diffusers(file, resolved, layers, metadata)
    if denoisers is not None:
        _add_metadata(file, {DENOISERS_KEY: json.dumps(list(denoisers))})
    return file


def _named_denoiser(pipe: Any, names: Sequence[str], fmt: str) -> tuple[str, torch.nn.Module]:
    """``(key prefix, module)`` for an adapter for the pipeline's denoisers ``names``: the prefix
    their loader reads (one for all), the first one's module for the targets."""
    from pytest_hotswap.pipelines.families_driver import denoisers, lora_route

    if isinstance(pipe, torch.nn.Module):
        raise ValueError("denoisers= needs a pipeline (or a pipeline name), not a bare model")
    if fmt != "diffusers":
        raise ValueError(f"denoisers= is written in fmt='diffusers' only, not fmt={fmt!r}")
    found = denoisers(pipe)
    unknown = [name for name in names if name not in found]
    if not names or unknown:
        raise ValueError(
            f"denoisers={list(names)!r}: name one or more of {type(pipe).__name__}'s "
            f"LoRA-loadable denoisers ({', '.join(found)})"
        )
    prefixes = {lora_route(pipe, name).prefix for name in names}
    if len(prefixes) > 1:
        raise ValueError(
            f"denoisers={list(names)!r}: its loader reads them from different key prefixes "
            f"({', '.join(sorted(prefixes))}); write one adapter per denoiser"
        )
    return prefixes.pop(), unwrap_compiled(found[names[0]])


def _add_metadata(file: Path, extra: dict[str, str]) -> None:
    """Write ``extra`` into the safetensors metadata of ``file``, tensors unchanged."""
    import safetensors.torch
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    safetensors.torch.save_file(tensors, str(file), metadata={**metadata, **extra})


def select_targets(model: torch.nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Resolve ``targets`` ("all", "half" or a list of names) to module names of ``model``."""
    available = _linear_and_conv_names(model)
    if targets == "all":
        return available
    if targets == "half":
        return available[::2]
    if isinstance(targets, str):
        raise ValueError(
            f"targets must be 'all', 'half' or a list of module names, got {targets!r}"
        )
    chosen = list(targets)
    if not chosen:
        raise ValueError("targets is empty: name at least one module from lora_targets(model)")
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(
            f"unknown LoRA targets {unknown}: not Linear/Conv2d modules of "
            f"{type(model).__name__}; choose from lora_targets(model), e.g. {available[:3]}"
        )
    return [name for name in available if name in set(chosen)]


def _resolve(target: Any, *, text_encoder: bool) -> Any:
    """Turn a registered pipeline name into a built pipeline (``text_encoder=True``) or its
    denoiser, on cpu in float32; pass anything else through."""
    if not isinstance(target, str):
        return target
    from pytest_hotswap.options import HotswapOptions
    from pytest_hotswap.pipelines.registry import REGISTRY

    entry = REGISTRY.get(target)
    if entry is None:
        raise ValueError(
            f"unknown pipeline name {target!r}: use one of {', '.join(REGISTRY)}, "
            "or pass a pipeline or model object"
        )
    spec = entry.build(HotswapOptions(device="cpu", dtype="float32"), 0)
    if text_encoder and spec.pipe is not None:
        return spec.pipe
    return spec.denoiser


def _denoiser(resolved: Any) -> torch.nn.Module:
    return unwrap_compiled(find_denoiser(resolved)[1])


def _loads_text_encoder(resolved: Any) -> bool:
    """Whether ``resolved`` is a pipeline whose LoRA loader loads into its ``text_encoder``
    (Wan's, QwenImage's and Z-Image's load into their transformers only)."""
    if isinstance(resolved, torch.nn.Module):
        return False
    declared = getattr(type(resolved), "_lora_loadable_modules", None)
    return declared is None or "text_encoder" in declared


def _text_encoder(resolved: Any) -> torch.nn.Module:
    if not isinstance(resolved, torch.nn.Module) and not _loads_text_encoder(resolved):
        raise ValueError(
            f"text_encoder=True: {type(resolved).__name__}'s LoRA loader loads no text encoder "
            f"(it loads {', '.join(type(resolved)._lora_loadable_modules)}); drop text_encoder=True"
        )
    encoder = (
        None if isinstance(resolved, torch.nn.Module) else getattr(resolved, "text_encoder", None)
    )
    if not isinstance(encoder, torch.nn.Module):
        raise ValueError(
            "text_encoder=True needs a pipeline with a text_encoder component (or a pipeline name); "
            f"got {type(resolved).__name__}"
        )
    return encoder


def _linear_and_conv_names(model: torch.nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: list[str] = []
    inside_tuner: str | None = None
    for name, module in model.named_modules():
        if inside_tuner is not None and name.startswith(inside_tuner):
            continue  # base_layer, lora_A, lora_B ... of an already adapted layer
        if isinstance(module, BaseTunerLayer):
            inside_tuner = f"{name}."
            names.append(name)
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            names.append(name)
    return names


def _shape_only_layer(layer: torch.nn.Module) -> torch.nn.Module:
    """A plain Linear / Conv2d with ``layer``'s geometry whose weight takes no memory."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
    with torch.device("meta"):
        if isinstance(base, torch.nn.Conv2d):
            copy: torch.nn.Module = torch.nn.Conv2d(
                base.in_channels,
                base.out_channels,
                base.kernel_size,
                base.stride,
                base.padding,
                base.dilation,
                base.groups,
                bias=False,
            )
        else:
            copy = torch.nn.Linear(base.in_features, base.out_features, bias=False)
    # PEFT reads the base weight's device and dtype: a broadcast zero gives both, shape included.
    copy.weight = torch.nn.Parameter(torch.zeros(()).expand(copy.weight.shape), requires_grad=False)
    return copy


def _random_lora(
    model: torch.nn.Module,
    names: list[str],
    rank: int,
    alpha: float,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_dora: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT LoRA tensors (keys without adapter name) and the LoraConfig dict for ``names``."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    skeleton = torch.nn.Module()
    for name in names:
        parent = skeleton
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, _shape_only_layer(model.get_submodule(name)))
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        # An anchored regex: a name list would also match every module whose name ends in one.
        target_modules="|".join(f"(?:{re.escape(name)})" for name in names),
        init_lora_weights=False,
        # Full module names, as trainers write them (PEFT matches a key as a name suffix).
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        use_dora=use_dora,
    )
    inject_adapter_in_model(config, skeleton)
    tensors = get_peft_model_state_dict(skeleton)
    return {k: v.contiguous() for k, v in tensors.items()}, config.to_dict()


def _output_file(path: Path, default_name: str) -> Path:
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    if path.suffix and not path.is_dir():
        raise ValueError(
            f"path must be a directory or a .safetensors file, got {str(path)!r}; "
            "adapters are written as safetensors only"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path / default_name


def _write_diffusers(
    file: Path,
    resolved: Any,
    layers: dict[str, dict[str, torch.Tensor]],
    metadata: dict[str, dict[str, Any]],
) -> None:
    loader = lora_loader(resolved)
    kwargs: dict[str, Any] = {}
    for component, tensors in layers.items():
        kwargs[f"{component}_lora_layers"] = tensors
        kwargs[f"{component}_lora_adapter_metadata"] = metadata[component]
    loader.save_lora_weights(str(file.parent), weight_name=file.name, **kwargs)


def _write_kohya(
    file: Path,
    layers: dict[str, dict[str, torch.Tensor]],
    metadata: dict[str, dict[str, Any]],
) -> None:
    """Convert with diffusers' own converter; it writes alpha = rank, so set the real alpha."""
    import safetensors.torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft.utils.other import get_pattern_key

    prefixed = {
        f"{component}.{key}": tensor
        for component, tensors in layers.items()
        for key, tensor in tensors.items()
    }
    kohya = convert_state_dict_to_kohya(prefixed)
    # The converter writes alpha = rank; each layer's alpha is the config's, as PEFT resolves it.
    for component, tensors in layers.items():
        config = metadata[component]
        for key in tensors:
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removesuffix(".lora_A.weight")
            pattern = get_pattern_key(list(config["alpha_pattern"]), module)
            alpha = config["alpha_pattern"].get(pattern, config["lora_alpha"])
            one = convert_state_dict_to_kohya({f"{component}.{key}": tensors[key]})
            (alpha_key,) = (k for k in one if k.endswith(".alpha"))
            kohya[alpha_key] = torch.tensor(float(alpha))
    _check_kohya_round_trip(kohya, prefixed)
    safetensors.torch.save_file(kohya, str(file), metadata={"format": "pt"})


def _check_kohya_round_trip(
    kohya: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    """Refuse targets whose kohya names diffusers' loader maps back to a different layer."""
    lost = _kohya_lost(kohya, expected)
    if lost:
        raise ValueError(
            f"kohya names of {len(lost)} targets do not load back onto the same layers in diffusers "
            f"(e.g. {lost[:3]}); pass targets= without them, or use fmt='diffusers'"
        )


def kohya_loadable(names: Sequence[str]) -> list[str]:
    """The UNet layers of ``names`` whose kohya names diffusers' loader maps back to them
    (SDXL's ``add_embedding.linear_1`` does not: its kohya name reads back as another layer)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    probe = {f"unet.{name}.lora_{ab}.weight": torch.zeros(1, 1) for name in names for ab in "AB"}
    lost = set(_kohya_lost(convert_state_dict_to_kohya(probe), probe))
    return [name for name in names if f"unet.{name}" not in lost]


def _kohya_lost(kohya: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """The layers of ``expected`` that loading ``kohya`` through diffusers does not reach."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import (
        convert_all_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    state_dict, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(kohya))
    # The same conversions load_lora_weights applies: one for the UNet, one for the text encoder.
    unet = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
    text_encoder = {k: v for k, v in state_dict.items() if not k.startswith("unet.")}
    loaded = set(convert_unet_state_dict_to_peft(unet))
    if text_encoder:
        loaded |= set(convert_all_state_dict_to_peft(text_encoder))
    return sorted(
        key.rsplit(".lora_", 1)[0]
        for key in expected
        if key.endswith("lora_A.weight") and key not in loaded
    )


def _write_peft(
    file: Path, layers: dict[str, dict[str, torch.Tensor]], metadata: dict[str, dict[str, Any]]
) -> None:
    """PEFT's own layout: ``base_model.model.<module>`` keys, the config in the metadata."""
    import json

    import safetensors.torch

    if len(layers) != 1:
        raise ValueError("fmt='peft' writes one model's adapter: drop text_encoder=True")
    tensors, config = next(iter(layers.values())), next(iter(metadata.values()))
    prefixed = {f"base_model.model.{key}": tensor for key, tensor in tensors.items()}
    safetensors.torch.save_file(
        prefixed,
        str(file),
        metadata={
            "format": "pt",
            "lora_adapter_metadata": json.dumps(config, default=_json_default),
        },
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)
