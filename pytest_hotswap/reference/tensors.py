"""The source of an adapter: a ``.safetensors`` file or a state dict, read as a dict of tensors
and the file's metadata, with every tensor and alpha checked before diffusers sees it (sparse,
meta or nested tensors, non-str keys, alphas of several values or not finite are refused with an
:class:`InvalidAdapterError` naming the key)."""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Mapping
from itertools import repeat
from typing import Any

import torch

from pytest_hotswap.adapters.header import (
    METADATA_KEY,
    AdapterFileError,
    check_adapter_path,
    parse_metadata,
)
from pytest_hotswap.reference.errors import InvalidAdapterError


def read_source(lora: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    if isinstance(lora, Mapping):
        state = dict(lora)
        if not state:
            raise InvalidAdapterError("the LoRA state dict is empty")
        return state, None
    if isinstance(lora, (str, os.PathLike)):
        return read_file(lora)
    raise InvalidAdapterError(
        f"lora must be a path to a .safetensors file or a state dict, got {type(lora).__name__}"
    )


def read_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict | None]:
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
SHAPE = operator.attrgetter("shape")
KIND = operator.attrgetter("layout", "is_meta", "is_nested", "dtype", "device")


def check_tensors(state: dict[Any, Any]) -> set[tuple[Any, ...]]:
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
    kinds = set(map(KIND, values))
    if all(kind[:3] == (torch.strided, False, False) for kind in kinds):
        return kinds
    odd = [k for k, v in state.items() if KIND(v)[:3] != (torch.strided, False, False)]
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


def check_alpha_tensors(state: dict[str, torch.Tensor]) -> None:
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


def unpack(loaded: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Loaders differ: (sd, alphas, metadata), (sd, metadata) or sd. The metadata of a dict
    source is ``None``: the file's metadata is read by :func:`read_file`."""
    if not isinstance(loaded, tuple):
        return loaded, None
    if len(loaded) == 3:
        return loaded[0], loaded[1]
    return loaded[0], None


def checked_network_alphas(alphas: Mapping[str, Any] | None) -> dict[str, float] | None:
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
