"""The pinned stack works together: transformers' adapter methods accept the pinned PEFT.

transformers 5.24 requires peft >= 0.22 (unreleased) for its adapter methods, which diffusers
calls to load text-encoder LoRA; constraints.txt pins 5.23. This fails if the pins drift apart.
"""

from __future__ import annotations

import importlib.metadata

import torch
from packaging.version import Version

from pytest_hotswap import pipelines
from pytest_hotswap.adapters import make_lora


def test_transformers_accepts_the_installed_peft():
    from transformers.integrations.peft import MIN_PEFT_VERSION

    assert Version(importlib.metadata.version("peft")) >= Version(MIN_PEFT_VERSION)


def test_text_encoder_lora_loads_through_transformers_adapter_methods(tmp_path):
    pipe = pipelines.build_tiny_sd_pipeline()
    tokens = torch.arange(7).unsqueeze(0)
    with torch.no_grad():
        before = pipe.text_encoder(tokens)[0]
    pipe.load_lora_weights(str(make_lora(pipe, tmp_path, rank=4, text_encoder=True, seed=1)))
    assert "default_0" in pipe.text_encoder.peft_config  # transformers' PeftAdapterMixin
    with torch.no_grad():
        after = pipe.text_encoder(tokens)[0]
    assert not torch.allclose(before, after), "the text-encoder LoRA did not change its output"
