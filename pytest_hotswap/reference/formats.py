"""Reading an adapter: a ``.safetensors`` file or a state dict, in any format diffusers reads.

Conversion is diffusers' own (``lora_state_dict`` of the pipeline's loader, then the same steps
``load_lora_adapter`` and ``load_lora_into_text_encoder`` take), so the reference sees exactly the
tensors and the ``LoraConfig`` a plain ``load_lora_weights`` would build. Everything diffusers or
PEFT would trip over with an internal error (metadata of the wrong type, invalid pattern regexes,
alpha tensors of several values, sparse / meta / nested tensors, a layer named twice) is refused
here first with an :class:`InvalidAdapterError` naming the key or field. Nothing here touches a
model. Reading and checking the tensors: :mod:`~pytest_hotswap.reference.tensors`; the
``LoraConfig``: :mod:`~pytest_hotswap.reference.configs`; here: the conversion and the keys.
"""

from __future__ import annotations

import operator
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import torch

from pytest_hotswap.adapters.header import (
    TEXT_ENCODER_KEY,
)
from pytest_hotswap.reference.configs import CONFIG_CACHE_SIZE, lora_configs
from pytest_hotswap.reference.errors import InvalidAdapterError, TextEncoderLoraError
from pytest_hotswap.reference.tensors import (
    KIND,
    SHAPE,
    check_alpha_tensors,
    check_tensors,
    checked_network_alphas,
    read_source,
    unpack,
)

#: Text-encoder modules whose LoRA rank diffusers reads (``_load_lora_into_text_encoder``).
_TEXT_ENCODER_RANKED = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
#: Raw key sets diffusers only renamed, with the keys it renamed them to (see read_adapter).
_KEY_PLANS: OrderedDict[Any, tuple[str, ...]] = OrderedDict()


@dataclass(frozen=True)
class TextEncoderSpec:
    """A prepared text encoder, as the reader needs to convert its keys the way diffusers does."""

    name: str  # the pipeline attribute and key prefix: "text_encoder", "text_encoder_2" ...
    layers: tuple[str, ...]  # the modules diffusers reads a rank for, in module order
    has_text_model: bool  # False for transformers' flattened CLIPTextModel

    @property
    def peft_only(self) -> bool:
        """No module diffusers reads a rank for (T5): diffusers' text-encoder loader cannot read
        PEFT keys for this encoder (its key tables know only CLIP's names), so its LoRA was put
        on with PEFT (``add_adapter`` / ``load_adapter``) and its keys are PEFT's own
        (``<module>.lora_A.weight``), taken as they are, every layer's rank read."""
        return not self.layers


def text_encoder_spec(name: str, module: torch.nn.Module) -> TextEncoderSpec:
    """What the reader needs of the text encoder ``module`` (eager) named ``name``."""
    layers = tuple(n for n, _ in module.named_modules() if n.endswith(_TEXT_ENCODER_RANKED))
    return TextEncoderSpec(name, layers, hasattr(module, "text_model"))


@dataclass(frozen=True)
class Adapter:
    """An adapter in the index's key naming, with a ``LoraConfig`` per component.

    Denoiser keys are PEFT keys without a prefix (``<module>.lora_A.weight``); text-encoder keys
    keep their component: ``text_encoder.<module>.lora_A.weight``. ``configs`` is keyed by
    component (``""`` for the denoiser). ``keys`` and ``shapes`` are the layout a swap plan is
    cached under.
    """

    tensors: dict[str, torch.Tensor]
    configs: dict[str, Any]
    keys: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    #: Every ``(dtype, device)`` among the tensors (possibly a few more: popped alpha tensors).
    kinds: frozenset[tuple[torch.dtype, torch.device]] = frozenset()

    @property
    def config(self) -> Any:
        """The denoiser's ``LoraConfig`` (``None`` when the adapter has no denoiser keys)."""
        return self.configs.get("")


def read_adapter(
    lora: str | os.PathLike[str] | Mapping[str, Any],
    loader: Any,
    prefix: str,
    text_encoders: Sequence[TextEncoderSpec] = (),
) -> Adapter:
    """Read ``lora`` for a denoiser whose keys diffusers prefixes with ``prefix``.

    ``text_encoders`` are the text encoders prepared for hotswapping; without any, text-encoder
    keys in any naming raise ``TextEncoderLoraError`` before anything is converted. Anything
    unreadable or malformed raises ``InvalidAdapterError``.
    """
    state, metadata = read_source(lora)
    kinds = check_tensors(state)
    plan_key = (loader, prefix, tuple(spec.name for spec in text_encoders), tuple(state))
    known = _KEY_PLANS.get(plan_key)
    if known is not None:
        # These very keys went through diffusers before and came out renamed only (same tensors,
        # nothing converted or popped, no alpha or text-encoder keys): diffusers decides formats
        # from keys alone, so the same renaming applies without calling it again.
        _KEY_PLANS.move_to_end(plan_key)
        tensors = dict(zip(known, state.values(), strict=True))
        part_tensors = {"": tensors}
        state_dict, alphas = state, None
    else:
        state_dict, alphas, part_tensors, tensors = _convert(state, loader, prefix, text_encoders)
        if (
            state_dict is state
            and len(tensors) == len(plan_key[3])
            and set(part_tensors) == {""}
            and not any(map(str.endswith, state, repeat(".alpha")))
            and all(map(operator.is_, tensors.values(), state.values()))
        ):
            _KEY_PLANS[plan_key] = tuple(tensors)
            while len(_KEY_PLANS) > CONFIG_CACHE_SIZE:
                _KEY_PLANS.popitem(last=False)

    keys = known if known is not None else tuple(tensors)
    shapes = tuple(map(SHAPE, tensors.values()))
    configs = lora_configs(part_tensors, alphas, metadata, prefix, text_encoders, keys, shapes)
    if state_dict is not state:  # diffusers converted: the values may be new tensors
        kinds = set(map(KIND, tensors.values()))
    return Adapter(
        tensors=tensors,
        configs=configs,
        keys=keys,
        shapes=shapes,
        kinds=frozenset((kind[3], kind[4]) for kind in kinds),
    )


def _convert(
    state: dict[str, torch.Tensor],
    loader: Any,
    prefix: str,
    text_encoders: Sequence[TextEncoderSpec],
) -> tuple[
    dict[str, torch.Tensor],
    dict[str, float] | None,
    dict[str, dict[str, torch.Tensor]],
    dict[str, torch.Tensor],
]:
    """diffusers' conversion of a checked state dict, split per component in PEFT keys: returns
    diffusers' state dict, the alphas, the tensors per component and all of them qualified."""
    check_alpha_tensors(state)
    if not text_encoders:
        _refuse_text_encoder_keys(list(state))
    try:
        # diffusers' converters raise many exception types for malformed input; all of them mean
        # "diffusers cannot read this adapter".
        loaded = loader.lora_state_dict(
            state, use_safetensors=True, return_alphas=True, return_lora_metadata=True
        )
    except Exception as error:
        raise InvalidAdapterError(f"diffusers could not read the adapter: {error}") from error
    state_dict, network_alphas = unpack(loaded)
    alphas = checked_network_alphas(network_alphas)
    if not text_encoders and state_dict is not state:  # converted: new keys to check
        _refuse_text_encoder_keys(list(state_dict))

    parts = _split(state_dict, text_encoders)
    tensors: dict[str, torch.Tensor] = {}
    part_tensors: dict[str, dict[str, torch.Tensor]] = {}
    denoiser = parts.pop("", {})
    if denoiser:
        part_tensors[""] = _denoiser_keys(denoiser, prefix)
        tensors.update(part_tensors[""])
    for spec in text_encoders:
        if spec.name in parts:
            part_tensors[spec.name] = _text_encoder_keys(parts[spec.name], spec)
            tensors.update({f"{spec.name}.{k}": v for k, v in part_tensors[spec.name].items()})
    if not tensors:
        raise InvalidAdapterError(
            "the adapter has no LoRA tensors for any prepared component"
            + ("" if text_encoders else " (the denoiser)")
        )
    return state_dict, alphas, part_tensors, tensors


def adapter_layers(adapter: Adapter) -> dict[str, int]:
    """The qualified module names the adapter targets, with the rank of each (from ``lora_A``)."""
    layers: dict[str, int] = {}
    for key, tensor in adapter.tensors.items():
        layer, _, part = key.rpartition(".lora_")
        if part == "A.weight":
            layers[layer] = tensor.shape[0] if tensor.ndim else 0
        elif part == "B.weight":
            layers.setdefault(layer, tensor.shape[1] if tensor.ndim > 1 else 0)
    return layers


def _refuse_text_encoder_keys(keys: list[str]) -> None:
    # Every text-encoder naming starts with "te" or "lora_te": a C-level prefix test of all keys
    # first, the regex only when one might match.
    if not any(map(str.startswith, keys, repeat(("te", "lora_te")))):
        return
    text_encoder = [k for k in keys if TEXT_ENCODER_KEY.match(k)]
    if text_encoder:
        raise TextEncoderLoraError(
            f"the adapter has {len(text_encoder)} text-encoder keys (e.g. {text_encoder[:3]}); only the "
            "denoiser is hotswapped: strip the text-encoder keys, load this adapter without hotswap, "
            "or prepare the pipeline with prepare_for_hotswap(pipe, ..., text_encoder=True) after "
            "loading a first adapter with text-encoder keys"
        )


# -- keys: which component, and PEFT naming ------------------------------------------------------


def _split(
    state_dict: dict[str, torch.Tensor], text_encoders: Sequence[TextEncoderSpec]
) -> dict[str, dict[str, torch.Tensor]]:
    """The converted keys per component: ``""`` (denoiser) or a text encoder's name."""
    if not text_encoders:
        return {"": state_dict}
    heads = {f"{spec.name}.": spec.name for spec in text_encoders}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        head = key.partition(".")[0] + "."
        if head in heads:
            parts.setdefault(heads[head], {})[key[len(head) :]] = tensor
        elif text_encoders and TEXT_ENCODER_KEY.match(key):
            unknown.append(key)
        else:
            parts.setdefault("", {})[key] = tensor
    if unknown:
        prepared = ", ".join(spec.name for spec in text_encoders)
        raise TextEncoderLoraError(
            f"the adapter has {len(unknown)} keys for a text encoder that was not prepared for "
            f"hotswapping (e.g. {unknown[:3]}); prepared text encoders: {prepared}. Load a first "
            "adapter with keys for that text encoder before prepare_for_hotswap(..., "
            "text_encoder=True), or strip those keys"
        )
    return parts


def _strip(state: Mapping[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """``state`` with ``head`` removed from its keys; a key then named twice is ambiguous."""
    size = len(head)
    if all(map(str.startswith, state, repeat(head))):  # the common case, all C-level
        return dict(
            zip(map(operator.itemgetter(slice(size, None)), state), state.values(), strict=True)
        )
    stripped = {(k[size:] if k.startswith(head) else k): v for k, v in state.items()}
    if len(stripped) == len(state):
        return stripped
    source: dict[str, str] = {}
    for key in state:
        new = key[size:] if key.startswith(head) else key
        if new in source:
            raise InvalidAdapterError(
                f"the adapter names the same tensor twice: {source[new]!r} and {key!r} both mean "
                f"{new!r} (prefixed and unprefixed keys for one layer); keep one of them"
            )
        source[new] = key
    raise AssertionError("unreachable: a shorter dict has a duplicate key")


def _denoiser_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Strip ``prefix.`` as ``load_lora_adapter`` does and convert to PEFT keys. A file without
    any prefixed key is taken as is; keys of other components stay, to be reported as unexpected
    targets."""
    head = f"{prefix}."
    if any(map(str.startswith, state, repeat(head))):
        state = _strip(state, head)
    return _peft_keys(state)


def _text_encoder_keys(
    state: dict[str, torch.Tensor], spec: TextEncoderSpec
) -> dict[str, torch.Tensor]:
    """The conversions of diffusers' ``_load_lora_into_text_encoder``; PEFT keys as they are for
    an encoder diffusers loads no LoRA into (its conversion knows only CLIP's module names)."""
    if spec.peft_only:
        odd = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
        if odd:
            raise InvalidAdapterError(
                f"{spec.name}.{odd[0]}: diffusers loads no LoRA into {spec.name}, so its keys "
                "must be PEFT keys ('<module>.lora_A.weight' / '.lora_B.weight', as "
                f"get_peft_model_state_dict writes them); {len(odd)} key(s) are not"
            )
        return state
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
    )

    try:
        converted = convert_state_dict_to_peft(convert_state_dict_to_diffusers(dict(state)))
    except Exception as error:
        raise InvalidAdapterError(
            f"diffusers could not convert the {spec.name} keys: {error}"
        ) from error
    if len(converted) != len(state):
        raise InvalidAdapterError(
            f"the adapter's {spec.name} keys name some tensors twice in different formats "
            f"({len(state)} keys, {len(converted)} after conversion); keep one format"
        )
    if not spec.has_text_model:
        # transformers' CLIPTextModel is flattened; older files still say "text_model.".
        converted = _strip(converted, "text_model.")
    return converted


def _peft_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if not state_dict:
        return state_dict
    if "lora_A" not in next(iter(state_dict)):
        converted = convert_unet_state_dict_to_peft(state_dict)
        if len(converted) != len(state_dict):
            raise InvalidAdapterError(
                "the adapter names some tensors twice in different formats "
                f"({len(state_dict)} keys, {len(converted)} after conversion to PEFT keys); "
                "keep one format"
            )
        return converted
    return state_dict
