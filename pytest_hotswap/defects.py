"""The known upstream defects of the built-in implementations: per conformance scenario, how each
shows, why, the versions it was verified on and, for a defect only some pipelines show, the
pipeline trait it needs (``KnownDefect.only_with``). ``pytest_hotswap.implementations`` gives each
implementation its table; nothing here imports torch, diffusers or PEFT.
"""

from __future__ import annotations

from pytest_hotswap.adapters.loading import TEXT_ENCODER_OUTSIDE_KEY_TABLES
from pytest_hotswap.stacks import VERIFIED, KnownDefect

_RANK_PATTERN_DEFECT = (
    "PEFT's hotswap_adapter_from_state_dict looks rank_pattern / alpha_pattern up with the "
    "parameter key ('<layer>.lora_A.<adapter>.weight'), which no pattern matches, so every layer "
    "is scaled lora_alpha / r: a layer with its own rank or alpha gets the wrong scaling, and the "
    "output is not that of a plain load (huggingface/peft#3738, fixed on PEFT's main by #3752)"
)


_SET_ADAPTERS_RECOMPILES = (
    "set_adapters writes each adapter's weight into PEFT's scaling as a Python float, which "
    "dynamo guards on: switching a slot off or on, or any new weight, recompiles "
    "(huggingface/diffusers#11408)"
)
_SET_ADAPTERS_AFTER_HOTSWAP = (
    "PEFT's hotswap writes the new adapter's scaling but keeps the replaced adapter's lora_alpha "
    "and r, from which set_adapters computes every later weight: the swapped-in adapter is "
    "scaled with the old one's alpha / r, so the output is not that of a plain load (and each "
    "new weight recompiles, huggingface/diffusers#11408)"
)
_TEXT_ENCODER_KEY_TABLES = (
    "diffusers' text-encoder loader (_load_lora_into_text_encoder, loaders/lora_base.py) converts "
    "a text encoder's LoRA keys with tables that know only CLIP's layer names "
    "(convert_state_dict_to_diffusers, then convert_state_dict_to_peft, "
    "utils/state_dict_utils.py): PEFT keys of a text encoder without those names (Chroma's T5: "
    "SelfAttention.q ...), as get_peft_model_state_dict and the pipeline's own save_lora_weights "
    "write them, raise 'Could not automatically infer state dict type', so the plain load of a "
    "text-encoder adapter fails, though the loader declares the text encoder loadable "
    "(FluxLoraLoaderMixin for Chroma; only the older lora_linear_layer keys with adapter "
    "metadata load); no upstream issue found"
)

DIFFUSERS_DEFECTS = (
    KnownDefect(
        "rank_over_max",
        "diffusers/PEFT do not refuse an adapter above enable_lora_hotswap(target_rank): the "
        "LoRA parameter silently grows and the next call recompiles",
        KnownDefect.NOT_REJECTED,
        verified=VERIFIED,
    ),
    KnownDefect(
        "superset_targets",
        "PEFT refuses keys the first adapter lacks, then diffusers' load_lora_adapter deletes "
        "the loaded adapter: the next call recompiles and runs without any LoRA",
        KnownDefect.MODEL_CHANGED,
        verified=VERIFIED,
    ),
    KnownDefect(
        "text_encoder_keys",
        "load_lora_weights(hotswap=True) swaps the denoiser first and fails on the "
        "text-encoder keys only afterwards: the model is left half-swapped",
        KnownDefect.MODEL_CHANGED,
        verified=VERIFIED,
    ),
    KnownDefect(
        "rank_pattern",
        _RANK_PATTERN_DEFECT,
        KnownDefect.WRONG_OUTPUT,
        verified=VERIFIED,
    ),
    KnownDefect(
        "other_tuner",
        "PEFT refuses a DoRA adapter in a hotswap, then diffusers' load_lora_adapter deletes "
        "the loaded adapter: the next call recompiles and runs without any LoRA",
        KnownDefect.MODEL_CHANGED,
        verified=VERIFIED,
    ),
    KnownDefect(
        "strength_change",
        "diffusers changes LoRA strength through a Python float (the `scale` call argument): "
        "every new value recompiles",
        KnownDefect.RECOMPILES,
        verified=VERIFIED,
    ),
    KnownDefect(
        "two_adapters", _SET_ADAPTERS_AFTER_HOTSWAP, KnownDefect.WRONG_OUTPUT, verified=VERIFIED
    ),
    # Reproduced on torch 2.13 and newer only: on torch 2.11.0 switching the slot does not
    # recompile (`make stacks TORCH=2.11.0`, 2026-12-07, the oldest and pinned stacks), so there
    # the cell is not strict and reads "fixed upstream?".
    KnownDefect(
        "slot_off_on",
        _SET_ADAPTERS_RECOMPILES,
        KnownDefect.RECOMPILES,
        verified={**VERIFIED, "torch": ">=2.13"},
    ),
)

PEFT_DEFECTS = (
    KnownDefect(
        "rank_over_max",
        "PEFT's hotswap_adapter_from_state_dict does not refuse a rank above the prepared "
        "target_rank: the LoRA parameter grows and the next call recompiles",
        KnownDefect.NOT_REJECTED,
        verified={"peft": VERIFIED["peft"]},
    ),
    KnownDefect(
        "rank_pattern",
        _RANK_PATTERN_DEFECT,
        KnownDefect.WRONG_OUTPUT,
        verified={"peft": VERIFIED["peft"]},
    ),
    KnownDefect(
        "strength_change",
        "PEFT sets strength with LoraLayer.set_scale, which writes a Python float over the "
        "scaling tensor: every new value recompiles",
        KnownDefect.RECOMPILES,
        verified={"peft": VERIFIED["peft"]},
    ),
)

#: The reference loads its first adapter (text encoders' LoRA included) through the pipeline's
#: own loader, as a user does, then pads it: it shows the loader's defects in that load.
REFERENCE_DEFECTS = (
    KnownDefect(
        "text_encoder_hotswap",
        _TEXT_ENCODER_KEY_TABLES,
        KnownDefect.LOAD_FAILS,
        verified={"diffusers": "==0.42.1"},  # reproduced on the pinned stack only
        only_with=TEXT_ENCODER_OUTSIDE_KEY_TABLES,
    ),
)
