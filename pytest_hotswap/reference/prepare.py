"""``prepare_for_hotswap``: pad a loaded LoRA to ``max_rank`` and index it, before compiling.

Three opt-ins widen what a later swap may change without a recompile:

- ``targets``: the union of target layers. Every layer any of the named modules or adapters
  targets gets a LoRA of the prepared adapter (zero where the loaded adapter has none), so
  adapters for disjoint layers swap in place.
- ``text_encoder=True``: the LoRA layers of the pipeline's text encoders are padded and indexed
  too, and a swap is one transaction across the denoiser and every text encoder.
- ``slots=N``: N adapter slots per LoRA layer, all active, each with its own weight.

How the slots are written into the model: :mod:`pytest_hotswap.reference.slots`.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pytest_hotswap.reference import DEFAULT_MAX_RANK
from pytest_hotswap.reference.components import (
    denoiser_prefix,
    find_denoiser,
    find_text_encoders,
    is_compiled,
    lora_loader,
    unwrap_compiled,
)
from pytest_hotswap.reference.errors import (
    AdapterNotFoundError,
    AlreadyCompiledError,
    HotswapError,
    NotPreparedError,
    RankTooLargeError,
    TextEncoderLoraError,
    UnexpectedTargetsError,
)
from pytest_hotswap.reference.formats import adapter_layers, read_adapter, text_encoder_spec
from pytest_hotswap.reference.index import AdapterIndex, lookup, register
from pytest_hotswap.reference.slots import PlannedLayer, base_layer, padded, write_slots

#: The most adapter slots ``prepare_for_hotswap`` makes per layer.
MAX_SLOTS = 64


def prepare_for_hotswap(
    model_or_pipeline: Any,
    max_rank: int = DEFAULT_MAX_RANK,
    adapter_name: str = "default",
    *,
    targets: Iterable[str | os.PathLike[str] | Mapping[str, torch.Tensor]] | None = None,
    text_encoder: bool = False,
    slots: int = 1,
) -> AdapterIndex:
    """Make the loaded adapter ``adapter_name`` hotswappable without recompiling; call before compile.

    Every Linear / Conv2d (grouped too) LoRA layer of the denoiser gets ``lora_A`` / ``lora_B``
    zero-padded to ``max_rank`` and its scaling turned into a 0-dim tensor on the weight's device;
    outputs are unchanged. Calling it again with the same arguments is a no-op, unless the adapter
    was unloaded, deleted or re-loaded since: then the one loaded now is prepared.

    Args:
        targets: module names (PEFT module paths of the denoiser; ``text_encoder.<path>`` for a
            text encoder) and / or adapters (``.safetensors`` paths or state dicts, read like
            :func:`hotswap` reads them). Every layer any of them targets gets a zero LoRA too, so
            an adapter for any of those layers swaps in without a recompile.
        text_encoder: also pad and index the LoRA on the pipeline's text encoders (the loaded
            adapter's text-encoder layers and text-encoder ``targets``). Without it, text-encoder
            LoRA layers are left as they are and text-encoder keys are refused by a swap.
        slots: adapter slots per LoRA layer, all active; ``hotswap(..., slot=k)`` fills one,
            ``set_lora_scale(..., slot=k)`` weights one.

    Every problem raises a ``HotswapError`` before anything is changed.
    """
    request = _checked_request(max_rank, adapter_name, targets, text_encoder, slots)
    denoiser_attr, stored = find_denoiser(model_or_pipeline)
    stored_encoders = find_text_encoders(model_or_pipeline) if text_encoder else {}
    if text_encoder and denoiser_attr is None:
        raise HotswapError(
            "text_encoder=True needs the pipeline (its text encoders are pipeline components); "
            "pass the pipeline, not its denoiser"
        )
    if text_encoder and not stored_encoders:
        raise HotswapError(
            f"text_encoder=True, but {type(model_or_pipeline).__name__} has no text_encoder "
            "component; call prepare_for_hotswap without text_encoder=True"
        )
    for name, module in {"the model": stored, **stored_encoders}.items():
        if is_compiled(module):
            raise AlreadyCompiledError(
                f"{name} is already compiled: padding now would change tensor shapes under the "
                "compiled code; call prepare_for_hotswap before torch.compile"
            )
    model = stored
    encoders = {name: unwrap_compiled(module) for name, module in stored_encoders.items()}
    existing = lookup(model, adapter_name, encoders or None)
    if existing is not None:
        return _same_or_refused(existing, request, model_or_pipeline, encoders)

    components: dict[str, torch.nn.Module] = {"": model, **encoders}
    wanted = _resolve_targets(request, model_or_pipeline, components)
    plan = _Plan.build(request, components, wanted)
    index = plan.commit()
    register(model, index)
    return index


# -- the request --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    max_rank: int
    adapter_name: str
    targets: tuple[Any, ...]
    text_encoder: bool
    slots: int

    @property
    def slot_names(self) -> list[str]:
        return [self.adapter_name] + [f"{self.adapter_name}_slot{k}" for k in range(1, self.slots)]


def _checked_request(
    max_rank: Any, adapter_name: Any, targets: Any, text_encoder: Any, slots: Any
) -> _Request:
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise HotswapError(f"max_rank must be an integer >= 1, got {max_rank!r}")
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
        raise HotswapError(f"slots must be an integer from 1 to {MAX_SLOTS}, got {slots!r}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise HotswapError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if not isinstance(text_encoder, bool):
        raise HotswapError(f"text_encoder must be True or False, got {text_encoder!r}")
    if targets is None:
        chosen: tuple[Any, ...] = ()
    elif isinstance(targets, (str, bytes, os.PathLike, Mapping)):
        raise HotswapError(
            f"targets must be an iterable of module names and / or adapters, got a single "
            f"{type(targets).__name__}; wrap it in a list: targets=[...]"
        )
    else:
        try:
            chosen = tuple(targets)
        except TypeError:
            raise HotswapError(
                "targets must be an iterable of module names (str) and / or adapters (paths or "
                f"state dicts), got {type(targets).__name__}"
            ) from None
    return _Request(max_rank, adapter_name, chosen, text_encoder, slots)


def _same_or_refused(
    index: AdapterIndex,
    request: _Request,
    model_or_pipeline: Any,
    encoders: Mapping[str, torch.nn.Module],
) -> AdapterIndex:
    """Preparing again as before is a no-op; anything else needs a fresh load."""
    want_encoders = set(encoders) if request.text_encoder else set()
    have_encoders = set(index.components) - {""}
    same = (
        index.max_rank == request.max_rank
        and index.n_slots == request.slots
        and (not want_encoders or have_encoders)
    )
    if same and request.targets:
        components = {"": None, **encoders}
        wanted = _resolve_targets(request, model_or_pipeline, components, check_modules=False)
        same = all(name in index.layer_names for name in wanted)
    if same:
        return index
    raise HotswapError(
        f"adapter {request.adapter_name!r} is already prepared with max_rank={index.max_rank}, "
        f"slots={index.n_slots}, components={list(index.components)} and "
        f"{len(index.slots)} layers; re-load the model to prepare it for max_rank="
        f"{request.max_rank}, slots={request.slots}"
        + (", text_encoder=True" if request.text_encoder else "")
        + (" and these targets" if request.targets else "")
    )


# -- targets ------------------------------------------------------------------------------------


def _resolve_targets(
    request: _Request,
    model_or_pipeline: Any,
    components: Mapping[str, torch.nn.Module | None],
    check_modules: bool = True,
) -> dict[str, str]:
    """The qualified layer names ``targets`` ask for (``text_encoder.<path>`` for a text
    encoder), each mapped to the target that named it, after checking every one exists."""
    wanted: dict[str, str] = {}
    encoders = [name for name in components if name]
    for target in request.targets:
        if isinstance(target, str) and not target.endswith(".safetensors"):
            wanted.setdefault(target, f"module name {target!r}")
            continue
        if not isinstance(target, (str, os.PathLike, Mapping)):
            raise HotswapError(
                "each target is a module name (str), an adapter path or a state dict; got "
                f"{type(target).__name__}"
            )
        label = (
            f"adapter {os.fspath(target)!r}" if not isinstance(target, Mapping) else "a state dict"
        )
        specs = [text_encoder_spec(name, components[name]) for name in encoders]
        try:
            adapter = read_adapter(
                target, lora_loader(model_or_pipeline), denoiser_prefix(model_or_pipeline), specs
            )
        except TextEncoderLoraError as error:
            raise TextEncoderLoraError(
                f"targets: {label} has text-encoder keys, which are only valid with "
                f"text_encoder=True: {error}"
            ) from None
        except HotswapError as error:
            raise type(error)(f"targets: {label} cannot be read: {error}") from None
        for layer, rank in adapter_layers(adapter).items():
            if rank > request.max_rank:
                raise RankTooLargeError(
                    f"targets: {label} has rank {rank} at {layer!r}, above max_rank="
                    f"{request.max_rank}; prepare with max_rank >= {rank} or leave it out"
                )
            wanted.setdefault(layer, label)
    if not check_modules:
        return wanted
    for name, source in wanted.items():
        component, path = _component_of(name, encoders)
        if component is None:
            raise TextEncoderLoraError(
                f"targets: {source} names the text-encoder layer {name!r}; text-encoder targets "
                "are only valid with text_encoder=True on a pipeline whose text encoders have "
                "that layer"
            )
        root = components[component]
        assert root is not None
        valid = _valid_targets(root)
        if path not in valid:
            near = difflib.get_close_matches(path, list(valid), n=3)
            listed = ", ".join(sorted(valid)[:60]) + (" ..." if len(valid) > 60 else "")
            raise UnexpectedTargetsError(
                f"targets: {source} names {name!r}, which is not a Linear or Conv2d module of "
                f"the {component or 'denoiser'}"
                + (f" (did you mean {', '.join(near)}?)" if near else "")
                + f"; valid names ({len(valid)}): {listed}"
            )
    return wanted


def _component_of(name: str, encoders: list[str]) -> tuple[str | None, str]:
    """``(component, module path)`` of a qualified target name; ``None`` for the text encoder of
    a pipeline that was not prepared with ``text_encoder=True``."""
    head, _, rest = name.partition(".")
    if head in encoders:
        return head, rest
    if re.match(r"^text_encoder(_\d+)?$", head):
        return None, rest
    return "", name


def _valid_targets(root: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules a LoRA may target: Linear and Conv2d layers, and the LoRA layers wrapping them."""
    from peft.tuners.lora import LoraLayer

    valid: dict[str, torch.nn.Module] = {}
    inside: str | None = None
    for name, module in root.named_modules():
        if inside is not None and name.startswith(inside):
            continue  # base_layer, lora_A, lora_B ... of an adapted layer
        if isinstance(module, LoraLayer):
            inside = f"{name}."
            if isinstance(module.get_base_layer(), (torch.nn.Linear, torch.nn.Conv2d)):
                valid[name] = module
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name:
            valid[name] = module
    return valid


# -- the plan: everything validated and allocated, nothing written -----------------------------


@dataclass
class _Plan:
    request: _Request
    components: dict[str, torch.nn.Module]
    layers: list[PlannedLayer] = field(default_factory=list)
    inject: dict[str, list[str]] = field(default_factory=dict)  # per component: union additions
    base_config: Any = None

    @classmethod
    def build(
        cls,
        request: _Request,
        components: dict[str, torch.nn.Module],
        wanted: Mapping[str, str],
    ) -> _Plan:
        plan = cls(request, components)
        plan._collect(wanted)
        plan._check_names()
        plan._check_max_rank()
        for layer in plan.layers:
            if layer.loaded:
                layer.padded = padded(layer, request.adapter_name, request.max_rank)
        return plan

    def _collect(self, wanted: Mapping[str, str]) -> None:
        from peft.tuners.lora import LoraLayer

        name = self.request.adapter_name
        all_layers = [
            (component, path, module)
            for component, root in self.components.items()
            for path, module in root.named_modules()
            if isinstance(module, LoraLayer)
        ]
        if not all_layers:
            raise NotPreparedError(
                f"{type(self.components['']).__name__} has no LoRA loaded: load the first adapter "
                "with pipe.load_lora_weights(path, adapter_name=...) before prepare_for_hotswap"
            )
        loaded = [(c, p, m) for c, p, m in all_layers if name in m.lora_A]
        if not loaded:
            names = sorted({adapter for _, _, m in all_layers for adapter in m.lora_A})
            raise AdapterNotFoundError(
                f"no adapter named {name!r} is loaded (names match exactly); loaded: {names}; "
                "pass one of them as adapter_name"
            )
        for component, path, module in loaded:
            problem = _unsupported(module, name)
            if problem:
                qualified = f"{component}.{path}" if component else path
                raise HotswapError(f"cannot prepare LoRA layer {qualified!r}: {problem}")
        self.base_config = _base_config(self.components, name)

        chosen: dict[str, set[str]] = {c: set() for c in self.components}
        for component, path, _ in loaded:
            chosen[component].add(path)
        for qualified in wanted:
            component, path = _component_of(qualified, [c for c in self.components if c])
            assert component is not None
            chosen[component].add(path)
        for component, root in self.components.items():
            if component and not chosen[component]:
                continue
            for path, module in _valid_targets(root).items() if chosen[component] else ():
                if path not in chosen[component]:
                    continue
                is_loaded = name in getattr(module, "lora_A", {})
                self.layers.append(
                    PlannedLayer(component, path, module, _groups(module), loaded=is_loaded)
                )
                if not is_loaded:
                    self.inject.setdefault(component, []).append(path)
        if self.request.text_encoder and not any(layer.component for layer in self.layers):
            raise HotswapError(
                "text_encoder=True, but no text encoder has a LoRA layer of adapter "
                f"{name!r} and no text-encoder targets were given: load a first adapter with "
                "text-encoder keys, or pass targets=['text_encoder.<module>', ...]"
            )

    def _check_names(self) -> None:
        """Slot adapters get fresh PEFT adapter names; an existing one would be overwritten."""
        taken: set[str] = set()
        for root in self.components.values():
            taken.update(getattr(root, "peft_config", {}) or {})
            for module in root.modules():
                taken.update(getattr(module, "lora_A", {}) or {})
        clash = [n for n in self.request.slot_names[1:] if n in taken]
        if clash:
            raise HotswapError(
                f"slots={self.request.slots} needs the adapter names {clash}, but the model already "
                "has adapters of those names (left from an earlier prepare?); delete them "
                "(delete_adapters) or use another adapter_name"
            )

    def _check_max_rank(self) -> None:
        max_rank = self.request.max_rank
        largest, where, device, padding = 0, "", torch.device("cpu"), 0
        for layer in self.layers:
            qualified = f"{layer.component}.{layer.name}" if layer.component else layer.name
            if layer.loaded:
                rank = layer.module.lora_A[self.request.adapter_name].weight.shape[0]
                if rank > max_rank:
                    raise RankTooLargeError(
                        f"{qualified}: the loaded adapter has rank {rank}, above max_rank="
                        f"{max_rank}; prepare with max_rank >= {rank}"
                    )
            if max_rank % layer.groups:
                raise HotswapError(
                    f"{qualified}: a grouped Conv2d (groups={layer.groups}) needs max_rank "
                    f"divisible by {layer.groups}; got {max_rank}"
                )
            fan_in, out = _dimensions(layer.module)
            weight = (
                layer.module.lora_A[self.request.adapter_name].weight
                if layer.loaded
                else base_layer(layer.module).weight
            )
            padding += (
                max_rank * fan_in + out * (max_rank // layer.groups)
            ) * weight.element_size()
            if max(fan_in, out) > largest:
                largest, where, device = max(fan_in, out), qualified, weight.device
        # A rank above a layer's min(in, out) adds nothing, but it is legal (PEFT and diffusers
        # take it, and tiny CI models meet production max ranks): only a padding that cannot fit
        # in the device's memory is refused, before the allocator tries.
        padding *= self.request.slots
        memory = _device_memory(device) if largest else None
        if memory is not None and padding > memory:
            raise HotswapError(
                f"max_rank={max_rank} would pad the LoRA layers to {padding / 2**30:.3g} GiB, more "
                f"than the {memory / 2**30:.3g} GiB of memory on {device}; a LoRA rank above a "
                f"layer's min(in, out) adds nothing (the largest dimension here is {largest}, in "
                f"{where!r}): use the largest rank of your adapters, at most {largest}"
            )

    def commit(self) -> AdapterIndex:
        """Write the plan into the model (the only part that changes it)."""
        return write_slots(
            self.components,
            self.layers,
            self.inject,
            self.base_config,
            self.request.slot_names,
            self.request.max_rank,
        )


def _unsupported(layer: Any, adapter_name: str) -> str | None:
    base = layer.get_base_layer()
    if not isinstance(layer.lora_A[adapter_name], (torch.nn.Linear, torch.nn.Conv2d)):
        return f"{type(base).__name__} LoRA layers are not supported (Linear and Conv2d only)"
    if layer.use_dora.get(adapter_name):
        return "DoRA adapters are not supported; load a plain LoRA"
    if layer.lora_bias.get(adapter_name):
        return "LoRA with lora_bias=True is not supported; load one without a LoRA bias"
    if adapter_name in layer.merged_adapters:
        return "the adapter is fused into the base weights; call unfuse_lora() first"
    return None


def _groups(module: torch.nn.Module) -> int:
    base = base_layer(module)
    return base.groups if isinstance(base, torch.nn.Conv2d) else 1


def _device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes, ``None`` where it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        with contextlib.suppress(ValueError, OSError, AttributeError):
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def _dimensions(module: torch.nn.Module) -> tuple[int, int]:
    """``(fan_in, out)`` of the layer a LoRA adapts: for a conv, in / groups x kernel area."""
    base = base_layer(module)
    if isinstance(base, torch.nn.Conv2d):
        return (base.in_channels // base.groups) * math.prod(base.kernel_size), base.out_channels
    return base.in_features, base.out_features


def _base_config(components: Mapping[str, torch.nn.Module], adapter_name: str) -> Any:
    for root in components.values():
        config = (getattr(root, "peft_config", None) or {}).get(adapter_name)
        if config is not None:
            return config
    return None
