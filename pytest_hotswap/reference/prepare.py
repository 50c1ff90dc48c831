"""``prepare_for_hotswap``: pad a loaded LoRA to ``max_rank`` and index it, before compiling.

Three opt-ins widen what a later swap may change without a recompile:

- ``targets``: the union of target layers. Every layer any of the named modules or adapters
  targets gets a LoRA of the prepared adapter (zero where the loaded adapter has none), so
  adapters for disjoint layers swap in place.
- ``text_encoder=True``: the LoRA layers of the pipeline's text encoders are padded and indexed
  too, and a swap is one transaction across the denoiser and every text encoder.
- ``slots=N``: N adapter slots per LoRA layer, all active, each with its own weight.

The slot design: slot ``k > 0`` is one more PEFT adapter (``<adapter_name>_slot<k>``) on every
indexed layer, injected with PEFT's own ``inject_adapter_in_model`` and left active next to slot 0,
each with its own 0-dim scaling tensor (``alpha / r * weight``). PEFT's layers then compute
``base(x) + sum_k B_k A_k x * scaling_k`` in slot order, exactly what diffusers' eager
``set_adapters([a, b], adapter_weights=[wa, wb])`` computes for two loaded adapters, so equivalence
is by construction, weights are scalar writes (no recompile, weight 0 switches a slot off
exactly, and turning it back on needs no copy of its weights), and PEFT's layer types are used as
they are. The alternative, one LoRA of rank ``N * max_rank`` holding all slots, saves kernel
launches on the forward but must bake each weight into ``B`` (a weight change rewrites weights,
weight 0 loses them) and sums in another order than diffusers. The cost: each slot is a full
padded LoRA branch on the forward. Measured eager, 1 thread, padded to 128, forward time relative
to one slot for N = 2 / 4: 1.39x / 2.19x on the Flux-depth shape (19+38 blocks, hidden 128, where
one slot already costs 1.7x the LoRA-free forward), 1.05x / 1.15x on Flux widths (hidden 3072),
1.23x / 1.74x on the tiny Flux.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pytest_hotswap.options import MAX_RANK
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
from pytest_hotswap.reference.index import (
    AdapterIndex,
    Layout,
    Liveness,
    LoraSlot,
    SlotState,
    lookup,
    rank_blocks,
    register,
)

#: The most adapter slots ``prepare_for_hotswap`` makes per layer.
MAX_SLOTS = 64


def prepare_for_hotswap(
    model_or_pipeline: Any,
    max_rank: int = MAX_RANK.default,
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
class _Layer:
    """One layer of the index: where it lives and what each slot will hold."""

    component: str
    name: str
    module: torch.nn.Module  # the LoraLayer, or the plain layer a union target wraps
    groups: int
    loaded: bool  # the prepared adapter already has a LoRA here
    padded: tuple[torch.Tensor, torch.Tensor] | None = None  # slot 0, when loaded
    rank: int = 0
    scaling: float = 0.0


@dataclass
class _Plan:
    request: _Request
    components: dict[str, torch.nn.Module]
    layers: list[_Layer] = field(default_factory=list)
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
                layer.padded = _padded(layer, request.adapter_name, request.max_rank)
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
                    _Layer(component, path, module, _groups(module), loaded=is_loaded)
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
                else _base_layer(layer.module).weight
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

    # -- commit: the only part that changes the model --------------------------------------------

    def commit(self) -> AdapterIndex:
        request = self.request
        names = request.slot_names
        with torch.no_grad(), _quiet_peft():
            for component, root in self.components.items():
                layers = [layer for layer in self.layers if layer.component == component]
                if not layers:
                    continue
                with _kept_flags(root) as flags:
                    flags.lora = _lora_requires_grad(layers, names[0])
                    if self.inject.get(component):
                        _inject(root, self.inject[component], names[0], self.base_config, request)
                    for slot_name in names[1:]:
                        paths = [layer.name for layer in layers]
                        _inject(root, paths, slot_name, self.base_config, request)
                modules = dict(root.named_modules())
                for layer in layers:
                    layer.module = modules[layer.name]
                    _activate(layer, names)
            by_slot: list[list[LoraSlot]] = [[] for _ in names]
            for position, layer in enumerate(self.layers):
                for k, slot_name in enumerate(names):
                    by_slot[k].append(_install(layer, position, k, slot_name, request.max_rank))
        index = AdapterIndex(
            adapter_name=request.adapter_name,
            max_rank=request.max_rank,
            by_slot=by_slot,
            components=tuple(
                c for c in self.components if any(layer.component == c for layer in self.layers)
            ),
            text_encoders=tuple(
                text_encoder_spec(c, self.components[c])
                for c in self.components
                if c and any(layer.component == c for layer in self.layers)
            ),
        )
        first = Layout(ranks=tuple(layer.rank for layer in self.layers))
        empty = Layout(ranks=(0,) * len(self.layers))
        index.states = [
            SlotState(first, [layer.scaling for layer in self.layers])
            if k == 0
            else SlotState(empty, [0.0] * len(self.layers))
            for k in range(len(names))
        ]
        for k, entries in enumerate(by_slot):
            for slot in entries:
                slot.state = index.states[k]
        roots = {c: self.components[c] for c in index.components}
        index.liveness = Liveness(roots, [slot for entries in by_slot for slot in entries])
        return index


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


def _base_layer(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _groups(module: torch.nn.Module) -> int:
    base = _base_layer(module)
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
    base = _base_layer(module)
    if isinstance(base, torch.nn.Conv2d):
        return (base.in_channels // base.groups) * math.prod(base.kernel_size), base.out_channels
    return base.in_features, base.out_features


def _base_config(components: Mapping[str, torch.nn.Module], adapter_name: str) -> Any:
    for root in components.values():
        config = (getattr(root, "peft_config", None) or {}).get(adapter_name)
        if config is not None:
            return config
    return None


def _padded(layer: _Layer, adapter_name: str, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    module = layer.module
    lora_A = module.lora_A[adapter_name].weight
    lora_B = module.lora_B[adapter_name].weight
    rank = lora_A.shape[0]
    groups = layer.groups
    new_A = lora_A.new_zeros((max_rank, *lora_A.shape[1:]))
    new_B = lora_B.new_zeros((lora_B.shape[0], max_rank // groups, *lora_B.shape[2:]))
    with torch.no_grad():
        for padded, unpadded in rank_blocks(max_rank, rank, groups):
            new_A[padded].copy_(lora_A[unpadded])
        new_B[:, : rank // groups].copy_(lora_B)
    layer.rank = rank
    layer.scaling = float(module.scaling[adapter_name])
    return new_A, new_B


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message="LoRA adapter added to ConvNd layer")
        yield


class _Flags:
    lora: bool = False


@contextlib.contextmanager
def _kept_flags(root: torch.nn.Module) -> Iterator[_Flags]:
    """Keep what PEFT's injection changes besides adding layers: the model's config of the
    prepared adapter, every existing parameter's ``requires_grad`` and every LoRA layer's active
    adapters. New LoRA parameters get the prepared adapter's ``requires_grad`` (``flags.lora``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    flags = _Flags()
    configs = dict(getattr(root, "peft_config", {}) or {})
    requires_grad = {id(p): p.requires_grad for p in root.parameters()}
    active = {
        id(m): list(m.active_adapters) for m in root.modules() if isinstance(m, BaseTunerLayer)
    }
    yield flags
    peft_config = getattr(root, "peft_config", None)
    if isinstance(peft_config, dict):
        peft_config.update(configs)
    for module in root.modules():
        before = active.get(id(module)) if isinstance(module, BaseTunerLayer) else None
        if before is not None and list(module.active_adapters) != before:
            module._active_adapter = before
    for param in root.parameters():
        param.requires_grad_(requires_grad.get(id(param), flags.lora))


def _lora_requires_grad(layers: list[_Layer], adapter_name: str) -> bool:
    for layer in layers:
        if layer.loaded:
            return bool(layer.module.lora_A[adapter_name].weight.requires_grad)
    return False


def _inject(
    root: torch.nn.Module, paths: list[str], adapter_name: str, base: Any, request: _Request
) -> None:
    """Add a zero-weight (meta, filled by :func:`_install`) LoRA of ``adapter_name`` at exactly
    ``paths``, with PEFT's own injection."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=request.max_rank,
        lora_alpha=request.max_rank,
        target_modules="^(?:" + "|".join(re.escape(p) for p in paths) + ")$",
        lora_dropout=getattr(base, "lora_dropout", 0.0),
        use_rslora=getattr(base, "use_rslora", False),
        inference_mode=getattr(base, "inference_mode", False),
    )
    inject_adapter_in_model(config, root, adapter_name=adapter_name, low_cpu_mem_usage=True)


def _activate(layer: _Layer, names: list[str]) -> None:
    """Slot adapters become active next to slot 0 (zero weights: outputs do not change). On a
    layer that had the adapter loaded, whether slot 0 is active stays as the user left it."""
    module = layer.module
    active = list(module.active_adapters) if layer.loaded else []
    wanted = [*active, *(n for n in names[0 if not layer.loaded else 1 :] if n not in active)]
    if wanted != list(module.active_adapters):
        module._active_adapter = wanted


def _install(layer: _Layer, position: int, k: int, adapter_name: str, max_rank: int) -> LoraSlot:
    """Put slot ``k``'s padded weights into the layer and its scaling into a tensor."""
    module = layer.module
    module_A, module_B = module.lora_A[adapter_name], module.lora_B[adapter_name]
    requires_grad = module_A.weight.requires_grad
    if k == 0 and layer.padded is not None:
        lora_A, lora_B = layer.padded
    else:
        lora_A, lora_B = _zeros_like_layer(layer, module_A, module_B, max_rank)
    module_A.weight = torch.nn.Parameter(lora_A, requires_grad=requires_grad)
    module_B.weight = torch.nn.Parameter(lora_B, requires_grad=requires_grad)
    # Keep the modules' own description of their shape true (repr, PEFT introspection).
    if isinstance(module_A, torch.nn.Conv2d):
        module_A.out_channels = module_B.in_channels = lora_A.shape[0]
    else:
        module_A.out_features = module_B.in_features = lora_A.shape[0]
    scaling = module.scaling[adapter_name]
    if not (k == 0 and layer.loaded and isinstance(scaling, torch.Tensor)):
        value = layer.scaling if k == 0 else 0.0
        scaling = torch.tensor(value, device=lora_A.device)
        module.scaling[adapter_name] = scaling
    return LoraSlot(
        name=layer.name,
        lora_A=module_A.weight,
        lora_B=module_B.weight,
        scaling=scaling,
        groups=layer.groups,
        component=layer.component,
        slot=k,
        adapter=adapter_name,
        position=position,
    )


def _zeros_like_layer(
    layer: _Layer, module_A: torch.nn.Module, module_B: torch.nn.Module, max_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero ``lora_A`` / ``lora_B`` of the shapes PEFT gave a rank-``max_rank`` adapter here, in
    the dtype of the layer's loaded LoRA (else its base weight) and on its base weight's device."""
    base_weight = _base_layer(layer.module).weight
    like = layer.padded[0] if layer.padded is not None else base_weight
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    shape_A, shape_B = module_A.weight.shape, module_B.weight.shape
    assert shape_A[0] == max_rank, (layer.name, shape_A)
    return (
        torch.zeros(shape_A, dtype=dtype, device=base_weight.device),
        torch.zeros(shape_B, dtype=dtype, device=base_weight.device),
    )
