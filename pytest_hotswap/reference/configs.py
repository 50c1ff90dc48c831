"""The ``LoraConfig`` of an adapter, per component, built as diffusers builds it (from the file's
metadata, else from the tensors and alphas), with every field diffusers or PEFT would trip over
refused first: :func:`check_config_fields`."""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pytest_hotswap.adapters.header import METADATA_KEY
from pytest_hotswap.reference.errors import InvalidAdapterError

if TYPE_CHECKING:
    import torch

    from pytest_hotswap.reference.formats import TextEncoderSpec

#: How many configs (and key plans of :func:`~pytest_hotswap.reference.formats.read_adapter`)
#: are kept.
CONFIG_CACHE_SIZE = 32

_CONFIG_CACHE: OrderedDict[Any, dict[str, Any]] = OrderedDict()


def lora_configs(
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
    while len(_CONFIG_CACHE) > CONFIG_CACHE_SIZE:
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
