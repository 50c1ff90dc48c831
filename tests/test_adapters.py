"""The LoRA factory: deterministic files that diffusers loads as written, in both formats."""

from __future__ import annotations

import re

import pytest
import safetensors.torch
import torch

from pytest_hotswap import pipelines
from pytest_hotswap.adapters import lora_targets, make_lora
from pytest_hotswap.adapters.header import AdapterFileError, read_header

# Its module fixtures are built once, on one worker.
pytestmark = pytest.mark.xdist_group("adapters")


@pytest.fixture(scope="module", autouse=True)
def _quiet_diffusers():
    from diffusers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(before)


@pytest.fixture(scope="module")
def sd_pipe():
    return pipelines.build_tiny_sd_pipeline()


@pytest.fixture(scope="module")
def flux_pipe():
    return pipelines.build_tiny_flux_pipeline()


def _scalings(model: torch.nn.Module, adapter: str) -> set[float]:
    return {m.scaling[adapter] for m in model.modules() if adapter in getattr(m, "scaling", {})}


def test_same_seed_same_file_other_seed_other_weights(sd_pipe, tmp_path):
    a = safetensors.torch.load_file(make_lora(sd_pipe, tmp_path / "a.safetensors", seed=1))
    b = safetensors.torch.load_file(make_lora("sd", tmp_path / "b.safetensors", seed=1))
    c = safetensors.torch.load_file(make_lora(sd_pipe, tmp_path / "c.safetensors", seed=2))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_directory_path_gets_a_descriptive_file_name(sd_pipe, tmp_path):
    path = make_lora(sd_pipe.unet, tmp_path, rank=4, alpha=2, targets="half", seed=5)
    assert path.parent == tmp_path
    assert path.name == "lora_unet_r4_a2_half_diffusers_s5.safetensors"
    assert make_lora(sd_pipe.unet, tmp_path, rank=4, alpha=2, targets="half", seed=5) == path


def test_adapters_that_differ_get_their_own_files_in_one_directory(sd_pipe, tmp_path):
    names = lora_targets(sd_pipe.unet)
    paths = [
        make_lora(sd_pipe.unet, tmp_path, rank=4, targets=names[:2]),
        make_lora(sd_pipe.unet, tmp_path, rank=4, targets=names[2:4]),  # as many targets
        make_lora(sd_pipe.unet, tmp_path, rank=4, targets=names[:2], rank_pattern={names[0]: 8}),
        make_lora(sd_pipe.unet, tmp_path, rank=4, targets=names[:2], alpha_pattern={names[0]: 1}),
        make_lora(sd_pipe.unet, tmp_path, rank=4, targets=names[:2], use_dora=True),
    ]
    assert len(set(paths)) == 5
    assert "_dora_" in paths[4].name
    assert re.fullmatch(
        r"lora_unet_r4_a4_2targets_diffusers_s0_[0-9a-f]{8}\.safetensors", paths[0].name
    )
    first = safetensors.torch.load_file(paths[0])
    assert {k.rsplit(".lora_", 1)[0] for k in first} == {f"unet.{n}" for n in names[:2]}


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_plain_diffusers_load_changes_output_with_written_rank_and_alpha(
    name, sd_pipe, flux_pipe, tmp_path
):
    pipe = sd_pipe if name == "sd" else flux_pipe
    denoiser = pipe.unet if name == "sd" else pipe.transformer
    inputs = (pipelines.unet_inputs if name == "sd" else pipelines.flux_inputs)()
    with torch.no_grad():
        before = denoiser(**inputs, return_dict=False)[0]
    path = make_lora(pipe, tmp_path, rank=4, alpha=6)
    pipe.load_lora_weights(str(path), adapter_name="probe")
    try:
        with torch.no_grad():
            after = denoiser(**inputs, return_dict=False)[0]
        assert _scalings(denoiser, "probe") == {1.5}
        ranks = {m.r["probe"] for m in denoiser.modules() if "probe" in getattr(m, "r", {})}
        assert ranks == {4}
        assert not torch.allclose(before, after)
    finally:
        pipe.delete_adapters("probe")


def test_unet_adapter_targets_convs_and_linears(sd_pipe, tmp_path):
    tensors = safetensors.torch.load_file(make_lora(sd_pipe, tmp_path))
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in tensors
    assert (
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors
    )
    assert {t.dim() for t in tensors.values()} == {2, 4}
    assert len(tensors) == 2 * len(lora_targets(sd_pipe))


def test_half_is_a_deterministic_subset_and_lists_are_exact(flux_pipe, tmp_path):
    all_keys = set(safetensors.torch.load_file(make_lora(flux_pipe, tmp_path / "all.safetensors")))
    half = set(
        safetensors.torch.load_file(
            make_lora(flux_pipe, tmp_path / "h.safetensors", targets="half")
        )
    )
    again = set(
        safetensors.torch.load_file(
            make_lora(flux_pipe, tmp_path / "h2.safetensors", targets="half")
        )
    )
    assert half == again
    assert half < all_keys
    # The tiny Flux transformer (one double block, one single block, no guidance embedder) has 28
    # Linear layers in module order; "half" takes the 1st, 3rd ... of them: 14 layers, 28 keys.
    assert len(all_keys) == 2 * 28
    assert half == {
        f"transformer.{name}.lora_{ab}.weight"
        for ab in "AB"
        for name in (
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.text_embedder.linear_1",
            "context_embedder",
            "transformer_blocks.0.norm1.linear",
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.to_v",
            "transformer_blocks.0.attn.add_q_proj",
            "transformer_blocks.0.attn.add_v_proj",
            "transformer_blocks.0.ff.net.0.proj",
            "transformer_blocks.0.ff_context.net.0.proj",
            "single_transformer_blocks.0.norm.linear",
            "single_transformer_blocks.0.proj_out",
            "single_transformer_blocks.0.attn.to_k",
            "norm_out.linear",
        )
    }
    # "proj_out" alone must not also adapt single_transformer_blocks.0.proj_out on load.
    path = make_lora(flux_pipe, tmp_path / "one.safetensors", targets=["proj_out"])
    flux_pipe.load_lora_weights(str(path), adapter_name="one")
    try:
        adapted = [
            n for n, m in flux_pipe.transformer.named_modules() if "one" in getattr(m, "r", {})
        ]
        assert adapted == ["proj_out"]
    finally:
        flux_pipe.delete_adapters("one")


def test_text_encoder_keys_only_when_asked(sd_pipe, tmp_path):
    without = safetensors.torch.load_file(make_lora(sd_pipe, tmp_path / "a.safetensors"))
    with_te = safetensors.torch.load_file(
        make_lora(sd_pipe, tmp_path / "b.safetensors", text_encoder=True)
    )
    assert not any(k.startswith("text_encoder.") for k in without)
    te_keys = [k for k in with_te if k.startswith("text_encoder.")]
    assert te_keys
    assert all(".self_attn." in k for k in te_keys)


def test_kohya_round_trip_through_diffusers_loader_matches_diffusers_format(tmp_path):
    outputs = []
    for fmt in ("diffusers", "kohya"):
        pipe = pipelines.build_tiny_sd_pipeline()
        path = make_lora(pipe, tmp_path, rank=4, alpha=2, fmt=fmt, text_encoder=True, seed=3)
        keys = safetensors.torch.load_file(path).keys()
        assert any(k.startswith("lora_unet_") for k in keys) == (fmt == "kohya")
        pipe.load_lora_weights(str(path))
        assert _scalings(pipe.unet, "default_0") == {0.5}
        assert _scalings(pipe.text_encoder, "default_0") == {0.5}
        outputs.append(pipe(**pipelines.sd_call_kwargs())[0])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_kohya_files_carry_each_layers_alpha_from_the_alpha_pattern(tmp_path):
    outputs = []
    for fmt in ("diffusers", "kohya"):
        pipe = pipelines.build_tiny_sd_pipeline()
        special = "time_embedding.linear_1"
        path = make_lora(pipe, tmp_path, rank=4, alpha=2, fmt=fmt, alpha_pattern={special: 8})
        if fmt == "kohya":
            alphas = {
                k: float(v) for k, v in safetensors.torch.load_file(path).items() if "alpha" in k
            }
            assert alphas.pop("lora_unet_time_embedding_linear_1.alpha") == 8.0
            assert set(alphas.values()) == {2.0}
        pipe.load_lora_weights(str(path))
        assert _scalings(pipe.unet, "default_0") == {0.5, 2.0}
        outputs.append(pipe(**pipelines.sd_call_kwargs())[0])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"alpha": -1.0}, "alpha must be > 0"),
        ({"targets": ["no.such.layer"]}, "unknown LoRA targets"),
        ({"targets": "some"}, "targets must be 'all', 'half'"),
        ({"targets": []}, "targets is empty"),
        ({"fmt": "pickle"}, "fmt must be one of"),
        ({"text_encoder": True}, "needs a pipeline with a text_encoder"),
    ],
)
def test_bad_arguments_say_what_to_do(sd_pipe, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_lora(sd_pipe.unet, tmp_path, **kwargs)


def test_kohya_for_a_transformer_is_refused(flux_pipe, tmp_path):
    with pytest.raises(ValueError, match="use fmt='diffusers'"):
        make_lora(flux_pipe, tmp_path, fmt="kohya")


def test_unknown_pipeline_name_and_non_safetensors_path(sd_pipe, tmp_path):
    with pytest.raises(
        ValueError,
        match="unknown pipeline name 'kandinsky': use one of sd, flux, sdxl, sd3, wan, qwenimage, "
        "chroma, zimage, or pass",
    ):
        make_lora("kandinsky", tmp_path)
    with pytest.raises(ValueError, match="safetensors only"):
        make_lora(sd_pipe, tmp_path / "lora.bin")


def test_a_registered_pipeline_name_is_a_target(monkeypatch, tmp_path) -> None:
    from pytest_hotswap.pipelines.registry import REGISTRY, PipelineEntry, PipelineSpec

    def build(options, seed):
        denoiser = pipelines.build_tiny_flux_transformer(seed, options.device, options.dtype)
        return PipelineSpec("bare", denoiser, run=lambda **_: torch.zeros(1))

    monkeypatch.setitem(REGISTRY, "bare", PipelineEntry("bare", build, "a denoiser alone"))
    assert lora_targets("bare") == lora_targets(pipelines.build_tiny_flux_transformer())
    keys = set(safetensors.torch.load_file(make_lora("bare", tmp_path, targets=["proj_out"])))
    assert keys == {"transformer.proj_out.lora_A.weight", "transformer.proj_out.lora_B.weight"}
    with pytest.raises(ValueError, match="text_encoder=True needs a pipeline"):
        make_lora("bare", tmp_path, text_encoder=True)
    with pytest.raises(ValueError, match=r"use one of sd, flux, .*, zimage, bare"):
        make_lora("kandinsky", tmp_path)


def test_a_model_holding_an_adapter_or_compiled_gives_the_same_file(tmp_path) -> None:
    clean = pipelines.build_tiny_flux_transformer()
    expected = safetensors.torch.load_file(make_lora(clean, tmp_path / "clean.safetensors"))
    loaded = pipelines.build_tiny_flux_transformer()
    loaded.load_lora_adapter(
        str(make_lora(loaded, tmp_path / "first.safetensors", rank=2)),
        prefix="transformer",
        use_safetensors=True,
    )
    compiled = torch.compile(loaded, backend="eager")  # not run: make_lora only reads shapes
    for target in (loaded, compiled):
        got = safetensors.torch.load_file(make_lora(target, tmp_path / "again.safetensors"))
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_lora_factory_fixture_writes_rank_and_alpha_patterns(lora_factory):
    """The fixture passes the per-layer patterns and DoRA through to make_lora (and caches on them)."""
    import json

    from safetensors import safe_open

    def config_of(path):
        with safe_open(str(path), "pt") as f:
            metadata = json.loads(f.metadata()["lora_adapter_metadata"])
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        return metadata, shapes

    name = "time_text_embed.timestep_embedder.linear_1"
    plain = lora_factory("flux", rank=4)
    patterned = lora_factory("flux", rank=4, rank_pattern={name: 8}, alpha_pattern={name: 2})
    assert patterned != plain
    assert (
        lora_factory("flux", rank=4, rank_pattern={name: 8}, alpha_pattern={name: 2}) == patterned
    )
    metadata, shapes = config_of(patterned)
    assert metadata["transformer.rank_pattern"] == {name: 8}
    assert metadata["transformer.alpha_pattern"] == {name: 2}
    assert shapes[f"transformer.{name}.lora_A.weight"] == (8, 256)
    assert shapes["transformer.context_embedder.lora_A.weight"][0] == 4
    metadata, shapes = config_of(plain)  # negative control
    assert metadata["transformer.rank_pattern"] == {}
    assert shapes[f"transformer.{name}.lora_A.weight"] == (4, 256)
    dora, _ = config_of(lora_factory("flux", rank=4, use_dora=True))
    assert dora["transformer.use_dora"] is True


def test_an_adapter_for_named_denoisers_says_so_in_its_metadata(sd_pipe, flux_pipe, tmp_path):
    file = make_lora(flux_pipe, tmp_path, rank=4, denoisers=["transformer"])
    header = read_header(file)
    assert header.denoisers == ("transformer",)
    assert file.name == "lora_transformer_r4_a4_all_for-transformer_diffusers_s0.safetensors"
    assert read_header(make_lora(flux_pipe, tmp_path, rank=4)).denoisers is None  # control
    with pytest.raises(ValueError, match="denoisers= needs a pipeline"):
        make_lora(sd_pipe.unet, tmp_path, denoisers=["unet"])
    with pytest.raises(
        ValueError,
        match=r"denoisers=\['transformer_2'\]: name one or more of FluxPipeline's "
        r"LoRA-loadable denoisers \(transformer\)",
    ):
        make_lora(flux_pipe, tmp_path, denoisers=["transformer_2"])
    with pytest.raises(ValueError, match="written in fmt='diffusers' only, not fmt='peft'"):
        make_lora(flux_pipe, tmp_path, denoisers=["transformer"], fmt="peft")


def test_a_denoisers_entry_that_is_not_a_list_of_names_is_refused(tmp_path):
    path = tmp_path / "odd.safetensors"
    tensors = {"transformer.x.lora_A.weight": torch.zeros(2, 3)}
    safetensors.torch.save_file(tensors, str(path), metadata={"hotswap_denoisers": "transformer"})
    with pytest.raises(AdapterFileError, match="is not a JSON list of denoiser names"):
        _ = read_header(path).denoisers
