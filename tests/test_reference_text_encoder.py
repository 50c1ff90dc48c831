"""Issue 16, text encoders: with ``prepare_for_hotswap(pipe, ..., text_encoder=True)`` a swap is
one transaction across the denoiser and the text encoder; compiled, neither recompiles, and both
give the outputs of a fresh eager ``load_lora_weights`` of the same file. Slots span both.

On Flux the T5 encoder (``text_encoder_2``) takes part too: diffusers' Flux loader reads no T5
keys, so its LoRA is put on with transformers' ``load_adapter`` (PEFT), and ``text_encoder_2.``
keys in PEFT naming swap it."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from reference_support import (
    model_checksum,
    parameter_identity,
    read_metadata,
    tensor_layout,
    write_with_metadata,
)

from pytest_hotswap import pipelines
from pytest_hotswap.adapters import make_lora
from pytest_hotswap.reference import (
    HotswapError,
    InvalidAdapterError,
    NotPreparedError,
    ShapeMismatchError,
    TextEncoderLoraError,
    hotswap,
    prepare_for_hotswap,
    set_lora_scale,
)
from pytest_hotswap.watch import CompileWatcher

MAX_RANK = 8
# diffusers' own loads of a second adapter into a model (the expected outputs) make PEFT warn.
pytestmark = [
    pytest.mark.usefixtures("reference_compile_environment"),
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute"),
    pytest.mark.xdist_group("reference_text_encoder"),  # module fixtures: built once, on one worker
]
TOKENS = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, object]:
    directory = tmp_path_factory.mktemp("te")
    return {
        "A": make_lora("sd", directory / "a.safetensors", rank=4, text_encoder=True, seed=1),
        "B": make_lora(
            "sd",
            directory / "b.safetensors",
            rank=8,
            alpha=4,
            targets="half",
            text_encoder=True,
            seed=2,
        ),
        "B kohya": make_lora(
            "sd",
            directory / "bk.safetensors",
            rank=8,
            alpha=4,
            targets="half",
            text_encoder=True,
            fmt="kohya",
            seed=2,
        ),
        "C": make_lora("sd", directory / "c.safetensors", rank=2, seed=3),  # no text-encoder keys
    }


def _pipeline(path) -> object:
    with pipelines.quiet_diffusers():
        pipe = pipelines.build_tiny_sd_pipeline()
        pipe.load_lora_weights(str(path), adapter_name="default")
    return pipe


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's hidden states and one UNet call: both components' outputs."""
    with torch.no_grad():
        hidden = pipe.text_encoder(TOKENS)[0]
        noise = pipe.unet(**pipelines.unet_inputs(), return_dict=False)[0]
    return hidden, noise


def _assert_outputs(got, expected, label: str) -> None:
    for name, a, b in zip(("text encoder", "unet"), got, expected, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{label}, {name}: {m}")


@pytest.fixture(scope="module")
def served(files):
    """The SD pipeline with A loaded, prepared with text_encoder=True, both parts compiled."""
    pipe = _pipeline(files["A"])
    before = _outputs(pipe)
    # Two slots: the second one stays empty (or weighted 0) except in the slots test, so the
    # text encoder and the UNet are compiled once for both.
    index = prepare_for_hotswap(pipe, MAX_RANK, text_encoder=True, slots=2)
    assert index.components == ("", "text_encoder")
    _assert_outputs(_outputs(pipe), before, "prepare")
    encoder, unet = pipe.text_encoder, pipe.unet
    pipe.text_encoder = torch.compile(encoder, backend="eager")
    pipe.unet = torch.compile(unet, backend="eager")
    with CompileWatcher() as watch, watch.warmup("sd text encoder + unet"):
        first = _outputs(pipe)
    return pipe, encoder, unet, first


@pytest.mark.slow
def test_text_encoder_and_denoiser_swap_together_without_recompiling(served, files) -> None:
    pipe, encoder, unet, first = served
    identity = parameter_identity(encoder), parameter_identity(unet)
    with CompileWatcher() as watch:
        for label in ("B", "C", "B kohya", "A"):
            watch.step(label)
            hotswap(pipe, files[label])
            expected = "B" if label == "B kohya" else label
            _assert_outputs(_outputs(pipe), _outputs(_pipeline(files[expected])), label)
    watch.assert_no_recompile()
    assert (parameter_identity(encoder), parameter_identity(unet)) == identity
    assert all(torch.equal(a, b) for a, b in zip(_outputs(pipe), first, strict=True))


def test_slots_span_the_text_encoder_like_pipeline_set_adapters(served, files) -> None:
    pipe, _, _, first = served
    with pipelines.quiet_diffusers():
        expected_pipe = pipelines.build_tiny_sd_pipeline()
        expected_pipe.load_lora_weights(str(files["A"]), adapter_name="a")
        expected_pipe.load_lora_weights(str(files["B"]), adapter_name="b")
    with CompileWatcher() as watch:
        hotswap(pipe, files["A"])
        hotswap(pipe, files["B"], slot=1)
        for weights in ([1.0, 1.0], [0.25, 1.5]):
            watch.step(f"weights {weights}")
            set_lora_scale(pipe, weights[0], slot=0)
            set_lora_scale(pipe, weights[1], slot=1)
            expected_pipe.set_adapters(["a", "b"], adapter_weights=weights)
            _assert_outputs(_outputs(pipe), _outputs(expected_pipe), f"weights {weights}")
        watch.step("slot 1 off")
        set_lora_scale(pipe, 1.0, slot=0)
        set_lora_scale(pipe, 0.0, slot=1)
        assert all(torch.equal(a, b) for a, b in zip(_outputs(pipe), first, strict=True))
    watch.assert_no_recompile()


def _bad(files, how: str) -> dict[str, torch.Tensor]:
    """B with one text-encoder tensor broken: the UNet part alone would swap fine."""
    state = safetensors.torch.load_file(files["B"])
    key = next(k for k in sorted(state) if k.startswith("text_encoder.") and ".lora_A." in k)
    if how == "shape":
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    else:
        state[key] = state[key].clone()
        state[key][0, 0] = float("nan")
    return state, key


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "error", "match"),
    [
        ("shape", ShapeMismatchError, r"{key}: expected shape \(rank, 32\), got \(8, 33\)"),
        ("nan", InvalidAdapterError, r"{key} has non-finite values"),
    ],
)
def test_a_bad_text_encoder_tensor_changes_nothing_anywhere(served, files, how, error, match):
    pipe, encoder, unet, first = served
    state, key = _bad(files, how)
    snapshot = [(model_checksum(m), tensor_layout(m)) for m in (encoder, unet)]
    with pytest.raises(error, match=match.format(key=key.replace(".", r"\."))):
        hotswap(pipe, state)
    assert [(model_checksum(m), tensor_layout(m)) for m in (encoder, unet)] == snapshot
    with CompileWatcher() as watch:
        again = _outputs(pipe)
    assert watch.compiles == 0
    assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))


def test_keys_for_a_text_encoder_that_was_not_prepared(served, files) -> None:
    pipe, encoder, unet, _ = served
    state = safetensors.torch.load_file(files["A"])
    state["text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    checksum = model_checksum(encoder), model_checksum(unet)
    with pytest.raises(TextEncoderLoraError, match="prepared text encoders: text_encoder"):
        hotswap(pipe, state)
    assert (model_checksum(encoder), model_checksum(unet)) == checksum


def test_without_the_opt_in_text_encoder_lora_is_left_alone_and_its_keys_refused(files) -> None:
    pipe = _pipeline(files["A"])
    encoder_checksum = model_checksum(pipe.text_encoder)
    index = prepare_for_hotswap(pipe, MAX_RANK)
    assert index.components == ("",)
    assert model_checksum(pipe.text_encoder) == encoder_checksum  # not padded
    with pytest.raises(
        TextEncoderLoraError, match=r"prepare_for_hotswap\(pipe, \.\.\., text_encoder=True\)"
    ):
        hotswap(pipe, files["B"])


def test_opt_in_errors(files) -> None:
    no_text_encoder_lora = _pipeline(files["C"])
    with pytest.raises(HotswapError, match="no text encoder has a LoRA layer"):
        prepare_for_hotswap(no_text_encoder_lora, MAX_RANK, text_encoder=True)
    with pytest.raises(HotswapError, match="text_encoder=True needs the pipeline"):
        prepare_for_hotswap(no_text_encoder_lora.unet, MAX_RANK, text_encoder=True)
    # Named text-encoder targets give a pipeline whose first adapter had none a text-encoder LoRA.
    target = "text_encoder.encoder.layers.0.self_attn.q_proj"
    index = prepare_for_hotswap(no_text_encoder_lora, MAX_RANK, text_encoder=True, targets=[target])
    assert f"{target}" in index.layer_names


def test_a_replaced_text_encoder_is_detected(files) -> None:
    pipe = _pipeline(files["A"])
    prepare_for_hotswap(pipe, MAX_RANK, text_encoder=True)
    with pipelines.quiet_diffusers():
        pipe.text_encoder = pipelines.build_tiny_sd_pipeline().text_encoder
    with pytest.raises(NotPreparedError, match="'text_encoder' no longer holds"):
        hotswap(pipe, files["B"])
    with pytest.raises(NotPreparedError):
        set_lora_scale(pipe, 0.5)


# -- Flux: the T5 encoder, with its LoRA put on by PEFT -----------------------------------------

FLUX_ENCODERS = ("text_encoder", "text_encoder_2")
T5_TARGETS = ("q", "k", "v", "o", "wi", "wo")


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor], dict]]:
    """Per adapter: a file with transformer, CLIP (``text_encoder.``) and T5 (``text_encoder_2.``)
    keys, T5's LoRA in PEFT keys (unprefixed) and its ``LoraConfig`` fields. B targets a subset
    of A's layers everywhere, at another rank and alpha."""
    directory = tmp_path_factory.mktemp("t5")
    with pipelines.quiet_diffusers():
        t5 = pipelines.build_tiny_flux_pipeline().text_encoder_2
    files = {}
    for label, rank, alpha, targets, t5_targets, seed in (
        ("A", 4, None, "all", T5_TARGETS, 1),
        ("B", 8, 4, "half", ("q", "v", "wo"), 2),
    ):
        base = make_lora(
            "flux",
            directory / f"{label}_flux.safetensors",
            rank=rank,
            alpha=alpha,
            targets=targets,
            text_encoder=True,
            seed=seed,
        )
        t5_state = _random_t5_lora(t5, rank, t5_targets, seed)
        t5_config = {"r": rank, "lora_alpha": alpha or rank, "target_modules": list(t5_targets)}
        metadata = read_metadata(base) | {f"text_encoder_2.{k}": v for k, v in t5_config.items()}
        state = safetensors.torch.load_file(base)
        state |= {f"text_encoder_2.{k}": v for k, v in t5_state.items()}
        path = write_with_metadata(directory / f"{label}.safetensors", state, metadata)
        files[label] = (path, t5_state, t5_config)
    return files


def _random_t5_lora(
    t5: torch.nn.Module, rank: int, targets: tuple[str, ...], seed: int
) -> dict[str, torch.Tensor]:
    """Random LoRA weights in PEFT keys (what get_peft_model_state_dict gives) for the T5 layers
    whose last name is one of ``targets``."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in t5.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in targets:
            shape_A, shape_B = (rank, module.in_features), (module.out_features, rank)
            state[f"{name}.lora_A.weight"] = torch.randn(shape_A, generator=generator) * 0.3
            state[f"{name}.lora_B.weight"] = torch.randn(shape_B, generator=generator) * 0.3
    return state


def _flux_pipeline(adapter) -> object:
    """A fresh eager tiny Flux with the adapter loaded without the reference: transformer and
    CLIP by diffusers' ``load_lora_weights``, T5 by transformers' ``load_adapter`` (PEFT)."""
    from peft import LoraConfig

    path, t5_state, t5_config = adapter
    with pipelines.quiet_diffusers():
        pipe = pipelines.build_tiny_flux_pipeline()
        pipe.load_lora_weights(str(path), adapter_name="default")
    pipe.text_encoder_2.load_adapter(
        adapter_state_dict=t5_state, peft_config=LoraConfig(**t5_config), adapter_name="default"
    )
    return pipe


def _flux_outputs(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP's and T5's hidden states and one transformer call."""
    with torch.no_grad():
        clip = pipe.text_encoder(TOKENS)[0]
        t5 = pipe.text_encoder_2(TOKENS)[0]
        noise = pipe.transformer(**pipelines.flux_inputs(), return_dict=False)[0]
    return clip, t5, noise


def _assert_flux(got, expected, label: str) -> None:
    for name, a, b in zip(("clip", "t5", "transformer"), got, expected, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{label}, {name}: {m}")


def _eager_parts(pipe) -> list[torch.nn.Module]:
    return [pipe.transformer, *(getattr(pipe, name) for name in FLUX_ENCODERS)]


def _snapshot(model: torch.nn.Module) -> tuple[str, dict[str, tuple[object, ...]]]:
    """Every parameter's, buffer's and LoRA scaling's bytes and adapter config (a checksum), and
    their objects, shapes, strides, dtypes, devices and storage."""
    return model_checksum(model), tensor_layout(model)


@pytest.fixture(scope="module")
def flux_served(flux_files):
    """Tiny Flux with A (transformer + CLIP + T5), prepared with text_encoder=True, T5 compiled
    (eager backend; the SD tests above compile the denoiser and CLIP: here that costs seconds
    and shows nothing new)."""
    pipe = _flux_pipeline(flux_files["A"])
    before = _flux_outputs(pipe)
    index = prepare_for_hotswap(pipe, MAX_RANK, text_encoder=True)
    assert index.components == ("", *FLUX_ENCODERS)
    _assert_flux(_flux_outputs(pipe), before, "prepare")
    eager = _eager_parts(pipe)
    pipe.text_encoder_2 = torch.compile(pipe.text_encoder_2, backend="eager")
    with CompileWatcher() as watch, watch.warmup("flux t5"):
        first = _flux_outputs(pipe)
    return pipe, eager, first


def test_t5_lora_swaps_with_clip_and_transformer_without_recompiling(
    flux_served, flux_files
) -> None:
    from diffusers.utils import scale_lora_layers

    pipe, eager, first = flux_served
    identity = [parameter_identity(m) for m in eager]
    with CompileWatcher() as watch:
        watch.step("B")
        hotswap(pipe, flux_files["B"][0])
        swapped = _flux_outputs(pipe)
        expected_pipe = _flux_pipeline(flux_files["B"])
        _assert_flux(swapped, _flux_outputs(expected_pipe), "B")
        assert not torch.allclose(swapped[1], first[1])  # the T5 LoRA changed T5's output
        watch.step("scale 0.5")
        set_lora_scale(pipe, 0.5)
        for module in _eager_parts(expected_pipe):
            scale_lora_layers(module, 0.5)
        _assert_flux(_flux_outputs(pipe), _flux_outputs(expected_pipe), "B, scale 0.5")
        watch.step("A")
        set_lora_scale(pipe, 1.0)
        hotswap(pipe, flux_files["A"][0])
        _assert_flux(_flux_outputs(pipe), _flux_outputs(_flux_pipeline(flux_files["A"])), "A")
    watch.assert_no_recompile()
    assert [parameter_identity(m) for m in eager] == identity
    assert all(torch.equal(a, b) for a, b in zip(_flux_outputs(pipe), first, strict=True))


def test_a_bad_t5_tensor_changes_nothing_anywhere(flux_served, flux_files) -> None:
    pipe, eager, _ = flux_served
    state = safetensors.torch.load_file(flux_files["B"][0])
    key = next(k for k in sorted(state) if k.startswith("text_encoder_2.") and ".lora_A." in k)
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    before = _flux_outputs(pipe)
    snapshot = [_snapshot(m) for m in eager]
    escaped = key.replace(".", r"\.")
    with pytest.raises(ShapeMismatchError, match=rf"{escaped}: expected shape \(rank, 32\)"):
        hotswap(pipe, state)
    assert [_snapshot(m) for m in eager] == snapshot
    with CompileWatcher() as watch:
        again = _flux_outputs(pipe)
    assert watch.compiles == 0
    assert all(torch.equal(a, b) for a, b in zip(again, before, strict=True))


def test_without_the_opt_in_t5_lora_is_left_alone_and_its_keys_refused(flux_files) -> None:
    pipe = _flux_pipeline(flux_files["A"])
    t5_before = _snapshot(pipe.text_encoder_2)
    assert prepare_for_hotswap(pipe, MAX_RANK).components == ("",)
    assert _snapshot(pipe.text_encoder_2) == t5_before  # not padded
    # The transformer's keys and T5's: the T5 keys alone are what is refused.
    state = {
        k: v
        for k, v in safetensors.torch.load_file(flux_files["B"][0]).items()
        if not k.startswith("text_encoder.")
    }
    snapshot = [_snapshot(m) for m in _eager_parts(pipe)]
    with pytest.raises(
        TextEncoderLoraError, match=r"prepare_for_hotswap\(pipe, \.\.\., text_encoder=True\)"
    ):
        hotswap(pipe, state)
    assert [_snapshot(m) for m in _eager_parts(pipe)] == snapshot
