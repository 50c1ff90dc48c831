"""Measurement 6: what adapter slots cost (issue 16), with the reference.

For N = 1, 2, 4 slots (``prepare_for_hotswap(..., slots=N)``), on the tiny Flux transformer and
the flux-deep shape: the eager forward with every slot filled and weighted 1 (each slot is a
padded LoRA of ``max_rank`` computed on every call), and a swap into the last slot
(``hotswap(..., slot=N-1)``), next to the normal swap of the one-slot model. Every N is its own
model on the same base weights, so forwards and swaps are timed interleaved, ``repeats`` each;
``x_one_slot`` is a ratio per round against N = 1.

Then the text-encoder opt-in (``prepare_for_hotswap(pipe, ..., text_encoder=True)``) on the tiny
Stable Diffusion pipeline, whose CLIP text encoder is tiny (hidden 32, 3 layers); the full run
adds the same pipeline with a CLIP of SD 1.5's text-encoder size (CLIP-L: hidden 768, 12 layers)
in its place. Three pipelines on the same base weights:

* ``no opt-in``: a first adapter without text-encoder keys, prepared without the opt-in (what a
  swap costs today: the UNet only);
* ``unpadded``: the adapter with text-encoder keys loaded by diffusers at its rank, not prepared
  (no hotswap: what the text encoder's LoRA costs at all);
* ``opt-in``: the same adapter, prepared with ``text_encoder=True`` (the text encoder's LoRA
  padded to ``max_rank``).

Timed interleaved, ``repeats`` each: the eager text-encoder forward on a 77-token prompt, and
``hotswap(pipe, ...)`` alternating between two adapters of ``swap_rank`` (UNet keys, plus
text-encoder keys with the opt-in; the UNet part is the same). Ratios are per round against the
``no opt-in`` pipeline.
"""

from __future__ import annotations

import gc
import itertools
from pathlib import Path
from typing import Any

import torch

from pytest_hotswap.bench import models
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result
from pytest_hotswap.bench.timing import interleaved, pooled, ratio
from pytest_hotswap.pipelines.tiny import build_tiny_sd_pipeline, prompt_ids
from pytest_hotswap.reference import hotswap, prepare_for_hotswap, set_lora_scale

SLOTS = (1, 2, 4)
#: The text encoder of the SD pipeline: name -> CLIPTextConfig overrides (None: the tiny
#: pipeline's own CLIP). CLIP-L is SD 1.5's text encoder: hidden 768, 12 layers, 12 heads.
TEXT_ENCODERS: tuple[tuple[str, dict[str, int] | None], ...] = (
    ("tiny-sd", None),
    (
        "tiny-sd + CLIP-L",
        {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "vocab_size": 49408,
        },
    ),
)
PROMPT_TOKENS = 77


def run(config: BenchConfig, workdir: Path) -> Result:
    result = Result(
        "slots",
        f"Adapter slots (reference): eager forward with N slots filled, and a swap into slot N-1, "
        f"LoRA padded to {config.max_rank}, swapped for rank {config.swap_rank}, "
        f"{config.repeats} each, interleaved (ms, median [IQR]; x = ratio per round vs N=1); "
        f"then the text-encoder opt-in on tiny SD: text-encoder forward and pipeline swap "
        f"(x = ratio per round vs the pipeline without the opt-in)",
    )
    shapes = models.flux_shapes(config.smoke)
    for shape in (shapes[0], shapes[2]):  # tiny and deep: the forward's cost per LoRA layer
        result.rows += _measure(shape, config, workdir)
        gc.collect()
    for clip in TEXT_ENCODERS[:1] if config.smoke else TEXT_ENCODERS:
        result.rows += _text_encoder_rows(clip, config, workdir)
        gc.collect()
    return result


def _measure(shape: models.FluxShape, config: BenchConfig, workdir: Path) -> list[dict[str, Any]]:
    base = models.build_flux(shape, config)
    call = models.flux_call(shape, config)
    loras = [
        models.make_adapter(base, config.swap_rank, config.seed + i, workdir, config)
        for i in range(2)
    ]
    by_slots = {n: base if n == SLOTS[0] else models.sharing_weights(base, shape) for n in SLOTS}
    forwards, swaps = {}, {}
    for n, model in by_slots.items():
        models.load_adapter(model, loras[0], None)
        prepare_for_hotswap(model, max_rank=config.max_rank, slots=n)
        for slot in range(1, n):
            hotswap(model, loras[slot % 2], slot=slot)
        set_lora_scale(model, 1.0)  # every slot on
        forwards[n] = models.forward(model, call)
        swaps[n] = _alternating_swap(model, loras, slot=n - 1)
    forward_times = interleaved(forwards, config.device, config.repeats)
    swap_times = interleaved(swaps, config.device, config.repeats)
    return [
        {
            "model": shape.name,
            "shape": shape.label,
            "slots": n,
            "forward_ms": pooled(forward_times[n]),
            "forward_x_one_slot": ratio(forward_times[n], forward_times[SLOTS[0]]),
            "swap_into_slot": n - 1,
            "swap_ms": pooled(swap_times[n]),
            "swap_x_one_slot": ratio(swap_times[n], swap_times[SLOTS[0]]),
        }
        for n in SLOTS
    ]


def _alternating_swap(model: Any, loras: list[Any], slot: int) -> Any:
    sources = itertools.cycle(loras)
    return lambda: hotswap(model, next(sources), slot=slot)


def _sd_pipelines(clip: dict[str, int] | None, config: BenchConfig, count: int) -> list[Any]:
    """``count`` tiny SD pipelines; with ``clip``, their text encoder is a CLIP of that config,
    the same weights in each (no copy)."""
    pipes = [build_tiny_sd_pipeline(config.seed, config.device, config.dtype) for _ in range(count)]
    if clip is None:
        return pipes
    from transformers import CLIPTextModel

    clip_config = pipes[0].text_encoder.config.to_dict() | clip
    torch.manual_seed(config.seed)
    encoder = CLIPTextModel(type(pipes[0].text_encoder.config)(**clip_config))
    encoder = encoder.to(config.device, config.torch_dtype).eval().requires_grad_(False)
    pipes[0].text_encoder = encoder
    for pipe in pipes[1:]:
        with torch.device("meta"):
            twin = CLIPTextModel(encoder.config)
        twin.load_state_dict(encoder.state_dict(), assign=True)
        for name, buffer in encoder.named_buffers():  # the non-persistent ones too
            owner, _, leaf = name.rpartition(".")
            twin.get_submodule(owner)._buffers[leaf] = buffer
        pipe.text_encoder = twin.eval().requires_grad_(False)
    return pipes


def _sd_adapter(
    pipe: Any, seed: int, text_encoder: bool, workdir: Path, config: BenchConfig
) -> Any:
    """A random LoRA of ``swap_rank`` on every UNet layer (and the text encoder's attention),
    as a state dict on the bench's device and dtype."""
    from safetensors.torch import load_file

    from pytest_hotswap.adapters import make_lora

    folder = workdir / f"te_{pipe.text_encoder.config.hidden_size}"
    folder.mkdir(exist_ok=True)
    path = make_lora(pipe, folder, rank=config.swap_rank, text_encoder=text_encoder, seed=seed)
    return {k: v.to(config.device, config.torch_dtype) for k, v in load_file(path).items()}


def _text_encoder_rows(
    clip: tuple[str, dict[str, int] | None], config: BenchConfig, workdir: Path
) -> list[dict[str, Any]]:
    from peft.tuners.lora import LoraLayer

    from pytest_hotswap.pipelines import quiet_diffusers

    name, overrides = clip
    off, unpadded, on = _sd_pipelines(overrides, config, 3)
    plain = [_sd_adapter(off, config.seed + i, False, workdir, config) for i in range(2)]
    with_te = [_sd_adapter(off, config.seed + i, True, workdir, config) for i in range(2)]
    with quiet_diffusers():
        off.load_lora_weights(dict(plain[0]), adapter_name="default")
        unpadded.load_lora_weights(dict(with_te[0]), adapter_name="default")
        on.load_lora_weights(dict(with_te[0]), adapter_name="default")
    prepare_for_hotswap(off, max_rank=config.max_rank)
    prepare_for_hotswap(on, max_rank=config.max_rank, text_encoder=True)
    tokens = prompt_ids(PROMPT_TOKENS, config.seed, config.device)

    def encode(pipe: Any) -> Any:
        def run() -> None:
            with torch.no_grad():
                pipe.text_encoder(tokens)

        return run

    forwards = interleaved(
        {"off": encode(off), "unpadded": encode(unpadded), "on": encode(on)},
        config.device,
        config.repeats,
    )
    sources = {"off": itertools.cycle(plain), "on": itertools.cycle(with_te)}
    swaps = interleaved(
        {
            key: (lambda key=key, pipe=pipe: hotswap(pipe, next(sources[key])))
            for key, pipe in (("off", off), ("on", on))
        },
        config.device,
        config.repeats,
    )
    encoder = off.text_encoder.config
    shape = f"CLIP hidden {encoder.hidden_size}, {encoder.num_hidden_layers} layers"
    layers = sum(isinstance(m, LoraLayer) for m in on.text_encoder.modules())
    rows = []
    for key, text_encoder in (
        ("off", "no opt-in: no LoRA"),
        ("unpadded", f"LoRA rank {config.swap_rank}, unpadded (diffusers load)"),
        ("on", f"opt-in: LoRA padded to {config.max_rank}"),
    ):
        rows.append(
            {
                "model": name,
                "shape": shape,
                "slots": 1,
                "text_encoder": text_encoder,
                "te_lora_layers": 0 if key == "off" else layers,
                "te_forward_ms": pooled(forwards[key]),
                "te_forward_x_no_opt_in": "-"
                if key == "off"
                else ratio(forwards[key], forwards["off"]),
                "swap_ms": pooled(swaps[key]) if key in swaps else "-",
                "swap_x_no_opt_in": ratio(swaps[key], swaps["off"]) if key == "on" else "-",
            }
        )
    return rows
