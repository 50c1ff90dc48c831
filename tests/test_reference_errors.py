"""Refusals of the reference hotswap: the right error, a message that says what to do, and a
model left bit-for-bit as it was, still running its compiled code without recompiling."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from reference_support import ARCHS, model_checksum

from pytest_hotswap.adapters import make_lora
from pytest_hotswap.reference import (
    AdapterNotFoundError,
    AlreadyCompiledError,
    HotswapError,
    InvalidAdapterError,
    NotPreparedError,
    RankTooLargeError,
    ShapeMismatchError,
    TextEncoderLoraError,
    UnexpectedTargetsError,
    hotswap,
    prepare_for_hotswap,
)
from pytest_hotswap.watch import CompileWatcher

# Its module fixtures are built once, on one worker.
pytestmark = [
    pytest.mark.usefixtures("reference_compile_environment"),
    pytest.mark.xdist_group("reference_errors"),
]

MAX_RANK = 8
UNET = ARCHS["unet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The first adapter targets half the UNet's layers, so "all" is a superset."""
    directory = tmp_path_factory.mktemp("adapters")
    unet = UNET.build()
    return {
        "first": make_lora(unet, directory / "first.safetensors", rank=4, targets="half"),
        "ok": make_lora(unet, directory / "ok.safetensors", rank=MAX_RANK, targets="half", seed=1),
        "superset": make_lora(unet, directory / "all.safetensors", rank=4, seed=2),
        "rank_over": make_lora(
            unet, directory / "r16.safetensors", rank=16, targets="half", seed=3
        ),
        "text_encoder": make_lora("sd", directory / "te.safetensors", rank=4, text_encoder=True),
        "kohya_te": make_lora(
            "sd", directory / "kohya_te.safetensors", targets="half", text_encoder=True, fmt="kohya"
        ),
    }


@pytest.fixture(scope="module")
def served(files):
    """A prepared, compiled and warmed-up UNet: (eager model, compiled model, first output)."""
    model = UNET.with_lora(files["first"])
    prepare_for_hotswap(model, MAX_RANK)
    compiled = torch.compile(model, backend="eager")
    with CompileWatcher() as watch, watch.warmup("unet"):
        out = UNET.run(compiled)
    return model, compiled, out


@pytest.fixture(scope="module")
def first_state(files) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(files["first"])


def _assert_refused_untouched(served, call: Callable[[], object], error: type, match: str) -> None:
    model, compiled, out = served
    checksum = model_checksum(model)
    with pytest.raises(error, match=match):
        call()
    assert model_checksum(model) == checksum
    with CompileWatcher() as watch:
        again = UNET.run(compiled)
    assert watch.compiles == 0
    assert torch.equal(again, out)


def _edited(
    state: dict[str, torch.Tensor], key: str, tensor: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {**state, key: tensor}


def _a_key(state: dict[str, torch.Tensor], part: str = "A", conv: bool = False) -> str:
    return next(k for k in sorted(state) if f".lora_{part}." in k and (state[k].dim() == 4) == conv)


@pytest.mark.slow
def test_the_served_model_swaps_fine(served, files) -> None:
    """Positive control for the refusals below: a valid adapter goes through."""
    model, compiled, out = served
    checksum = model_checksum(model)
    hotswap(compiled, files["ok"])
    assert model_checksum(model) != checksum
    with CompileWatcher() as watch:
        assert not torch.equal(UNET.run(compiled), out)
    assert watch.compiles == 0
    hotswap(compiled, files["first"])
    assert model_checksum(model) == checksum


def test_rank_above_max_names_key_rank_and_max(served, files) -> None:
    _assert_refused_untouched(
        served,
        lambda: hotswap(served[1], files["rank_over"]),
        RankTooLargeError,
        r"lora_A\.weight: rank 16 is above max_rank=8; prepare the model with max_rank >= 16",
    )


@pytest.mark.slow
def test_superset_targets_are_listed(served, files) -> None:
    _assert_refused_untouched(
        served,
        lambda: hotswap(served[1], files["superset"]),
        UnexpectedTargetsError,
        r"keys of the new adapter have no prepared LoRA layer: \['",
    )


def test_wrong_component_prefix_is_an_unexpected_target(served, first_state) -> None:
    state = {**first_state, "transformer.x_embedder.lora_A.weight": torch.zeros(4, 4)}
    _assert_refused_untouched(
        served, lambda: hotswap(served[1], state), UnexpectedTargetsError, "transformer.x_embedder"
    )


@pytest.mark.parametrize("name", ["text_encoder", "kohya_te"])
def test_text_encoder_keys_in_any_naming(served, files, name) -> None:
    _assert_refused_untouched(
        served,
        lambda: hotswap(served[1], files[name]),
        TextEncoderLoraError,
        "text-encoder keys .* only the denoiser is hotswapped",
    )


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv2d"])
def test_wrong_non_rank_dimension_names_key_and_shapes(served, first_state, conv) -> None:
    key = _a_key(first_state, conv=conv)
    tensor = first_state[key]
    bad = torch.zeros(tensor.shape[0], tensor.shape[1] + 1, *tensor.shape[2:])
    _assert_refused_untouched(
        served,
        lambda: hotswap(served[1], _edited(first_state, key, bad)),
        ShapeMismatchError,
        rf"{key.removeprefix('unet.')}: expected shape \(rank, {tensor.shape[1]}",
    )


def test_lora_B_rank_must_match_lora_A(served, first_state) -> None:
    key = _a_key(first_state, part="B")
    bad = torch.zeros(first_state[key].shape[0], 3)
    _assert_refused_untouched(
        served,
        lambda: hotswap(served[1], _edited(first_state, key, bad)),
        ShapeMismatchError,
        r"lora_B\.weight: expected shape \(\d+, 4\) \(rank 4 from lora_A\)",
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values(served, first_state, value) -> None:
    key = _a_key(first_state, part="B")
    bad = first_state[key].clone()
    bad[0, 0] = value
    _assert_refused_untouched(
        served,
        lambda: hotswap(served[1], _edited(first_state, key, bad)),
        InvalidAdapterError,
        rf"{key.removeprefix('unet.')} has non-finite values",
    )


def test_values_that_overflow_the_model_dtype(served, first_state) -> None:
    key = _a_key(first_state)
    bad = first_state[key].double()
    bad[0, 0] = 1e300  # finite in float64, inf once cast to the model's float32
    _assert_refused_untouched(
        served,
        lambda: hotswap(served[1], _edited(first_state, key, bad)),
        InvalidAdapterError,
        "too large for torch.float32",
    )


def test_integer_weights(served, first_state) -> None:
    key = _a_key(first_state)
    bad = first_state[key].to(torch.int32)
    _assert_refused_untouched(
        served,
        lambda: hotswap(served[1], _edited(first_state, key, bad)),
        InvalidAdapterError,
        "dtype torch.int32; LoRA weights are floating point",
    )


def test_pickle_and_bin_files_are_refused(served, first_state, tmp_path) -> None:
    path = tmp_path / "adapter.bin"
    with path.open("wb") as handle:
        pickle.dump(first_state, handle)
    _assert_refused_untouched(
        served, lambda: hotswap(served[1], path), InvalidAdapterError, "is a pickle .* can run code"
    )
    other = tmp_path / "adapter.bin"
    other.write_bytes(safetensors.torch.save(first_state))
    _assert_refused_untouched(
        served, lambda: hotswap(served[1], other), InvalidAdapterError, "only .safetensors"
    )


def test_truncated_and_missing_files(served, files, tmp_path) -> None:
    data = files["ok"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    _assert_refused_untouched(
        served, lambda: hotswap(served[1], truncated), InvalidAdapterError, "truncated or corrupt"
    )
    _assert_refused_untouched(
        served,
        lambda: hotswap(served[1], tmp_path / "nope.safetensors"),
        InvalidAdapterError,
        "no such file",
    )


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "Path"])
def test_a_path_with_a_nul_byte_is_an_invalid_adapter(served, tmp_path, as_path) -> None:
    """pathlib raises ValueError('embedded null byte') on such a path; the reference says what
    is wrong with it like for any other unreadable path (issue 22, item 6)."""
    text = f"{tmp_path}/style\0.safetensors"
    path = Path(text) if as_path else text
    _assert_refused_untouched(
        served,
        lambda: hotswap(served[1], path),
        InvalidAdapterError,
        r"'.*/style\\x00\.safetensors': the path holds a NUL byte, which no file name can; "
        "check how the path was built",
    )


def test_half_a_layer(served, first_state) -> None:
    key = _a_key(first_state, part="B")
    state = {k: v for k, v in first_state.items() if k != key}
    _assert_refused_untouched(
        served,
        lambda: hotswap(served[1], state),
        InvalidAdapterError,
        "has no lora_B.weight for this layer",
    )


@pytest.mark.parametrize("name", ["defaul", "default_0", "Default"])
def test_adapter_name_must_match_exactly(served, files, name) -> None:
    _assert_refused_untouched(
        served,
        lambda: hotswap(served[1], files["ok"], adapter_name=name),
        AdapterNotFoundError,
        rf"no adapter named '{name}' is prepared .*prepared: \['default'\]",
    )


def test_prepare_on_a_compiled_model(served, files) -> None:
    _assert_refused_untouched(
        served,
        lambda: prepare_for_hotswap(served[1], MAX_RANK),
        AlreadyCompiledError,
        "call prepare_for_hotswap before torch.compile",
    )
    model = UNET.with_lora(files["first"])
    model.compile(backend="eager")
    checksum = model_checksum(model)
    with pytest.raises(AlreadyCompiledError):
        prepare_for_hotswap(model, MAX_RANK)
    assert model_checksum(model) == checksum


def test_prepare_again_with_another_max_rank(served) -> None:
    _assert_refused_untouched(
        served,
        lambda: prepare_for_hotswap(served[0], 2 * MAX_RANK),
        HotswapError,
        "already prepared with max_rank=8",
    )


def test_unprepared_and_lora_free_models(files) -> None:
    loaded = UNET.with_lora(files["first"])
    checksum = model_checksum(loaded)
    with pytest.raises(NotPreparedError, match="call prepare_for_hotswap"):
        hotswap(loaded, files["ok"])
    with pytest.raises(AdapterNotFoundError, match=r"loaded: \['default'\]"):
        prepare_for_hotswap(loaded, MAX_RANK, adapter_name="default_0")
    with pytest.raises(
        RankTooLargeError, match="rank 4, above max_rank=2; prepare with max_rank >= 4"
    ):
        prepare_for_hotswap(loaded, 2)
    assert model_checksum(loaded) == checksum
    with pytest.raises(NotPreparedError, match="has no LoRA loaded"):
        prepare_for_hotswap(UNET.build(), MAX_RANK)


@pytest.mark.parametrize("remove", ["unload_lora", "delete_adapters"])
def test_an_adapter_loaded_again_after_prepare_must_be_prepared_again(files, remove) -> None:
    """After unload / delete and a new load the index points at detached tensors: a swap would
    report success and change nothing, so it is refused until prepare_for_hotswap runs again."""
    from pytest_hotswap.reference import set_lora_scale

    model = UNET.with_lora(files["first"])
    prepare_for_hotswap(model, MAX_RANK)
    getattr(model, remove)(*(["default"] if remove == "delete_adapters" else []))
    model.load_lora_adapter(
        str(files["ok"]), prefix=UNET.prefix, adapter_name="default", use_safetensors=True
    )
    checksum = model_checksum(model)
    compiled = torch.compile(model, backend="eager")  # never run: nothing compiles here
    for call in (
        lambda: hotswap(compiled, files["first"]),
        lambda: hotswap(model, files["first"]),
        lambda: set_lora_scale(model, 0.5),
    ):
        with pytest.raises(NotPreparedError, match="call prepare_for_hotswap again on the eager"):
            call()
    assert model_checksum(model) == checksum
    with pytest.raises(AlreadyCompiledError):
        prepare_for_hotswap(compiled, MAX_RANK)

    prepare_for_hotswap(model, MAX_RANK)  # the adapter loaded now, padded and indexed
    hotswap(compiled, files["first"])
    torch.testing.assert_close(UNET.run(model), UNET.run(UNET.with_lora(files["first"])))
