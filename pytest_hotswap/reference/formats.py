"""Reading an adapter: a ``.safetensors`` file or a state dict, in any format diffusers reads.

Conversion is diffusers' own (``lora_state_dict`` of the pipeline's loader, then the same steps
``load_lora_adapter`` and ``load_lora_into_text_encoder`` take), so the reference sees exactly the
tensors and the ``LoraConfig`` a plain ``load_lora_weights`` would build. Everything diffusers or
PEFT would trip over with an internal error (metadata of the wrong type, invalid pattern regexes,
alpha tensors of several values, sparse / meta / nested tensors, a layer named twice) is refused
here first with an :class:`InvalidAdapterError` naming the key or field. Nothing here touches a
model.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import torch

from pytest_hotswap.adapters.header import (
    METADATA_KEY,
    TEXT_ENCODER_KEY,
    AdapterFileError,
    check_adapter_path,
    parse_metadata,
)
from pytest_hotswap.reference.errors import InvalidAdapterError, TextEncoderLoraError

#: Text-encoder modules whose LoRA rank diffusers reads (``_load_lora_into_text_encoder``).
_TEXT_ENCODER_RANKED = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
_CONFIG_CACHE_SIZE = 32


@dataclass(frozen=True)
class TextEncoderSpec:
    """A prepared text encoder, as the reader needs to convert its keys the way diffusers does."""

    name: str  # the pipeline attribute and key prefix: "text_encoder", "text_encoder_2" ...
    layers: tuple[str, ...]  # the modules diffusers reads a rank for, in module order
    has_text_model: bool  # False for transformers' flattened CLIPTextModel

    @property
    def peft_only(self) -> bool:
        """No module diffusers reads a rank for (T5): diffusers loads no LoRA into this encoder,
        so its LoRA was put on with PEFT (``add_adapter`` / ``load_adapter``) and its keys are
        PEFT's own (``<module>.lora_A.weight``), taken as they are, every layer's rank read."""
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
    state, metadata = _source(lora)
    kinds = _check_tensors(state)
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
            while len(_KEY_PLANS) > _CONFIG_CACHE_SIZE:
                _KEY_PLANS.popitem(last=False)

    keys = known if known is not None else tuple(tensors)
    shapes = tuple(map(_SHAPE, tensors.values()))
    configs = _configs(part_tensors, alphas, metadata, prefix, text_encoders, keys, shapes)
    if state_dict is not state:  # diffusers converted: the values may be new tensors
        kinds = set(map(_KIND, tensors.values()))
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
    _check_alpha_tensors(state)
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
    state_dict, network_alphas = _unpack(loaded)
    alphas = _checked_network_alphas(network_alphas)
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


# -- the source: a file or a state dict, as a dict of tensors and the file's metadata -----------


def _source(lora: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    if isinstance(lora, Mapping):
        state = dict(lora)
        if not state:
            raise InvalidAdapterError("the LoRA state dict is empty")
        return state, None
    if isinstance(lora, (str, os.PathLike)):
        return _read_file(lora)
    raise InvalidAdapterError(
        f"lora must be a path to a .safetensors file or a state dict, got {type(lora).__name__}"
    )


def _read_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors and the ``lora_adapter_metadata`` config of a safetensors file, read the way
    diffusers reads them (``safetensors.torch.load_file``, the metadata as JSON)."""
    import safetensors
    import safetensors.torch

    try:
        file = check_adapter_path(path)
    except AdapterFileError as error:
        raise InvalidAdapterError(str(error)) from None
    try:
        with safetensors.safe_open(str(file), framework="pt") as handle:
            header = dict(handle.metadata() or {})
        state = safetensors.torch.load_file(str(file), device="cpu")
    except (OSError, safetensors.SafetensorError) as error:
        raise InvalidAdapterError(
            f"{file}: not a readable safetensors file (truncated or corrupt?): {error}"
        ) from None
    if not state:
        raise InvalidAdapterError(f"{file}: the file holds no tensors")
    raw = header.get(METADATA_KEY)
    if not raw:  # diffusers reads an empty value as no metadata
        return state, None
    try:
        return state, parse_metadata(str(file), {METADATA_KEY: raw})
    except AdapterFileError as error:
        if raw.strip() == "null":  # diffusers reads JSON null as no metadata too
            return state, None
        raise InvalidAdapterError(str(error)) from None


_PLAIN_TENSORS = {torch.Tensor, torch.nn.Parameter}
_SHAPE = operator.attrgetter("shape")
_KIND = operator.attrgetter("layout", "is_meta", "is_nested", "dtype", "device")


def _check_tensors(state: dict[Any, Any]) -> set[tuple[Any, ...]]:
    """str keys mapped to dense, materialized tensors; anything else cannot be copied in place.
    Returns the set of ``(layout, is_meta, is_nested, dtype, device)`` of the values.

    The common case costs three C-level passes (key types, value types, kinds), no Python per key.
    """
    values = state.values()
    if set(map(type, state)) != {str} or not (
        set(map(type, values)) <= _PLAIN_TENSORS or all(isinstance(v, torch.Tensor) for v in values)
    ):
        bad = [
            repr(k)
            for k, v in state.items()
            if type(k) is not str or not isinstance(v, torch.Tensor)
        ]
        raise InvalidAdapterError(
            f"a LoRA state dict maps str keys to tensors; bad entries: {', '.join(bad[:5])}"
        )
    kinds = set(map(_KIND, values))
    if all(kind[:3] == (torch.strided, False, False) for kind in kinds):
        return kinds
    odd = [k for k, v in state.items() if _KIND(v)[:3] != (torch.strided, False, False)]
    key = odd[0]
    tensor = state[key]
    kind = (
        "a nested tensor"
        if tensor.is_nested
        else "a meta tensor (no data)"
        if tensor.is_meta
        else f"a {tensor.layout} tensor"
    )
    raise InvalidAdapterError(
        f"{key} is {kind}; LoRA weights must be dense, materialized tensors "
        f"({len(odd)} such key(s)): convert with .to_dense() / load real weights"
    )


def _check_alpha_tensors(state: dict[str, torch.Tensor]) -> None:
    """A per-layer alpha (kohya ``*.alpha``, some Flux files) is one finite number."""
    if not any(map(str.endswith, state, repeat(".alpha"))):
        return
    for key in [k for k in state if k.endswith(".alpha")]:
        tensor = state[key]
        if tensor.numel() != 1:
            raise InvalidAdapterError(
                f"{key} holds {tensor.numel()} values (shape {tuple(tensor.shape)}); a LoRA alpha "
                "is one number per layer: the file is corrupt or not a LoRA adapter"
            )
        if not (tensor.is_floating_point() or tensor.dtype in _INTEGER_DTYPES):
            raise InvalidAdapterError(f"{key} has dtype {tensor.dtype}; a LoRA alpha is a number")
        if not math.isfinite(float(tensor.reshape(()).double())):
            raise InvalidAdapterError(
                f"{key} is {float(tensor.reshape(()).double())}; a LoRA alpha must be finite"
            )


_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


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


def _unpack(loaded: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Loaders differ: (sd, alphas, metadata), (sd, metadata) or sd. The metadata of a dict
    source is ``None``: the file's metadata is read by :func:`_read_file`."""
    if not isinstance(loaded, tuple):
        return loaded, None
    if len(loaded) == 3:
        return loaded[0], loaded[1]
    return loaded[0], None


def _checked_network_alphas(alphas: Mapping[str, Any] | None) -> dict[str, float] | None:
    """diffusers' per-layer alphas (kohya ``.alpha`` keys), as finite Python floats."""
    if not alphas:
        return None
    checked: dict[str, float] = {}
    for key, value in alphas.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise InvalidAdapterError(
                    f"{key} holds {value.numel()} values; a LoRA alpha is one number per layer"
                )
            value = value.reshape(()).item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidAdapterError(f"{key} is {value!r}; a LoRA alpha is a number")
        if not math.isfinite(value):
            raise InvalidAdapterError(f"{key} is {value}; a LoRA alpha must be finite")
        checked[key] = float(value)
    return checked


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


# -- configs -----------------------------------------------------------------------------------

_CONFIG_CACHE: OrderedDict[Any, dict[str, Any]] = OrderedDict()
#: Raw key sets diffusers only renamed, with the keys it renamed them to (see read_adapter).
_KEY_PLANS: OrderedDict[Any, tuple[str, ...]] = OrderedDict()


def _configs(
    parts: dict[str, dict[str, torch.Tensor]],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    prefix: str,
    text_encoders: Sequence[TextEncoderSpec],
    keys: tuple[str, ...],
    shapes: tuple[torch.Size, ...],
) -> dict[str, Any]:
    """A ``LoraConfig`` per component, built as diffusers builds it; cached per layout, alphas
    and metadata (building one costs more than the rest of reading a state dict)."""
    cache_key = (
        prefix,
        tuple(spec.name for spec in text_encoders),
        keys,
        shapes,
        tuple(sorted(alphas.items())) if alphas else None,
        json.dumps(metadata, sort_keys=True, default=repr) if metadata is not None else None,
    )
    cached = _CONFIG_CACHE.get(cache_key)
    if cached is not None:
        _CONFIG_CACHE.move_to_end(cache_key)
        return cached
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidAdapterError(
            f"the adapter's {METADATA_KEY} is a {type(metadata).__name__}, not an object of "
            "LoraConfig fields; write the adapter again with diffusers or PEFT"
        )
    specs = {spec.name: spec for spec in text_encoders}
    configs: dict[str, Any] = {}
    for component, tensors in parts.items():
        if component:
            configs[component] = _text_encoder_config(tensors, alphas, metadata, specs[component])
        else:
            configs[""] = _denoiser_config(tensors, alphas, metadata, prefix)
    _CONFIG_CACHE[cache_key] = configs
    while len(_CONFIG_CACHE) > _CONFIG_CACHE_SIZE:
        _CONFIG_CACHE.popitem(last=False)
    return configs


def _denoiser_config(
    tensors: dict[str, torch.Tensor],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    prefix: str,
) -> Any:
    head = f"{prefix}."
    if metadata is not None and any(k.startswith(head) for k in metadata):
        metadata = {k.removeprefix(head): v for k, v in metadata.items() if k.startswith(head)}
        field_prefix = head
    else:
        field_prefix = ""
    if alphas:
        alphas = {k.removeprefix(head): v for k, v in alphas.items() if k.startswith(head)}
    ranks = {f"^{k}": v.shape[1] for k, v in tensors.items() if "lora_B" in k and v.ndim > 1}
    return _lora_config(ranks, alphas, metadata, tensors, field_prefix, is_unet=True)


def _text_encoder_config(
    tensors: dict[str, torch.Tensor],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    spec: TextEncoderSpec,
) -> Any:
    head = f"{spec.name}."
    if metadata is not None:
        metadata = {k.removeprefix(head): v for k, v in metadata.items() if k.startswith(head)}
    if alphas:
        alphas = {
            k.removeprefix(head): v
            for k, v in alphas.items()
            if k.startswith(spec.name) and k.split(".")[0] == spec.name
        }
    # In module order, as diffusers' walk over text_encoder.named_modules() finds them; every
    # layer of an encoder diffusers loads no LoRA into.
    ranks = {}
    names = spec.layers or [k.removesuffix(".lora_B.weight") for k in tensors]
    for name in names:
        key = f"{name}.lora_B.weight"
        if key in tensors and tensors[key].ndim > 1:
            ranks[key] = tensors[key].shape[1]
    return _lora_config(ranks, alphas, metadata, tensors, head, is_unet=False)


def _lora_config(
    ranks: dict[str, int],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    tensors: dict[str, torch.Tensor],
    field_prefix: str,
    *,
    is_unet: bool,
) -> Any:
    """The ``LoraConfig`` diffusers would build: from the file's metadata, else from the tensors."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig

    if metadata is None:
        if not ranks:
            raise InvalidAdapterError("the adapter has no lora_B weight of 2 or more dimensions")
        empty = [key.removeprefix("^") for key, rank in ranks.items() if rank < 1]
        if empty:
            raise InvalidAdapterError(
                f"{empty[0]} has rank 0 (an empty tensor; {len(empty)} such layer(s)): every "
                "LoRA layer needs a rank >= 1"
            )
        try:
            kwargs = get_peft_kwargs(ranks, alphas, tensors, is_unet=is_unet)
        except (TypeError, ValueError, KeyError, IndexError) as error:
            raise InvalidAdapterError(
                f"the adapter's ranks or alphas are invalid: {error}"
            ) from None
    else:
        kwargs = metadata
    check_config_fields(kwargs, field_prefix, derived=metadata is None)
    try:
        config = LoraConfig(**kwargs)
    except Exception as error:
        raise InvalidAdapterError(
            f"the adapter's LoRA config ({METADATA_KEY}) is invalid: {error}"
        ) from None
    if config.use_dora:
        raise InvalidAdapterError(
            "the adapter is a DoRA adapter (use_dora=True); only plain LoRA is hotswapped"
        )
    if config.lora_bias:
        raise InvalidAdapterError(
            "the adapter has a LoRA bias (lora_bias=True); only LoRA without a bias is hotswapped"
        )
    return config


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _is_positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def check_config_fields(
    config: Mapping[str, Any], field_prefix: str = "", *, derived: bool = False
) -> None:
    """Refuse ``LoraConfig`` fields of the wrong type, non-finite alphas and pattern keys that are
    not regular expressions, each naming the field (as written in the file) and what it must be.
    ``derived``: the config is the one diffusers derives from the tensors (no metadata)."""
    where = (
        "LoRA config (derived by diffusers from its tensors and alphas) field"
        if derived
        else f"{METADATA_KEY} field"
    )

    def refuse(field: str, value: Any, expected: str) -> InvalidAdapterError:
        return InvalidAdapterError(
            f"the adapter's {where} '{field_prefix}{field}' is {value!r} "
            f"({type(value).__name__}); expected {expected}. Write the adapter again with "
            "diffusers or PEFT, or fix that field"
        )

    if "r" in config and not _is_positive_int(config["r"]):
        raise refuse("r", config["r"], "an integer >= 1")
    if "lora_alpha" in config:
        alpha = config["lora_alpha"]
        if not _is_number(alpha) or not math.isfinite(alpha):
            raise refuse("lora_alpha", alpha, "a finite number")
    for name, valid, expected in (
        ("rank_pattern", _is_positive_int, "integers >= 1"),
        ("alpha_pattern", lambda v: _is_number(v) and math.isfinite(v), "finite numbers"),
    ):
        if name not in config:
            continue
        pattern = config[name]
        if not isinstance(pattern, dict):
            raise refuse(name, pattern, f"an object mapping module-name patterns to {expected}")
        for key, value in pattern.items():
            if not isinstance(key, str):
                raise refuse(f"{name}[{key!r}]", key, "a string key")
            if not valid(value):
                raise refuse(f"{name}[{key!r}]", value, expected)
            try:
                # PEFT matches these keys with re.match(rf"(.*\.)?({key})$", module_name).
                re.compile(rf"(.*\.)?({key})$")
            except re.error as error:
                raise InvalidAdapterError(
                    f"the adapter's {where} '{field_prefix}{name}' has the key "
                    f"{key!r}, which is not a valid regular expression ({error}); PEFT matches "
                    "these keys as patterns: escape it or fix the metadata"
                ) from None
    for name in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):
        if name in config and not isinstance(config[name], bool):
            raise refuse(name, config[name], "true or false")
    if "lora_dropout" in config:
        dropout = config["lora_dropout"]
        if not _is_number(dropout) or not 0 <= dropout < 1:
            raise refuse("lora_dropout", dropout, "a number in [0, 1)")
    if "target_modules" in config:
        targets = config["target_modules"]
        if not (
            targets is None
            or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
        ):
            raise refuse("target_modules", targets, "a string, a list of strings or null")
