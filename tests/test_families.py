"""The tiny families and the driver: saved, loaded by absolute path elsewhere, driven, hotswapped.

Expected values are written out per family (pipeline class, components, latent shape), not
derived with the driver under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_hotswap.pipelines import families_driver as driver
from pytest_hotswap.pipelines.families import FAMILIES, build_family
from pytest_hotswap.pipelines.families_lora import load_lora, random_lora, write_lora

# family: (pipeline class, denoisers, LoRA-loadable text encoders, latent shape of the smallest call)
EXPECTED: dict[str, tuple[str, list[str], list[str], tuple[int, ...]]] = {
    "sd": ("StableDiffusionPipeline", ["unet"], ["text_encoder"], (1, 4, 4, 4)),
    "sdxl": (
        "StableDiffusionXLPipeline",
        ["unet"],
        ["text_encoder", "text_encoder_2"],
        (1, 4, 4, 4),
    ),
    "sd3": (
        "StableDiffusion3Pipeline",
        ["transformer"],
        ["text_encoder", "text_encoder_2"],
        (1, 4, 1, 1),
    ),
    "flux": ("FluxPipeline", ["transformer"], ["text_encoder"], (1, 1, 4)),  # packed 2x2
    "wan": ("WanPipeline", ["transformer", "transformer_2"], [], (1, 16, 1, 2, 2)),
    "qwenimage": ("QwenImagePipeline", ["transformer"], [], (1, 1, 16)),  # packed 2x2
    "chroma": ("ChromaPipeline", ["transformer"], ["text_encoder"], (1, 1, 4)),
    "zimage": ("ZImagePipeline", ["transformer"], [], (1, 16, 2, 2)),
}


@pytest.fixture(autouse=True)
def _quiet_diffusers() -> Any:
    from diffusers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()  # "No LoRA keys associated to CLIPTextModel" on every load
    yield
    logging.set_verbosity(before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family built once and saved (tokenizers included), by absolute path."""
    root = tmp_path_factory.mktemp("families")
    folders = {}
    for name in FAMILIES:
        folders[name] = (root / name).resolve()
        build_family(name, seed=0).save_pretrained(folders[name])
    return folders


def load(folder: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Load a saved folder by absolute path from another working directory, offline."""
    from diffusers import DiffusionPipeline

    monkeypatch.chdir(cwd)
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_table_has_the_families_of_the_issue() -> None:
    assert list(FAMILIES) == list(EXPECTED)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_saved_family_is_driven_from_another_directory(
    family: str, saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline, denoisers, encoders, shape = EXPECTED[family]
    pipe = load(saved[family], tmp_path, monkeypatch)
    assert type(pipe).__name__ == pipeline
    assert list(driver.denoisers(pipe)) == denoisers
    assert list(driver.text_encoders(pipe)) == encoders
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if name in pipe.components:
            assert pipe.components[name] is not None, f"{name} was not saved"
    latents = driver.drive(pipe, seed=0)
    assert tuple(latents.shape) == shape
    assert torch.isfinite(latents).all()
    assert torch.equal(latents, driver.drive(pipe, seed=0))  # seeded
    assert not torch.equal(latents, driver.drive(pipe, seed=1))


def _lora_files(pipe: Any, folder: Path, rank: int, seed: int) -> dict[str, Path]:
    return {
        component: write_lora(pipe, folder, component, *random_lora(pipe, component, rank, seed))
        for component in driver.denoisers(pipe)
    }


def _compiled(pipe: Any, target_rank: int, first: dict[str, Path]) -> torch.Tensor:
    """Prepare hotswap, load the first adapter, compile every denoiser in place, warm up."""
    torch.compiler.reset()  # dynamo's entries live on shared code objects (diffusers' wrapper)
    pipe.enable_lora_hotswap(target_rank=target_rank)
    load_lora(pipe, first, "default_0")
    for module in driver.denoisers(pipe).values():
        module.compile(backend="eager")  # in place: the pipeline calls the compiled forward
    return driver.drive(pipe)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_hotswaps_a_lower_rank_without_recompiling(
    family: str, saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    pipe = load(saved[family], tmp_path, monkeypatch)
    first = _lora_files(pipe, tmp_path / "rank8", 8, seed=1)
    second = _lora_files(pipe, tmp_path / "rank4", 4, seed=2)
    before = _compiled(pipe, 8, first)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(before, driver.drive(pipe))  # steady state: nothing recompiles
        load_lora(pipe, second, "default_0", hotswap=True)
        after = driver.drive(pipe)
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after), "the swap changed nothing"
    for name, module in driver.denoisers(pipe).items():  # the rank-4 weights, padded to 8
        written = load_file(second[name])
        key = next(k for k in written if k.endswith("lora_A.weight"))
        layer = key.split(".", 1)[1].removesuffix(".lora_A.weight")
        loaded = module.get_submodule(layer).lora_A["default_0"].weight
        assert loaded.shape[0] == 8, name
        assert torch.equal(loaded[:4], written[key]), name
        assert not loaded[4:].any(), name


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_a_rank_grown_past_the_padding_fails_the_check(
    family: str, saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control of the check above: the same steps with rank 8 over padding to 4.

    The loader takes the grown adapter without a word (PEFT swaps the tensors in); the next
    compiled call recompiles on the new tensors ("expected type of ...lora_A...weight to be a
    tensor type"), which the check turns into an error.
    """
    pipe = load(saved[family], tmp_path, monkeypatch)
    first = _lora_files(pipe, tmp_path / "rank4", 4, seed=1)
    grown = _lora_files(pipe, tmp_path / "rank8", 8, seed=2)
    _compiled(pipe, 4, first)
    load_lora(pipe, grown, "default_0", hotswap=True)  # diffusers and PEFT accept it
    with (
        torch._dynamo.config.patch(error_on_recompile=True),
        pytest.raises(torch._dynamo.exc.RecompileError, match="Recompiling function wrapper"),
    ):
        driver.drive(pipe)


def test_wan_22_adapter_for_both_experts(
    saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wan's loader reaches ``transformer_2`` only with ``load_into_transformer_2=True``, from keys
    prefixed ``transformer.``; keys prefixed ``transformer_2.`` load nowhere."""
    from safetensors.torch import load_file

    pipe = load(saved["wan"], tmp_path, monkeypatch)
    assert driver.lora_route(pipe, "transformer").load_kwargs == {}
    assert driver.lora_route(pipe, "transformer_2").load_kwargs == {"load_into_transformer_2": True}
    files = _lora_files(pipe, tmp_path / "both", 4, seed=3)
    assert all(k.startswith("transformer.") for k in load_file(files["transformer_2"]))
    load_lora(pipe, files, "default_0")
    key = "blocks.0.attn1.to_q"
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name).get_submodule(key)
        written = load_file(files[name])[f"transformer.{key}.lora_A.weight"]
        assert torch.equal(module.lora_A["default_0"].weight, written), name

    fresh = load(saved["wan"], tmp_path, monkeypatch)
    state = {f"transformer_2.{k}": v for k, v in random_lora(fresh, "transformer_2", 4)[0].items()}
    fresh.load_lora_weights(state, adapter_name="default_0")
    assert not getattr(fresh.transformer, "peft_config", None)
    assert not getattr(fresh.transformer_2, "peft_config", None)


def test_a_pipeline_without_a_lora_loader_is_refused() -> None:
    from diffusers import PixArtAlphaPipeline

    with pytest.raises(driver.UnsupportedPipelineError) as refused:
        driver.check_drivable(PixArtAlphaPipeline)
    message = str(refused.value)
    assert "PixArtAlphaPipeline has no diffusers LoRA loader" in message
    assert "pytest_hotswap_build_pipeline" in message


def test_a_pipeline_needing_an_input_image_is_refused(
    saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline, WanImageToVideoPipeline

    with pytest.raises(driver.UnsupportedPipelineError) as refused:
        driver.check_drivable(WanImageToVideoPipeline)
    assert str(refused.value).startswith(
        "WanImageToVideoPipeline.__call__ needs input the driver cannot make: image"
    )
    pipe = StableDiffusionImg2ImgPipeline(**load(saved["sd"], tmp_path, monkeypatch).components)
    with pytest.raises(driver.UnsupportedPipelineError) as refused:
        driver.drive(pipe)
    message = str(refused.value)
    assert message.startswith(
        "StableDiffusionImg2ImgPipeline.__call__ needs input the driver cannot make: image"
    )
    assert "pytest_hotswap_build_pipeline" in message


def test_the_driver_accepts_optional_inputs_of_text_to_image_pipelines() -> None:
    """Negative control of the refusal: IP-adapter images and Kontext's image do not count."""
    from diffusers import FluxKontextPipeline, FluxPipeline

    driver.check_drivable(FluxPipeline)
    driver.check_drivable(FluxKontextPipeline)


def test_an_unknown_family_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'nope': no such pipeline family; the built-in"):
        build_family("nope")


# --- the families as registered pipeline names -----------------------------------------------

#: family: the call keyword its pipeline reads a LoRA scale from, number of denoisers
REGISTERED: dict[str, tuple[str, int]] = {
    "sd": ("cross_attention_kwargs", 1),
    "flux": ("joint_attention_kwargs", 1),
    "sdxl": ("cross_attention_kwargs", 1),
    "sd3": ("joint_attention_kwargs", 1),
    "wan": ("attention_kwargs", 2),
    "qwenimage": ("attention_kwargs", 1),
    "chroma": ("joint_attention_kwargs", 1),
    "zimage": ("joint_attention_kwargs", 1),
}


@pytest.mark.parametrize("family", list(REGISTERED))
def test_every_family_is_a_registered_pipeline(family: str) -> None:
    from pytest_hotswap.options import HotswapOptions
    from pytest_hotswap.pipelines.registry import REGISTRY

    keyword, count = REGISTERED[family]
    options = HotswapOptions(device="cpu", dtype="float32")
    spec = REGISTRY[family].build(options, 0)
    assert spec.strength_keyword == keyword
    assert len(spec.denoisers) == count and spec.denoisers[0] is spec.denoiser
    first = spec.run()
    assert torch.equal(first, spec.run())  # seeded
    if family not in ("sd", "flux"):  # tiny.py's sd/flux: prompt embeddings of a fixed seed
        assert tuple(first.shape) == EXPECTED[family][3]
        assert not torch.equal(first, REGISTRY[family].build(options, 1).run())


def test_sd_and_flux_stay_the_tiny_pipelines() -> None:
    """Negative control of the table's sd/flux: the registry keeps pipelines/tiny.py's builders
    (prompts as embeddings), which the rest of the suite was verified on."""
    from pytest_hotswap.pipelines.registry import REGISTRY, flux_spec, sd_spec

    assert REGISTRY["sd"].build is sd_spec
    assert REGISTRY["flux"].build is flux_spec
    assert REGISTRY["sdxl"].build is not sd_spec


# --- saved folders for `make families`: python -m pytest_hotswap.pipelines.families save ----


def test_save_writes_loadable_folders_and_reuses_complete_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``save DIR sd`` writes ``DIR/sd`` with its tokenizer and prints its absolute path; a second
    save reuses the folder; a folder whose stamp is not of this build (or missing: an interrupted
    save) is written again (negative control)."""
    from pytest_hotswap.pipelines.families import STAMP, main, save_families

    assert main(["save", str(tmp_path / "out"), "sd"]) == 0
    folder = (tmp_path / "out" / "sd").resolve()
    assert capsys.readouterr().out.strip() == str(folder)
    assert (folder / "tokenizer" / "tokenizer_config.json").is_file()
    pipe = load(folder, tmp_path, monkeypatch)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns
    assert save_families(tmp_path / "out", ["sd"]) == {"sd": folder}
    assert weights.stat().st_mtime_ns == written  # reused

    (folder / STAMP).write_text('{"family": "sd", "seed": "7"}', encoding="utf-8")
    save_families(tmp_path / "out", ["sd"])
    assert weights.stat().st_mtime_ns != written  # not of this build: written again
    assert not list((tmp_path / "out").glob(".*partial"))

    with pytest.raises(SystemExit):
        main(["save", str(tmp_path / "out"), "sd,nope"])
    assert "'nope': no such pipeline family" in capsys.readouterr().err


def test_catalog_files_for_sdxl_and_chroma(tmp_path: Path) -> None:
    """SDXL's ``add_embedding.linear_1/2`` have kohya names diffusers reads back as other layers:
    the catalog's kohya file leaves them out (SD's layers all load back: negative control);
    Chroma's text encoder is a T5, whose attention (``SelfAttention.q/k/v/o``) an adapter with
    ``text_encoder=True`` targets."""
    from safetensors.torch import load_file

    from pytest_hotswap.adapters.factory import kohya_loadable, lora_targets, make_lora

    sdxl = lora_targets(build_family("sdxl"))
    assert sorted(set(sdxl) - set(kohya_loadable(sdxl))) == [
        "add_embedding.linear_1",
        "add_embedding.linear_2",
    ]
    sd = lora_targets(build_family("sd"))
    assert kohya_loadable(sd) == sd

    path = make_lora(build_family("chroma"), tmp_path / "chroma.safetensors", text_encoder=True)
    encoder = {k.split(".lora_")[0] for k in load_file(path) if k.startswith("text_encoder.")}
    assert "text_encoder.encoder.block.0.layer.0.SelfAttention.q" in encoder
    assert all(k.rsplit(".", 1)[1] in "qkvo" for k in encoder)
