"""Tiny diffusers pipelines from the configs of diffusers' own fast tests, with seeded weights.

Each builds in about two seconds on a CPU, offline. Prompts are passed as embeddings, so no
tokenizer or text download is needed; calls return latents.
"""

from __future__ import annotations

from typing import Any

import torch

from pytest_hotswap.pipelines.families_table import FLUX_CONFIG, UNET_CONFIG


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _place(obj: Any, device: str, dtype: str | torch.dtype) -> Any:
    """Move a model or pipeline, skipping the no-op move (diffusers warns on every ``.to(dtype)``)."""
    if torch.device(device).type == "cpu" and _dtype(dtype) == torch.float32:
        return obj
    return obj.to(device, _dtype(dtype))


def build_tiny_unet(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return _place(UNet2DConditionModel(**UNET_CONFIG), device, dtype).eval()


def build_tiny_flux_transformer(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return _place(FluxTransformer2DModel(**FLUX_CONFIG), device, dtype).eval()


def unet_inputs(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> dict[str, torch.Tensor]:
    """Keyword arguments for one call of the tiny UNet."""
    g = torch.Generator().manual_seed(seed)
    dt = _dtype(dtype)
    return {
        "sample": torch.randn(1, 4, 16, 16, generator=g).to(device, dt),
        "timestep": torch.tensor([10], device=device),
        "encoder_hidden_states": torch.randn(1, 7, 32, generator=g).to(device, dt),
    }


def flux_inputs(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> dict[str, torch.Tensor]:
    """Keyword arguments for one call of the tiny Flux transformer."""
    g = torch.Generator().manual_seed(seed)
    dt = _dtype(dtype)
    return {
        "hidden_states": torch.randn(1, 16, 4, generator=g).to(device, dt),
        "encoder_hidden_states": torch.randn(1, 48, 32, generator=g).to(device, dt),
        "pooled_projections": torch.randn(1, 32, generator=g).to(device, dt),
        "timestep": torch.tensor([1.0], device=device, dtype=dt),
        "img_ids": torch.zeros(16, 3, device=device, dtype=dt),
        "txt_ids": torch.zeros(48, 3, device=device, dtype=dt),
    }


def build_tiny_sd_pipeline(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> Any:
    """A StableDiffusionPipeline: tiny UNet (conv + attention), CLIP text encoder, VAE, DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = build_tiny_unet(seed, device, dtype)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=64,
            layer_norm_eps=1e-05,
            num_attention_heads=8,
            num_hidden_layers=3,
            pad_token_id=1,
            vocab_size=1000,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():  # built from configs, they start in train mode
        if isinstance(component, torch.nn.Module):
            component.eval()
    return _place(pipe, device, dtype)


def build_tiny_flux_pipeline(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> Any:
    """A FluxPipeline: tiny transformer, CLIP + T5 text encoders, VAE, flow-matching scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = build_tiny_flux_transformer(seed, device, dtype)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            pad_token_id=1,
            vocab_size=1000,
            hidden_act="gelu",
            projection_dim=32,
        )
    )
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            vocab_size=1000,
        )
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        text_encoder_2=text_encoder_2,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():  # built from configs, they start in train mode
        if isinstance(component, torch.nn.Module):
            component.eval()
    return _place(pipe, device, dtype)


def sd_call_kwargs(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> dict[str, Any]:
    """Keyword arguments for a deterministic 2-step call of the tiny SD pipeline (latents out)."""
    g = torch.Generator().manual_seed(seed)
    dt = _dtype(dtype)
    return {
        "prompt_embeds": torch.randn(1, 7, 32, generator=g).to(device, dt),
        "negative_prompt_embeds": torch.randn(1, 7, 32, generator=g).to(device, dt),
        "num_inference_steps": 2,
        "height": 32,
        "width": 32,
        "output_type": "latent",
        "generator": torch.Generator(device).manual_seed(seed),
    }


def flux_call_kwargs(
    seed: int = 0, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> dict[str, Any]:
    """Keyword arguments for a deterministic 2-step call of the tiny Flux pipeline (latents out)."""
    g = torch.Generator().manual_seed(seed)
    dt = _dtype(dtype)
    return {
        "prompt_embeds": torch.randn(1, 48, 32, generator=g).to(device, dt),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=g).to(device, dt),
        "max_sequence_length": 48,
        "num_inference_steps": 2,
        "height": 16,
        "width": 16,
        "output_type": "latent",
        "generator": torch.Generator(device).manual_seed(seed),
    }


def prompt_ids(length: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Seeded token ids of one prompt for the tiny text encoders (vocabulary of 1000)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (1, length), generator=g).to(device)


def sd_encoded_call_kwargs(pipe: Any, seed: int = 0) -> dict[str, Any]:
    """Like :func:`sd_call_kwargs`, with the prompts encoded by the pipeline's own text encoder.

    So a text-encoder LoRA (and a compiled text encoder) is part of every call.
    """
    device = pipe.text_encoder.device
    embeds = [pipe.text_encoder(prompt_ids(7, seed + i, device))[0] for i in (0, 1)]
    kwargs = sd_call_kwargs(seed, str(device), embeds[0].dtype)
    kwargs.update(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1])
    return kwargs


def flux_encoded_call_kwargs(pipe: Any, seed: int = 0) -> dict[str, Any]:
    """Like :func:`flux_call_kwargs`, with CLIP's pooled and T5's sequence embeddings computed
    by the pipeline's own text encoders, as ``FluxPipeline.encode_prompt`` does."""
    device = pipe.text_encoder.device
    pooled = pipe.text_encoder(prompt_ids(7, seed, device)).pooler_output
    embeds = pipe.text_encoder_2(prompt_ids(48, seed + 1, device))[0]
    kwargs = flux_call_kwargs(seed, str(device), embeds.dtype)
    kwargs.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    return kwargs
