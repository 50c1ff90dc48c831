"""The implementations' own refusals: what each cannot do is a clear UnsupportedFeatureError,
raised before anything is loaded or compiled."""

from __future__ import annotations

import types

import pytest
import torch

from pytest_hotswap.implementations import (
    DiffusersImplementation,
    Preparation,
    ReferenceImplementation,
    UnsupportedFeatureError,
    get,
)
from pytest_hotswap.pipelines import PipelineSpec


def _bare_spec() -> PipelineSpec:
    model = torch.nn.Linear(4, 4)
    return PipelineSpec(name="bare", denoiser=model, run=lambda **_: model(torch.ones(1, 4)))


def test_diffusers_slots_need_a_diffusers_pipeline() -> None:
    with pytest.raises(UnsupportedFeatureError) as error:
        DiffusersImplementation().load_slots(
            _bare_spec(), "first.safetensors", Preparation(8, slots=2)
        )
    assert str(error.value) == (
        "the 'diffusers' implementation has adapter slots only through a diffusers pipeline's "
        "set_adapters; use implementation 'reference' for a bare model"
    )


def test_a_slot_strength_without_slots_is_refused() -> None:
    pipeline = types.SimpleNamespace(name="sd", spec=_bare_spec())
    impl = DiffusersImplementation()
    with pytest.raises(UnsupportedFeatureError, match=r"^sd: no adapter slots were prepared$"):
        impl.strength(pipeline, 0.5, slot=1)


@pytest.mark.parametrize(
    ("name", "preparation", "message"),
    [
        ("peft", Preparation(8, slots=2), "does not support adapter slots"),
        ("diffusers", Preparation(8, text_encoder=True), "does not support text-encoder hotswap"),
    ],
)
def test_check_names_what_is_missing(name, preparation, message) -> None:
    with pytest.raises(UnsupportedFeatureError, match=message):
        get(name).check(preparation)


def test_check_accepts_what_is_supported() -> None:  # negative control
    get("diffusers").check(Preparation(8, slots=2))
    ReferenceImplementation().check(Preparation(8, targets=("x",), text_encoder=True, slots=3))
