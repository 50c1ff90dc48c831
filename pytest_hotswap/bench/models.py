"""Flux-shaped transformers of realistic widths and depths, their adapters and their swaps.

The anchor shapes of DESIGN.md "Measuring": the tiny test Flux, Flux's real widths (hidden 3072 =
24 heads x 128) with 1 double + 2 single blocks, and Flux's real depth (19 + 38 blocks) at a narrow
width. Every attention and MLP linear of every block is adapted, as in a typical Flux LoRA.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.pipelines import FLUX_CONFIG

ADAPTER = "default"
Swap = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], None]
#: Attention projections and MLP linears of Flux's double and single blocks (not the AdaLN ones).
_ATTENTION_AND_MLP = re.compile(
    r"(transformer_blocks|single_transformer_blocks)\.\d+\."
    r"(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out)"
)


@dataclasses.dataclass(frozen=True)
class FluxShape:
    """A FluxTransformer2DModel config and the token counts of the call used to time it."""

    name: str
    config: dict[str, Any]
    image_tokens: int = 16
    text_tokens: int = 48

    @property
    def hidden(self) -> int:
        return self.config["attention_head_dim"] * self.config["num_attention_heads"]

    @property
    def label(self) -> str:
        """What the table's ``shape`` column says: ``hidden 3072, 1+2 blocks``."""
        c = self.config
        return f"hidden {self.hidden}, {c['num_layers']}+{c['num_single_layers']} blocks"


def _flux(
    name: str, heads: int, head_dim: int, double: int, single: int, **extra: Any
) -> FluxShape:
    axes = {128: [16, 56, 56], 64: [8, 28, 28], 32: [8, 12, 12], 16: [4, 4, 8]}[head_dim]
    config = {
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 32,
        "axes_dims_rope": axes,
    }
    return FluxShape(name, config | extra, image_tokens=16, text_tokens=8)


TINY = FluxShape("tiny-flux", dict(FLUX_CONFIG))


def flux_shapes(smoke: bool) -> list[FluxShape]:
    """Tiny, wide and deep; in smoke mode the wide and deep ones shrink to a few MB."""
    if smoke:
        return [TINY, _flux("flux-wide", 4, 64, 1, 2), _flux("flux-deep", 2, 16, 4, 8)]
    return [TINY, _flux("flux-wide", 24, 128, 1, 2), _flux("flux-deep", 4, 32, 19, 38)]


def build_flux(shape: FluxShape, config: BenchConfig) -> torch.nn.Module:
    """The model with seeded pseudo-random weights, in eval mode, on the bench's device and dtype.

    Weights are tiled from a seeded 1 Mi-value pool instead of drawn one by one: timing depends on
    shapes and on finite, normal-range values, and a full init of Flux's widths costs ~9 s per core.
    """
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**shape.config)
    model = model.to_empty(device=config.device)
    generator = torch.Generator().manual_seed(config.seed)
    pool = (torch.randn(1 << 20, generator=generator) * 0.02).to(config.device)
    with torch.no_grad():
        for param in model.parameters():
            flat = param.view(-1)
            for start in range(0, flat.numel(), pool.numel()):
                chunk = flat[start : start + pool.numel()]
                chunk.copy_(pool[: chunk.numel()])
    if config.torch_dtype != torch.float32:  # diffusers warns on every cast, even a no-op one
        model = model.to(config.torch_dtype)
    return model.eval().requires_grad_(False)


def sharing_weights(model: torch.nn.Module, shape: FluxShape) -> torch.nn.Module:
    """A second model of ``shape`` whose base weights are ``model``'s own tensors (no copy).

    For configurations timed side by side (padded ranks, slot counts): each gets its own LoRA
    layers on the same base weights, so the wide shape does not need its 2 GiB once per
    configuration. Call it before loading any adapter into ``model``.
    """
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        twin = FluxTransformer2DModel(**shape.config)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval().requires_grad_(False)


def flux_call(shape: FluxShape, config: BenchConfig) -> dict[str, torch.Tensor]:
    """Keyword arguments of one transformer call for ``shape``."""
    c = shape.config
    g = torch.Generator().manual_seed(config.seed)
    dev, dt = config.device, config.torch_dtype
    return {
        "hidden_states": torch.randn(1, shape.image_tokens, c["in_channels"], generator=g).to(
            dev, dt
        ),
        "encoder_hidden_states": torch.randn(
            1, shape.text_tokens, c["joint_attention_dim"], generator=g
        ).to(dev, dt),
        "pooled_projections": torch.randn(1, c["pooled_projection_dim"], generator=g).to(dev, dt),
        "timestep": torch.tensor([1.0], device=dev, dtype=dt),
        "img_ids": torch.zeros(shape.image_tokens, 3, device=dev, dtype=dt),
        "txt_ids": torch.zeros(shape.text_tokens, 3, device=dev, dtype=dt),
    }


def attention_and_mlp_targets(model: torch.nn.Module) -> list[str]:
    from pytest_hotswap.adapters import lora_targets

    return [name for name in lora_targets(model) if _ATTENTION_AND_MLP.fullmatch(name)]


def make_adapter(
    model: torch.nn.Module, rank: int, seed: int, workdir: Path, config: BenchConfig
) -> dict[str, torch.Tensor]:
    """A random LoRA of ``rank`` on every attention and MLP linear, as a diffusers state dict
    (``transformer.`` keys) already on the bench's device and dtype, so swaps time no transfer."""
    from safetensors.torch import load_file

    from pytest_hotswap.adapters import make_lora

    targets = attention_and_mlp_targets(model)
    path = make_lora(
        model, workdir / f"r{rank}_s{seed}.safetensors", rank=rank, targets=targets, seed=seed
    )
    return {k: v.to(config.device, config.torch_dtype) for k, v in load_file(path).items()}


def lora_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """The LoRA A and B weights of the adapter, as PEFT holds them (padded when prepared)."""
    return [p for n, p in model.named_parameters() if re.search(r"\.lora_[AB]\.", n)]


def load_adapter(
    model: torch.nn.Module, lora: Mapping[str, torch.Tensor], max_rank: int | None
) -> None:
    """Load the first adapter the diffusers way; ``max_rank`` pads it for hotswapping."""
    if max_rank is not None:
        model.enable_lora_hotswap(target_rank=max_rank)
    model.load_lora_adapter(dict(lora), prefix="transformer", adapter_name=ADAPTER)


def diffusers_hotswap(model: torch.nn.Module, lora: Mapping[str, torch.Tensor]) -> None:
    """diffusers' ``load_lora_adapter(..., hotswap=True)`` (what ``pipe.load_lora_weights(...,
    hotswap=True)`` runs for the denoiser): key conversion, two ``state_dict()`` calls, then
    PEFT's ``hotswap_adapter_from_state_dict``."""
    model.load_lora_adapter(dict(lora), prefix="transformer", adapter_name=ADAPTER, hotswap=True)


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
    """An adapter as PEFT's ``hotswap_adapter_from_state_dict`` takes it: PEFT keys with the
    adapter name, and its ``LoraConfig``. Converted once, outside any timing."""

    state_dict: dict[str, torch.Tensor]
    config: Any


def peft_adapter(lora: Mapping[str, torch.Tensor]) -> PeftAdapter:
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

    from pytest_hotswap.pipelines import read_peft_adapter

    state_dict, config = read_peft_adapter(lora)
    state_dict = _insert_adapter_name_into_state_dict(
        state_dict, adapter_name=ADAPTER, parameter_prefix="lora_"
    )
    return PeftAdapter(state_dict, config)


def peft_function_hotswap(model: torch.nn.Module, adapter: PeftAdapter) -> None:
    """PEFT's own ``hotswap_adapter_from_state_dict``, nothing around it."""
    from peft.utils.hotswap import hotswap_adapter_from_state_dict

    hotswap_adapter_from_state_dict(model, adapter.state_dict, ADAPTER, adapter.config)


def reload(model: torch.nn.Module, lora: Mapping[str, torch.Tensor]) -> None:
    """Swap without hotswap: unload every LoRA layer, then load the new adapter unpadded."""
    model.unload_lora()
    load_adapter(model, lora, max_rank=None)


def forward(model: torch.nn.Module, call: Mapping[str, torch.Tensor]) -> Callable[[], None]:
    """A no-grad call of ``model`` with ``call``, as a timing closure."""

    def run() -> None:
        with torch.no_grad():
            model(**call)

    return run
