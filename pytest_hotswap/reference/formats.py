"""Reading an adapter: a ``.safetensors`` file or a state dict, in any format diffusers reads.

Conversion is diffusers' own (``lora_state_dict`` of the pipeline's loader, then the same steps
``load_lora_adapter`` takes), so the reference sees exactly the tensors and the ``LoraConfig`` a
plain ``load_lora_weights`` would build. Nothing here touches a model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pytest_hotswap.reference.errors import InvalidAdapterError, TextEncoderLoraError

# Text-encoder keys in diffusers / PEFT (text_encoder., text_encoder_2.), kohya (lora_te_,
# lora_te1_, lora_te2_) and single-file (te_, text_encoders.) namings.
_TEXT_ENCODER_KEY = re.compile(r"^(text_encoder(_\d)?[._]|lora_te\d?_|te\d?_|text_encoders\.)")


@dataclass(frozen=True)
class Adapter:
    """A denoiser adapter in PEFT naming (``<module>.lora_A.weight``), with its ``LoraConfig``."""

    tensors: dict[str, torch.Tensor]
    config: Any


def read_adapter(
    lora: str | os.PathLike[str] | Mapping[str, Any], loader: Any, prefix: str
) -> Adapter:
    """Read ``lora`` for a denoiser whose keys diffusers prefixes with ``prefix``.

    Raises ``InvalidAdapterError`` for anything unreadable and ``TextEncoderLoraError`` for
    text-encoder keys in any naming, before converting anything.
    """
    source: str | dict[str, Any]
    if isinstance(lora, Mapping):
        source = _checked_state_dict(lora)
        raw_keys = list(source)
    elif isinstance(lora, (str, os.PathLike)):
        source = str(lora)
        raw_keys = _checked_safetensors_keys(Path(lora))
    else:
        raise InvalidAdapterError(
            f"lora must be a path to a .safetensors file or a state dict, got {type(lora).__name__}"
        )
    _refuse_text_encoder_keys(raw_keys)

    try:
        # diffusers' converters raise many exception types for malformed input; all of them mean
        # "diffusers cannot read this adapter".
        loaded = loader.lora_state_dict(
            source, use_safetensors=True, return_alphas=True, return_lora_metadata=True
        )
    except Exception as error:
        raise InvalidAdapterError(f"diffusers could not read the adapter: {error}") from error
    state_dict, network_alphas, metadata = _unpack(loaded)
    _refuse_text_encoder_keys(list(state_dict))
    state_dict, network_alphas, metadata = _denoiser_part(
        state_dict, network_alphas, metadata, prefix
    )
    tensors = _peft_keys(state_dict)
    return Adapter(tensors=tensors, config=_lora_config(tensors, network_alphas, metadata))


def _checked_state_dict(lora: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    bad = [
        str(k) for k, v in lora.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
    ]
    if bad:
        raise InvalidAdapterError(
            f"a LoRA state dict maps str keys to tensors; bad entries: {bad[:5]}"
        )
    if not lora:
        raise InvalidAdapterError("the LoRA state dict is empty")
    return dict(lora)


def _checked_safetensors_keys(path: Path) -> list[str]:
    """Keys of a complete, readable safetensors file; anything else (pickle, .bin) is refused."""
    import safetensors

    if path.suffix != ".safetensors":
        raise InvalidAdapterError(
            f"{path}: only .safetensors adapters are read (pickle files can run code); "
            "convert it with safetensors.torch.save_file"
        )
    if not path.is_file():
        raise InvalidAdapterError(f"{path}: no such file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (OSError, safetensors.SafetensorError) as error:
        raise InvalidAdapterError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {error}"
        ) from error
    if not keys:
        raise InvalidAdapterError(f"{path}: the file holds no tensors")
    return keys


def _refuse_text_encoder_keys(keys: list[str]) -> None:
    text_encoder = [k for k in keys if _TEXT_ENCODER_KEY.match(k)]
    if text_encoder:
        raise TextEncoderLoraError(
            f"the adapter has {len(text_encoder)} text-encoder keys (e.g. {text_encoder[:3]}); only the "
            "denoiser is hotswapped: strip the text-encoder keys, or load this adapter without hotswap"
        )


def _unpack(loaded: Any) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict | None]:
    """Loaders differ: (sd, alphas, metadata), (sd, metadata) or sd."""
    if not isinstance(loaded, tuple):
        return loaded, None, None
    if len(loaded) == 3:
        return loaded
    return loaded[0], None, loaded[1]


def _denoiser_part(
    state_dict: dict[str, torch.Tensor],
    network_alphas: dict[str, float] | None,
    metadata: dict | None,
    prefix: str,
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict | None]:
    """Strip ``prefix.`` as ``load_lora_adapter`` does; a file without any prefix is taken as is."""
    head = f"{prefix}."
    if not any(k.startswith(head) for k in state_dict):
        return state_dict, network_alphas, metadata
    if metadata is not None and any(k.startswith(head) for k in metadata):
        metadata = {k.removeprefix(head): v for k, v in metadata.items() if k.startswith(head)}
    if network_alphas:
        network_alphas = {
            k.removeprefix(head): v for k, v in network_alphas.items() if k.startswith(head)
        }
    # Keys of other components stay (with their prefix), to be reported as unexpected targets.
    return {k.removeprefix(head): v for k, v in state_dict.items()}, network_alphas, metadata


def _peft_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if not state_dict:
        raise InvalidAdapterError("the adapter has no LoRA tensors for the denoiser")
    if "lora_A" not in next(iter(state_dict)):
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    return state_dict


def _lora_config(
    tensors: dict[str, torch.Tensor], network_alphas: dict[str, float] | None, metadata: dict | None
) -> Any:
    """The ``LoraConfig`` diffusers would build: from the file's metadata, else from the tensors."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig

    try:
        if metadata is None:
            ranks = {
                f"^{k}": v.shape[1] for k, v in tensors.items() if "lora_B" in k and v.ndim > 1
            }
            if not ranks:
                raise InvalidAdapterError(
                    "the adapter has no lora_B weight of 2 or more dimensions"
                )
            metadata = get_peft_kwargs(ranks, network_alphas, tensors)
        return LoraConfig(**metadata)
    except InvalidAdapterError:
        raise
    except (TypeError, ValueError, KeyError, IndexError) as error:
        raise InvalidAdapterError(f"the adapter's LoRA config is invalid: {error}") from error
