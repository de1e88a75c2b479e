"""The ``toy-sdxl`` architecture: the real SDXL pipeline classes at a width a CPU can train.

32x32 RGB images; a two-level ``AutoencoderKL`` (4 latent channels at 16x16); a three-level
``UNet2DConditionModel`` with SDXL's ``text_time`` added conditioning (a few million parameters); two
small random CLIP text encoders that stay frozen (the UNet learns to read their token states, which keep
every word of the short toy captions apart); the real CLIP BPE tokenizer.
"""

from __future__ import annotations

import torch

from diffalign.tiny import _text_encoder_config, assemble_sdxl
from diffalign.toy import TOY_GUIDANCE, TOY_NUM_STEPS
from diffalign.toy.data import IMAGE_SIZE

#: Text encoder widths: kept small because each encoder holds a 49408-token embedding table.
TEXT_HIDDEN = 16
TEXT_LAYERS = 2
PROJECTION_DIM = 16
TIME_EMBED_DIM = 16
LATENT_CHANNELS = 4
VAE_DOWNSAMPLE = 2  # 32x32 images -> 16x16 latents
#: UNet widths per resolution level (16x16, 8x8, 4x4): 1.7M parameters, ~0.13 s per batch of 32 on 2 CPU
#: cores.
UNET_CHANNELS = (32, 64, 64)

#: Sampling defaults that follow the captions well (see ``diffalign toy eval``).
DEFAULT_NUM_STEPS = TOY_NUM_STEPS
DEFAULT_GUIDANCE = TOY_GUIDANCE


def build_vae():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,  # plain shapes need no attention; it would double the VAE's cost
    )
    vae.register_to_config(force_upcast=False)
    return vae


def build_unet(block_out_channels=UNET_CHANNELS):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // VAE_DOWNSAMPLE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        attention_head_dim=(4, 4, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1, 1),
        # SDXL wiring: cross-attention reads both encoders' penultimate token states (concatenated);
        # encoder 2's pooled projection and the six size/crop ids enter as "text_time" embeddings.
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=PROJECTION_DIM + 6 * TIME_EMBED_DIM,
        norm_num_groups=16,
    )


def build_text_encoders(seed: int):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_encoder_config(TEXT_HIDDEN, TEXT_LAYERS, PROJECTION_DIM))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_encoder_config(TEXT_HIDDEN, TEXT_LAYERS, PROJECTION_DIM)
    )
    return text_encoder.eval().requires_grad_(False), text_encoder_2.eval().requires_grad_(False)


def build_toy_pipeline(seed: int = 0, vae=None, unet=None):
    """A ``StableDiffusionXLPipeline`` of the toy architecture (random weights unless given)."""
    text_encoder, text_encoder_2 = build_text_encoders(seed + 2)
    if vae is None:
        torch.manual_seed(seed)
        vae = build_vae()
    if unet is None:
        torch.manual_seed(seed + 1)
        unet = build_unet()
    return assemble_sdxl(vae, unet, text_encoder, text_encoder_2)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
