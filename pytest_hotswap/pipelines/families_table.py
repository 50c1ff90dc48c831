"""The table of tiny pipeline families: data only, read by :func:`families.build_family`.

Each :class:`Family` is data: the diffusers pipeline class and its components, each component a
class name with the keyword arguments of diffusers' own fast tests
(``tests/pipelines/<family>/test_*.py``, ``get_dummy_components``), a tokenizer name from
:mod:`families_tokenizers`, or a plain value (``boundary_ratio``). :func:`build_family` reads an
entry and builds the pipeline.

Where this table departs from diffusers' tests, the entry says why (the tests download their
tokenizers and the text encoders' configs from the hub; here both are built locally, and the Qwen
text encoders' vocabulary is cut to 1000 ids to match the offline tokenizer).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Part:
    """A model or scheduler: ``library.Class(**kwargs)``, or ``Class(Config(**kwargs))``.

    ``constants`` fills named parameters after construction (a model that leaves some of its
    parameters uninitialized, ``torch.empty``, would otherwise give non-finite outputs).
    """

    cls: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: str | None = None
    constants: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """An offline tokenizer by its name in :data:`families_tokenizers.TOKENIZERS`."""

    kind: str


@dataclasses.dataclass(frozen=True)
class Family:
    """One pipeline family: its diffusers pipeline class and how to build its tiny components."""

    name: str
    pipeline: str
    components: dict[str, Any]
    description: str


# --- shared tiny parts (the fast tests of several families use the same ones) ----------------


#: The tiny SD UNet and Flux transformer (diffusers' fast-test sizes); `tiny.py` builds them too.
UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "norm_num_groups": 2,
}

FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 4, 8],
}

_CLIP_TEXT = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "pad_token_id": 1,
    "vocab_size": 1000,
    "hidden_act": "gelu",
    "projection_dim": 32,
}
# The fast tests read hf-internal-testing/tiny-random-t5 from the hub: a T5 of d_model 32.
_T5 = Part(
    "transformers.T5EncoderModel",
    {
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "vocab_size": 1000,
    },
    config="transformers.T5Config",
)
_FLUX_VAE = Part(
    "diffusers.AutoencoderKL",
    {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (4,),
        "layers_per_block": 1,
        "latent_channels": 1,
        "norm_num_groups": 1,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "shift_factor": 0.0609,
        "scaling_factor": 1.5035,
    },
)
_FLOW = Part("diffusers.FlowMatchEulerDiscreteScheduler")
_SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
_WAN_TRANSFORMER = Part(
    "diffusers.WanTransformer3DModel",
    {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 32,
        "freq_dim": 256,
        "ffn_dim": 32,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 32,
    },
)

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "sd",
            "StableDiffusionPipeline",
            {
                "unet": Part(
                    "diffusers.UNet2DConditionModel",
                    UNET_CONFIG,
                ),
                "vae": Part(
                    "diffusers.AutoencoderKL",
                    {
                        "block_out_channels": [4, 8],
                        "in_channels": 3,
                        "out_channels": 3,
                        "down_block_types": ["DownEncoderBlock2D"] * 2,
                        "up_block_types": ["UpDecoderBlock2D"] * 2,
                        "latent_channels": 4,
                        "norm_num_groups": 2,
                    },
                ),
                "text_encoder": Part(
                    "transformers.CLIPTextModel",
                    {**_CLIP_TEXT, "intermediate_size": 64, "num_attention_heads": 8},
                    config="transformers.CLIPTextConfig",
                ),
                "tokenizer": Tokenizer("clip"),
                "scheduler": Part(
                    "diffusers.DDIMScheduler",
                    {**_SD_SCHEDULER, "clip_sample": False, "set_alpha_to_one": False},
                ),
                "safety_checker": None,
                "feature_extractor": None,
                "image_encoder": None,
                "requires_safety_checker": False,
            },
            "Stable Diffusion 1.x: UNet, CLIP",
        ),
        Family(
            "sdxl",
            "StableDiffusionXLPipeline",
            {
                "unet": Part(
                    "diffusers.UNet2DConditionModel",
                    {
                        "block_out_channels": (2, 4),
                        "layers_per_block": 2,
                        "sample_size": 32,
                        "in_channels": 4,
                        "out_channels": 4,
                        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
                        "attention_head_dim": (2, 4),
                        "use_linear_projection": True,
                        "addition_embed_type": "text_time",
                        "addition_time_embed_dim": 8,
                        "transformer_layers_per_block": (1, 2),
                        "projection_class_embeddings_input_dim": 80,  # 6 * 8 + 32
                        "cross_attention_dim": 64,
                        "norm_num_groups": 1,
                    },
                ),
                "vae": Part(
                    "diffusers.AutoencoderKL",
                    {
                        "block_out_channels": [32, 64],
                        "in_channels": 3,
                        "out_channels": 3,
                        "down_block_types": ["DownEncoderBlock2D"] * 2,
                        "up_block_types": ["UpDecoderBlock2D"] * 2,
                        "latent_channels": 4,
                        "sample_size": 128,
                    },
                ),
                "text_encoder": Part(
                    "transformers.CLIPTextModel", _CLIP_TEXT, config="transformers.CLIPTextConfig"
                ),
                "text_encoder_2": Part(
                    "transformers.CLIPTextModelWithProjection",
                    _CLIP_TEXT,
                    config="transformers.CLIPTextConfig",
                ),
                "tokenizer": Tokenizer("clip"),
                "tokenizer_2": Tokenizer("clip"),
                "scheduler": Part(
                    "diffusers.EulerDiscreteScheduler",
                    {**_SD_SCHEDULER, "timestep_spacing": "leading"},
                ),
                "image_encoder": None,
                "feature_extractor": None,
                # None would probe for the invisible-watermark package; tiny latents need none.
                "add_watermarker": False,
            },
            "Stable Diffusion XL: UNet with added time ids, two CLIPs",
        ),
        Family(
            "sd3",
            "StableDiffusion3Pipeline",
            {
                "transformer": Part(
                    "diffusers.SD3Transformer2DModel",
                    {
                        "sample_size": 32,
                        "patch_size": 1,
                        "in_channels": 4,
                        "num_layers": 1,
                        "attention_head_dim": 8,
                        "num_attention_heads": 4,
                        "caption_projection_dim": 32,
                        "joint_attention_dim": 32,
                        "pooled_projection_dim": 64,
                        "out_channels": 4,
                    },
                ),
                "text_encoder": Part(
                    "transformers.CLIPTextModelWithProjection",
                    _CLIP_TEXT,
                    config="transformers.CLIPTextConfig",
                ),
                "text_encoder_2": Part(
                    "transformers.CLIPTextModelWithProjection",
                    _CLIP_TEXT,
                    config="transformers.CLIPTextConfig",
                ),
                "text_encoder_3": _T5,
                "tokenizer": Tokenizer("clip"),
                "tokenizer_2": Tokenizer("clip"),
                "tokenizer_3": Tokenizer("t5"),
                "vae": Part("diffusers.AutoencoderKL", {**_FLUX_VAE.kwargs, "latent_channels": 4}),
                "scheduler": _FLOW,
            },
            "Stable Diffusion 3: MMDiT transformer, two CLIPs and T5",
        ),
        Family(
            "flux",
            "FluxPipeline",
            {
                "transformer": Part(
                    "diffusers.FluxTransformer2DModel",
                    FLUX_CONFIG,
                ),
                "text_encoder": Part(
                    "transformers.CLIPTextModel", _CLIP_TEXT, config="transformers.CLIPTextConfig"
                ),
                "text_encoder_2": _T5,
                "tokenizer": Tokenizer("clip"),
                "tokenizer_2": Tokenizer("t5"),
                "vae": _FLUX_VAE,
                "scheduler": _FLOW,
                "image_encoder": None,
                "feature_extractor": None,
            },
            "Flux.1: double and single stream transformer, CLIP and T5",
        ),
        Family(
            "wan",
            "WanPipeline",
            {
                "transformer": _WAN_TRANSFORMER,
                "transformer_2": _WAN_TRANSFORMER,  # Wan 2.2: the low-noise expert
                "vae": Part(
                    "diffusers.AutoencoderKLWan",
                    {
                        "base_dim": 3,
                        "z_dim": 16,
                        "dim_mult": [1, 1, 1, 1],
                        "num_res_blocks": 1,
                        "temperal_downsample": [False, True, True],
                    },
                ),
                # WanPipeline declares UMT5 (the fast test's T5 works, with a type warning)
                "text_encoder": dataclasses.replace(
                    _T5, cls="transformers.UMT5EncoderModel", config="transformers.UMT5Config"
                ),
                "tokenizer": Tokenizer("t5"),
                "scheduler": Part(
                    "diffusers.UniPCMultistepScheduler",
                    {
                        "prediction_type": "flow_prediction",
                        "use_flow_sigmas": True,
                        "flow_shift": 3.0,
                    },
                ),
                "boundary_ratio": 0.875,
            },
            "Wan 2.2 text-to-video: two transformer experts split at boundary_ratio, T5",
        ),
        Family(
            "qwenimage",
            "QwenImagePipeline",
            {
                "transformer": Part(
                    "diffusers.QwenImageTransformer2DModel",
                    {
                        "patch_size": 2,
                        "in_channels": 16,
                        "out_channels": 4,
                        "num_layers": 2,
                        "attention_head_dim": 16,
                        "num_attention_heads": 3,
                        "joint_attention_dim": 16,
                        "guidance_embeds": False,
                        "axes_dims_rope": (8, 4, 4),
                    },
                ),
                "vae": Part(
                    "diffusers.AutoencoderKLQwenImage",
                    {
                        "base_dim": 24,
                        "z_dim": 4,
                        "dim_mult": [1, 2, 4],
                        "num_res_blocks": 1,
                        "temperal_downsample": [False, True],
                        "latents_mean": [0.0] * 4,
                        "latents_std": [1.0] * 4,
                    },
                ),
                "text_encoder": Part(
                    "transformers.Qwen2_5_VLForConditionalGeneration",
                    {
                        "text_config": {
                            "hidden_size": 16,
                            "intermediate_size": 16,
                            "num_hidden_layers": 2,
                            "num_attention_heads": 2,
                            "num_key_value_heads": 2,
                            "rope_scaling": {
                                "mrope_section": [1, 1, 2],
                                "rope_type": "default",
                                "type": "default",
                            },
                            "rope_theta": 1000000.0,
                            "vocab_size": 1000,
                            # <|endoftext|> and <|im_end|> of the offline Qwen tokenizer
                            "bos_token_id": 256,
                            "eos_token_id": 258,
                        },
                        "vision_config": {
                            "depth": 2,
                            "hidden_size": 16,
                            "intermediate_size": 16,
                            "num_heads": 2,
                            "out_hidden_size": 16,
                        },
                        "hidden_size": 16,
                        "vocab_size": 1000,  # the tests' 152064 fits Qwen's real tokenizer
                        "bos_token_id": 256,
                        "eos_token_id": 258,
                    },
                    config="transformers.Qwen2_5_VLConfig",
                ),
                "tokenizer": Tokenizer("qwen"),
                "scheduler": _FLOW,
            },
            "QwenImage: MMDiT transformer, Qwen2.5-VL text encoder",
        ),
        Family(
            "chroma",
            "ChromaPipeline",
            {
                "transformer": Part(
                    "diffusers.ChromaTransformer2DModel",
                    {
                        "patch_size": 1,
                        "in_channels": 4,
                        "num_layers": 1,
                        "num_single_layers": 1,
                        "attention_head_dim": 16,
                        "num_attention_heads": 2,
                        "joint_attention_dim": 32,
                        "axes_dims_rope": [4, 4, 8],
                        "approximator_hidden_dim": 32,
                        "approximator_layers": 1,
                        "approximator_num_channels": 16,
                    },
                ),
                "text_encoder": _T5,
                "tokenizer": Tokenizer("t5"),
                "vae": _FLUX_VAE,
                "scheduler": _FLOW,
                "image_encoder": None,
                "feature_extractor": None,
            },
            "Chroma: Flux-like transformer with a modulation approximator, T5 only",
        ),
        Family(
            "zimage",
            "ZImagePipeline",
            {
                "transformer": Part(
                    "diffusers.ZImageTransformer2DModel",
                    {
                        "all_patch_size": (2,),
                        "all_f_patch_size": (1,),
                        "in_channels": 16,
                        "dim": 32,
                        "n_layers": 2,
                        "n_refiner_layers": 1,
                        "n_heads": 2,
                        "n_kv_heads": 2,
                        "norm_eps": 1e-5,
                        "qk_norm": True,
                        "cap_feat_dim": 16,
                        "rope_theta": 256.0,
                        "t_scale": 1000.0,
                        "axes_dims": [8, 4, 4],
                        "axes_lens": [256, 32, 32],
                    },
                    # created with torch.empty: fixed as diffusers' fast test does
                    constants={"x_pad_token": 1.0, "cap_pad_token": 1.0},
                ),
                "vae": Part(
                    "diffusers.AutoencoderKL",
                    {
                        "in_channels": 3,
                        "out_channels": 3,
                        "down_block_types": ["DownEncoderBlock2D"] * 2,
                        "up_block_types": ["UpDecoderBlock2D"] * 2,
                        "block_out_channels": [32, 64],
                        "layers_per_block": 1,
                        "latent_channels": 16,
                        "norm_num_groups": 32,
                        "sample_size": 32,
                        "scaling_factor": 0.3611,
                        "shift_factor": 0.1159,
                    },
                ),
                "text_encoder": Part(
                    "transformers.Qwen3Model",
                    {
                        "hidden_size": 16,
                        "intermediate_size": 16,
                        "num_hidden_layers": 2,
                        "num_attention_heads": 2,
                        "num_key_value_heads": 2,
                        "vocab_size": 1000,  # the tests' 151936 fits Qwen's real tokenizer
                        "max_position_embeddings": 512,
                    },
                    config="transformers.Qwen3Config",
                ),
                "tokenizer": Tokenizer("qwen"),
                "scheduler": _FLOW,
            },
            "Z-Image: single-stream transformer with refiners, Qwen3 text encoder",
        ),
    )
}
