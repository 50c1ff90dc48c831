"""Fuzzing the reference hotswap with malformed adapters (issue 14).

The one fuzzer of malformed adapters. Hypothesis builds adapters that are wrong in one to three
ways, as state dicts, as files and as truncated files, and adapter metadata with fields of the
wrong type, invalid patterns and overflowing alphas. Every one must raise a ``HotswapError`` and leave the compiled tiny UNet /
Flux transformer bit-for-bit as it was, with the same tensor objects and storage, still giving
its first output without a recompile.

The example budget is fixed for CI (the whole file runs in about 20-30 s on one core); set
``HOTSWAP_FUZZ_EXAMPLES=1000`` for a longer search.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reference_support import ARCHS, Served, write_with_metadata

from pytest_hotswap.adapters import lora_targets
from pytest_hotswap.reference import HotswapError, hotswap

# Its module fixtures are built once, on one worker.
pytestmark = [
    pytest.mark.usefixtures("reference_compile_environment"),
    pytest.mark.xdist_group("fuzz_reference"),
]

MAX_RANK = 8
RANK = 4
EXAMPLES = int(os.environ.get("HOTSWAP_FUZZ_EXAMPLES", "30"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module", params=list(ARCHS))
def served(request, tmp_path_factory) -> Served:
    arch = ARCHS[request.param]
    return Served.build(arch, tmp_path_factory.mktemp(arch.name), MAX_RANK, rank=RANK, alpha=RANK)


# -- state dicts --------------------------------------------------------------------------------

_STATE_DEFECTS = [
    "shape",
    "extra",
    "unknown_part",
    "non_finite",
    "overflow",
    "rank",
    "zero_rank",
    "text_encoder",
    "dtype",
    "alpha_values",
    "alpha_non_finite",
    "alpha_huge",
    "sparse",
    "meta",
    "nested",
    "duplicate",
    "half_layer",
    "not_a_tensor",
    "key_not_str",
]
#: Defects a safetensors file cannot hold: those adapters are passed as state dicts.
_DICT_ONLY = {"sparse", "meta", "nested", "not_a_tensor", "key_not_str"}
_TEXT_ENCODER_KEYS = [
    "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight",
    "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
]

_DEFECTS = st.lists(
    st.tuples(
        st.sampled_from(_STATE_DEFECTS),
        st.integers(0, 10**6),  # picks the key (and anything else the defect needs)
        st.integers(1, 8),  # how large the defect is
    ),
    min_size=1,
    max_size=3,
)
_CARRIERS = st.tuples(
    st.sampled_from(["dict", "file", "truncated"]), st.floats(0, 1, exclude_max=True)
)


def _malformed(
    state: dict[Any, Any], prefix: str, targets: list[str], defects: list[tuple[str, int, int]]
) -> dict[Any, Any]:
    """The first adapter (diffusers keys) with ``defects`` applied one after the other;
    ``targets`` are the modules a LoRA may target in the model (without ``prefix``)."""
    state = dict(state)
    for kind, pick, size in defects:
        keys = sorted(k for k in state if isinstance(k, str))
        key = keys[pick % len(keys)]
        tensor = state[key]
        layers = sorted({k.rsplit(".lora_", 1)[0] for k in keys if ".lora_A." in k})
        layer = layers[pick % len(layers)] if layers else f"{prefix}.x"
        if kind == "shape" and isinstance(tensor, torch.Tensor) and tensor.dim() > 1:
            shape = list(tensor.shape)
            shape[1 + pick % (tensor.dim() - 1) if ".lora_A." in key else 0] += size
            state[key] = torch.zeros(shape)
        elif kind == "extra":
            state[f"{prefix}.no_such_layer_{pick}.lora_A.weight"] = torch.zeros(2, 2)
        elif kind == "unknown_part":  # a LoRA part no format has, on a real or unknown layer
            name = [*targets, "no_such.layer"][pick % (len(targets) + 1)]
            state[f"{prefix}.{name}.lora_Z.weight"] = torch.zeros(2, 2)
        elif kind == "non_finite":
            value = (float("nan"), float("inf"), -float("inf"))[size % 3]
            state[key] = torch.full(_shape(tensor), value)
        elif kind == "overflow":  # finite in float64, inf in the model's float32
            big = torch.zeros(_shape(tensor), dtype=torch.float64)
            big.view(-1)[pick % max(big.numel(), 1)] = 10.0 ** (39 + size * 30)
            state[key] = big
        elif kind in ("rank", "zero_rank"):
            rank = MAX_RANK + size if kind == "rank" else 0
            a = state.get(f"{layer}.lora_A.weight", torch.zeros(RANK, 4))
            b = state.get(f"{layer}.lora_B.weight", torch.zeros(4, RANK))
            state[f"{layer}.lora_A.weight"] = torch.zeros(rank, *_shape(a)[1:])
            state[f"{layer}.lora_B.weight"] = torch.zeros(_shape(b)[0], rank, *_shape(b)[2:])
        elif kind == "text_encoder":
            state[_TEXT_ENCODER_KEYS[pick % len(_TEXT_ENCODER_KEYS)]] = torch.zeros(4, 32)
        elif kind == "dtype":
            dtype = (torch.int64, torch.bool, torch.complex64)[size % 3]
            state[key] = torch.zeros(_shape(tensor), dtype=dtype)
        elif kind == "alpha_values":
            state[f"{layer}.alpha"] = torch.ones(size + 1)
        elif kind == "alpha_non_finite":
            state[f"{layer}.alpha"] = torch.tensor((float("nan"), float("inf"))[size % 2])
        elif kind == "alpha_huge":  # every layer: alpha / rank overflows float32
            for name in layers:
                state[f"{name}.alpha"] = torch.tensor(10.0 ** (40 + size * 30), dtype=torch.float64)
        elif kind == "sparse":
            dense = torch.ones(_shape(tensor)) if _shape(tensor) else torch.ones(2, 2)
            state[key] = dense.to_sparse() if size % 2 else dense.to_sparse_csr()
        elif kind == "meta":
            state[key] = torch.empty(_shape(tensor), device="meta")
        elif kind == "nested":
            state[key] = torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)])
        elif kind == "duplicate":
            if key.startswith(f"{prefix}."):
                state[key.removeprefix(f"{prefix}.")] = torch.ones(_shape(tensor))
            else:
                state[f"{prefix}.{key}"] = torch.ones(_shape(tensor))
        elif kind == "half_layer":
            state.pop(f"{layer}.lora_{'AB'[size % 2]}.weight", None)
            if not any(k.startswith(f"{layer}.lora_") for k in state):
                state[f"{layer}.lora_B.weight"] = torch.zeros(4, RANK)
        elif kind == "not_a_tensor":
            state[key] = ([1.0, 2.0], 3, None, "x")[size % 4]
        elif kind == "key_not_str":
            state[pick] = torch.zeros(2, 2)
        else:  # "shape" on a tensor too small to reshape: grow the rank past max instead
            state[key] = torch.zeros(MAX_RANK + size, *(_shape(tensor)[1:] or (4,)))
    return state


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) and not value.is_nested else ()


@pytest.mark.slow
def test_fuzzed_state_dicts_are_refused_and_change_nothing(served, tmp_path_factory) -> None:
    directory: Path = tmp_path_factory.mktemp("malformed")
    check = served.untouched()
    targets = lora_targets(served.arch.build())

    @FUZZ
    @given(defects=_DEFECTS, carrier=_CARRIERS)
    def fuzz(defects: list[tuple[str, int, int]], carrier: tuple[str, float]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # sparse CSR / nested are "beta"
            adapter: Any = _malformed(served.state, served.arch.prefix, targets, defects)
        how, cut = carrier
        if any(kind in _DICT_ONLY for kind, _, _ in defects):
            how = "dict"
        for kind, _, _ in defects:
            event(kind)
        event(f"carrier {how}")
        if how != "dict":
            data = safetensors.torch.save({k: v.contiguous() for k, v in adapter.items()})
            adapter = directory / "adapter.safetensors"
            adapter.write_bytes(data[: int(cut * len(data))] if how == "truncated" else data)
        with pytest.raises(HotswapError) as info:
            hotswap(served.compiled, adapter)
        event(type(info.value).__name__)
        check()

    fuzz()


# -- metadata -----------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_BAD_REGEX = st.sampled_from(["(", "[", "a)", "*x", "(?P<", "\\", "a{2,1}"])


def _not_number(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float))


#: Per field, values that are always invalid for it (the adapter has rank RANK everywhere).
_BAD_FIELDS = {
    "lora_alpha": st.one_of(
        _JSON.filter(_not_number),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.floats(min_value=1e39 * RANK, max_value=1.7e308),  # alpha / r overflows float32
    ),
    "r": st.one_of(
        _JSON.filter(lambda v: _not_number(v) or not isinstance(v, int) or v != RANK),
    ),
    "rank_pattern": st.one_of(
        _JSON.filter(lambda v: not isinstance(v, dict)),
        st.dictionaries(_BAD_REGEX, st.integers(1, 64), min_size=1, max_size=2),
        st.dictionaries(st.just(".*"), st.integers(1, 64).filter(lambda r: r != RANK), min_size=1),
        st.dictionaries(st.just(".*"), _JSON.filter(_not_number), min_size=1),
    ),
    "alpha_pattern": st.one_of(
        _JSON.filter(lambda v: not isinstance(v, dict)),
        st.dictionaries(_BAD_REGEX, st.floats(1, 8), min_size=1, max_size=2),
        st.dictionaries(
            st.just(".*"), st.floats(min_value=1e39 * RANK, max_value=1e308), min_size=1
        ),
        st.dictionaries(st.just(".*"), _JSON.filter(_not_number), min_size=1),
    ),
    "use_rslora": _JSON.filter(lambda v: not isinstance(v, bool)),
    "use_dora": st.one_of(st.just(True), _JSON.filter(lambda v: not isinstance(v, bool))),
    "lora_bias": st.one_of(st.just(True), _JSON.filter(lambda v: not isinstance(v, bool))),
    "lora_dropout": _JSON.filter(
        lambda v: _not_number(v) or not (isinstance(v, (int, float)) and 0 <= v < 1)
    ),
    "target_modules": _JSON.filter(
        lambda v: (
            not (
                v is None
                or isinstance(v, str)
                or (isinstance(v, list) and all(isinstance(t, str) for t in v))
            )
        )
    ),
}
_METADATA_DEFECTS = st.one_of(
    st.lists(
        st.sampled_from(sorted(_BAD_FIELDS)).flatmap(
            lambda f: st.tuples(st.just(f), _BAD_FIELDS[f])
        ),
        min_size=1,
        max_size=3,
    ),
    # the whole metadata not an object (JSON null means "no metadata" to diffusers: excluded)
    _JSON.filter(lambda v: v is not None and not isinstance(v, dict)).map(lambda v: [("", v)]),
)


def test_fuzzed_metadata_is_refused_and_changes_nothing(served, tmp_path_factory) -> None:
    directory: Path = tmp_path_factory.mktemp("metadata")
    check = served.untouched()
    prefix = served.arch.prefix

    @FUZZ
    @given(defects=_METADATA_DEFECTS)
    def fuzz(defects: list[tuple[str, Any]]) -> None:
        metadata: Any = dict(served.metadata)
        for field, value in defects:
            event(field or "not an object")
            if field:
                metadata[f"{prefix}.{field}"] = value
            else:
                metadata = value
        try:
            json.dumps(metadata, allow_nan=True)
        except ValueError:  # pragma: no cover - hypothesis' JSON strategy stays serialisable
            return
        path = write_with_metadata(directory / "adapter.safetensors", served.state, metadata)
        with pytest.raises(HotswapError) as info:
            hotswap(served.compiled, path)
        event(type(info.value).__name__)
        check()

    fuzz()
