"""Issue 14, one test per malformed input: each is a ``HotswapError`` naming the key or field, what
was expected and what was found, and leaves the compiled model bit-for-bit as it was (same tensor
objects and storage), still running without a recompile. Run on a tiny SD UNet and a tiny Flux
transformer; the fuzz tests in test_fuzz_reference.py search the same space at random."""

from __future__ import annotations

import warnings

import pytest
import torch
from reference_support import ARCHS, Served, write_with_metadata

from pytest_hotswap.adapters import make_lora
from pytest_hotswap.reference import (
    HotswapError,
    InvalidAdapterError,
    hotswap,
    prepare_for_hotswap,
    set_lora_scale,
)

# Its module fixtures are built once, on one worker.
pytestmark = [
    pytest.mark.usefixtures("reference_compile_environment"),
    pytest.mark.xdist_group("reference_inputs"),
]

MAX_RANK = 8


@pytest.fixture(scope="module", params=list(ARCHS))
def served(request, tmp_path_factory) -> Served:
    arch = ARCHS[request.param]
    return Served.build(arch, tmp_path_factory.mktemp(arch.name), MAX_RANK, rank=4, alpha=4)


def _refused(served: Served, call, error: type, match: str) -> HotswapError:
    check = served.untouched()
    with pytest.raises(error, match=match) as info:
        call()
    check()
    return info.value


def _metadata(served: Served, **fields) -> dict:
    """The first adapter's metadata with ``fields`` set for the denoiser (prefixed keys)."""
    prefix = served.arch.prefix
    return {**served.metadata, **{f"{prefix}.{k}": v for k, v in fields.items()}}


def _file(served: Served, tmp_path, metadata) -> object:
    return write_with_metadata(tmp_path / "adapter.safetensors", served.state, metadata)


def _layer(served: Served) -> str:
    """A targeted layer, as its diffusers keys name it (with the component prefix)."""
    return next(iter(served.state)).rsplit(".lora_", 1)[0]


@pytest.mark.slow
def test_the_served_model_swaps_its_first_adapter_back(served) -> None:
    """Positive control: a valid file swaps in, and the model compares equal to itself."""
    check = served.untouched()
    hotswap(served.compiled, served.first)
    check()


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("lora_alpha", "x", "a finite number"),
        ("lora_alpha", None, "a finite number"),
        ("lora_alpha", [4], "a finite number"),
        ("r", "4", "an integer >= 1"),
        ("rank_pattern", [1], "an object mapping module-name patterns"),
        ("alpha_pattern", "abc", "an object mapping module-name patterns"),
        ("alpha_pattern", {"x": "2"}, "finite numbers"),
        ("use_rslora", "yes", "true or false"),
    ],
)
def test_metadata_field_of_the_wrong_type(served, tmp_path, field, value, expected) -> None:
    path = _file(served, tmp_path, _metadata(served, **{field: value}))
    error = _refused(served, lambda: hotswap(served.compiled, path), InvalidAdapterError, expected)
    assert f"field '{served.arch.prefix}.{field}" in str(error)
    shown = next(iter(value.values())) if isinstance(value, dict) else value
    assert f"is {shown!r}" in str(error)
    assert "Write the adapter again with diffusers or PEFT" in str(error)


@pytest.mark.parametrize("metadata", [5, "abc", [1, 2]], ids=["number", "string", "list"])
def test_metadata_that_is_not_an_object(served, tmp_path, metadata) -> None:
    path = _file(served, tmp_path, metadata)
    kind = type(metadata).__name__
    _refused(
        served,
        lambda: hotswap(served.compiled, path),
        InvalidAdapterError,
        rf"lora_adapter_metadata is a JSON {kind}, not an object of LoraConfig fields",
    )


@pytest.mark.parametrize("field", ["alpha_pattern", "rank_pattern"])
def test_pattern_key_that_is_not_a_regular_expression(served, tmp_path, field) -> None:
    path = _file(served, tmp_path, _metadata(served, **{field: {"(": 2}}))
    _refused(
        served,
        lambda: hotswap(served.compiled, path),
        InvalidAdapterError,
        rf"field '{served.arch.prefix}\.{field}' has the key '\(', which is not a valid regular "
        "expression",
    )


def test_alpha_tensor_with_several_values(served) -> None:
    key = f"{_layer(served)}.alpha"
    state = {**served.state, key: torch.tensor([1.0, 2.0])}
    _refused(
        served,
        lambda: hotswap(served.compiled, state),
        InvalidAdapterError,
        rf"{key} holds 2 values \(shape \(2,\)\); a LoRA alpha is one number per layer",
    )


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "meta", "nested"])
def test_sparse_meta_and_nested_tensors(served, kind) -> None:
    key = next(k for k in served.state if ".lora_A." in k and served.state[k].dim() == 2)
    tensor = served.state[key]
    odd = {
        "sparse_coo": lambda: tensor.to_sparse(),
        "sparse_csr": lambda: tensor.to_sparse_csr(),
        "meta": lambda: tensor.to("meta"),
        "nested": lambda: torch.nested.nested_tensor([tensor, tensor]),
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # CSR and nested tensors are "beta"
        state = {**served.state, key: odd()}
    expected = {
        "sparse_coo": "a torch.sparse_coo tensor",
        "sparse_csr": "a torch.sparse_csr tensor",
        "meta": r"a meta tensor \(no data\)",
        "nested": "a nested tensor",
    }[kind]
    _refused(
        served,
        lambda: hotswap(served.compiled, state),
        InvalidAdapterError,
        rf"{key} is {expected}; LoRA weights must be dense, materialized tensors",
    )


def test_absurd_max_rank_is_refused_before_allocating(served) -> None:
    from reference_support import model_checksum, tensor_layout

    model = served.arch.with_lora(served.first)
    checksum, layout = model_checksum(model), tensor_layout(model)
    with pytest.raises(
        HotswapError,
        match=r"max_rank=1099511627776 would pad the LoRA layers to [0-9.e+]+ GiB, more than the "
        r"[0-9.e+]+ GiB of memory on \w+; .* use the largest rank of your adapters, at most \d+",
    ):
        prepare_for_hotswap(model, 2**40)
    assert model_checksum(model) == checksum and tensor_layout(model) == layout


def test_max_rank_above_every_dimension_is_accepted(served) -> None:
    """Wasteful but legal, as in diffusers: a tiny CI model prepared at a production max rank."""
    model = served.arch.with_lora(served.first)
    above = 2 * _largest(model)
    prepare_for_hotswap(model, above)
    assert {
        module.lora_A["default"].weight.shape[0]
        for module in model.modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    } == {above}


def _largest(model: torch.nn.Module) -> int:
    from peft.tuners.lora import LoraLayer

    sizes = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if isinstance(base, torch.nn.Conv2d):
                fan_in = base.in_channels // base.groups * base.kernel_size[0] * base.kernel_size[1]
                sizes.append(max(fan_in, base.out_channels))
            else:
                sizes.append(max(base.in_features, base.out_features))
    return max(sizes)


def test_alpha_finite_in_float64_but_not_in_the_model_dtype(served, tmp_path) -> None:
    path = _file(served, tmp_path, _metadata(served, lora_alpha=1e40))
    _refused(
        served,
        lambda: hotswap(served.compiled, path),
        InvalidAdapterError,
        r"gives a scaling of 2\.5e\+39 \(x weight 1\.0\), which is not finite in the scaling's "
        r"dtype torch\.float32",
    )


def test_float64_alpha_key_that_overflows_float32(served, tmp_path) -> None:
    """Every layer's alpha an fp64 1e300: the Flux key naming, and kohya's for the UNet."""
    if served.arch.name == "flux":
        state = {**served.state}
        for layer in {k.rsplit(".lora_", 1)[0] for k in served.state}:
            state[f"{layer}.alpha"] = torch.tensor(1e300, dtype=torch.float64)
        adapter: object = state
    else:
        import safetensors.torch

        kohya = safetensors.torch.load_file(
            make_lora(served.arch.build(), tmp_path / "kohya.safetensors", rank=4, fmt="kohya")
        )
        for key in [k for k in kohya if k.endswith(".alpha")]:
            kohya[key] = torch.tensor(1e300, dtype=torch.float64)
        adapter = kohya
    _refused(
        served,
        lambda: hotswap(served.compiled, adapter),
        InvalidAdapterError,
        r"scaling of 2\.5e\+299 .* not finite in the scaling's dtype torch\.float32",
    )


@pytest.mark.parametrize("scale", [1e39, 10**400, float("inf"), float("nan")])
def test_strength_that_overflows_the_scaling_dtype(served, scale) -> None:
    match = (
        r"scale 1e\+39 makes the scaling of .* = 1e\+39, which is not finite in its dtype "
        r"torch\.float32 .* use a smaller scale"
        if scale == 1e39
        else "scale must be a finite number"
    )
    _refused(served, lambda: set_lora_scale(served.compiled, scale), HotswapError, match)


def test_strength_that_overflows_only_with_a_large_alpha(served, tmp_path) -> None:
    """The scaling is checked as written (alpha / r x strength), at set_lora_scale and at swap."""
    path = _file(served, tmp_path, _metadata(served, lora_alpha=4e30))
    check = served.untouched()
    set_lora_scale(served.compiled, 1e9)
    try:
        with pytest.raises(
            InvalidAdapterError, match=r"x weight 1000000000\.0\), which is not finite"
        ):
            hotswap(served.compiled, path)
    finally:
        set_lora_scale(served.compiled, 1.0)
    check()
    hotswap(served.compiled, path)
    try:
        with pytest.raises(HotswapError, match=r"makes the scaling of .* not finite"):
            set_lora_scale(served.compiled, 1e9)
    finally:
        hotswap(served.compiled, served.first)
    check()


def test_prefixed_and_unprefixed_copies_of_one_layer_are_ambiguous(served) -> None:
    key = next(iter(served.state))
    bare = key.removeprefix(f"{served.arch.prefix}.")
    state = {**served.state, bare: served.state[key] * 2}
    _refused(
        served,
        lambda: hotswap(served.compiled, state),
        InvalidAdapterError,
        rf"the adapter names the same tensor twice: '{key}' and '{bare}' both mean '{bare}'",
    )
