"""Loading a LoRA adapter into a pipeline or a bare model: what diffusers' loaders take, PEFT's
state dict and config of a file, the plain first load, and an adapter's rank for messages.

Torch, diffusers and PEFT are imported only inside the functions that need them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from pytest_hotswap.adapters.header import (
    DENOISER_NAMES,
    check_adapter_path,
    parse_metadata,
    read_header,
)

if TYPE_CHECKING:
    import os

    import torch
    from peft import LoraConfig

    from pytest_hotswap.pipelines.registry import PipelineSpec

#: The adapter name the first load and every swap use.
ADAPTER_NAME = "default"

#: A pipeline trait (:func:`pipeline_traits`): a LoRA-loadable text encoder none of whose layers
#: has a name diffusers' text-encoder loader knows (``_load_lora_into_text_encoder`` converts keys
#: and reads ranks by CLIP's names, ``q_proj`` ... ``fc2``), such as Chroma's T5
#: (``SelfAttention.q`` ...). A known defect may need it (``KnownDefect.only_with``).
TEXT_ENCODER_OUTSIDE_KEY_TABLES = "a text encoder outside diffusers' text-encoder key tables"


class AdapterLoadError(ValueError):
    """A plain load of an adapter through the pipeline's own LoRA loader raised: the message
    names the loader and the adapter, the loader's error is the cause."""


LoraSource = Union[str, "os.PathLike[str]", Mapping[str, "torch.Tensor"]]
"""A LoRA adapter: a path to a ``.safetensors`` file or a state dict."""


def load_first_adapter(
    spec: PipelineSpec, lora: LoraSource, adapter_name: str = ADAPTER_NAME
) -> None:
    """A plain (non-hotswap) load of ``lora`` as adapter ``"default"`` (or ``adapter_name``).

    Through a diffusers loader, the file also goes into every other denoiser the loader reaches
    with the first one's keys (Wan 2.2's ``transformer_2``: ``load_into_transformer_2=True``),
    or only into the denoisers it names (:func:`named_denoisers`).
    """
    if spec.has_lora_loader:
        with quiet_diffusers():
            for kwargs in load_routes(spec, lora):
                try:
                    spec.pipe.load_lora_weights(loadable(lora), adapter_name=adapter_name, **kwargs)
                except (ValueError, KeyError, IndexError, RuntimeError) as error:
                    raise AdapterLoadError(
                        f"{_loader_name(spec.pipe)} could not load {describe_adapter(lora)}: "
                        f"{type(error).__name__}: {error}"
                    ) from error
        return
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state_dict, config = read_peft_adapter(lora, spec)
    inject_adapter_in_model(config, spec.denoiser, adapter_name=adapter_name, state_dict=state_dict)
    result = set_peft_model_state_dict(spec.denoiser, state_dict, adapter_name)
    unexpected = [key for key in result.unexpected_keys if ".lora_" in key]
    if unexpected:
        raise ValueError(
            f"adapter keys match no LoRA layer of {type(spec.denoiser).__name__}: "
            f"{', '.join(unexpected[:5])}; write the adapter for this model (PEFT key format)"
        )


def _loader_name(pipe: Any) -> str:
    """``ChromaPipeline's LoRA loader (FluxLoraLoaderMixin.load_lora_weights)``."""
    from pytest_hotswap.pipelines.families_driver import UnsupportedPipelineError, lora_loader

    try:
        loader = lora_loader(pipe).__name__
    except UnsupportedPipelineError:
        loader = type(pipe).__name__
    return f"{type(pipe).__name__}'s LoRA loader ({loader}.load_lora_weights)"


def pipeline_traits(spec: PipelineSpec) -> frozenset[str]:
    """What a known defect may need of a pipeline, read off its LoRA-loadable components (never
    off its name): :data:`TEXT_ENCODER_OUTSIDE_KEY_TABLES`."""
    from pytest_hotswap.reference.formats import text_encoder_spec

    traits = set()
    encoders = spec.text_encoders().items()
    if any(text_encoder_spec(name, module).peft_only for name, module in encoders):
        traits.add(TEXT_ENCODER_OUTSIDE_KEY_TABLES)
    return frozenset(traits)


def other_denoiser_routes(spec: PipelineSpec) -> list[dict[str, Any]]:
    """The ``load_lora_weights`` keywords that send the first denoiser's keys into each other
    denoiser (Wan 2.2: ``load_into_transformer_2=True``); a denoiser the loader reaches only by
    its own key prefix gets nothing from a file written for the first one."""
    if len(spec.denoisers) < 2 or not spec.has_lora_loader:
        return []
    from pytest_hotswap.pipelines.families_driver import lora_route

    routes = [lora_route(spec.pipe, name) for name in spec.denoiser_names()[1:]]
    return [route.load_kwargs for route in routes if route.load_kwargs]


def named_denoisers(spec: PipelineSpec, lora: LoraSource) -> tuple[str, ...] | None:
    """The denoisers of ``spec`` an adapter file names in its metadata (``hotswap_denoisers``,
    ``make_lora(..., denoisers=...)``), else ``None``: every denoiser its loader reaches. Read
    only for a pipeline with several denoisers (Wan 2.2), so no other swap pays for it."""
    if isinstance(lora, Mapping) or not spec.has_lora_loader or len(spec.denoisers) < 2:
        return None
    named = read_header(lora).denoisers
    if named is None:
        return None
    unknown = [name for name in named if name not in spec.denoiser_names()]
    if unknown:
        raise ValueError(
            f"{describe_adapter(lora)} is for {', '.join(named)}; {spec.name} has no "
            f"{', '.join(unknown)} (its denoisers: {', '.join(spec.denoiser_names())})"
        )
    return named


def load_routes(spec: PipelineSpec, lora: LoraSource) -> list[dict[str, Any]]:
    """The ``load_lora_weights`` keywords of each load that puts ``lora`` where it belongs: the
    plain load (its own key prefixes), then each other denoiser's route; for an adapter that
    names its denoisers, the route of each of those only."""
    named = named_denoisers(spec, lora)
    if named is None:
        return [{}, *other_denoiser_routes(spec)]
    from pytest_hotswap.pipelines.families_driver import lora_route

    routes: list[dict[str, Any]] = []
    for name in named:
        kwargs = lora_route(spec.pipe, name).load_kwargs
        if kwargs not in routes:  # two denoisers the plain load reaches: one load
            routes.append(kwargs)
    return routes


def zero_adapter(model: torch.nn.Module, adapter_name: str) -> None:
    """What PEFT's hotswap does to every layer a new adapter leaves out: set its LoRA weights to
    zero in place (shapes, scalings and compiled code untouched), here for the whole model."""
    from peft.utils.hotswap import hotswap_adapter_from_state_dict

    config = model.peft_config[adapter_name]
    hotswap_adapter_from_state_dict(model, {}, adapter_name, config)


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
