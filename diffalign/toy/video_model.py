"""The ``toy-animatediff`` architecture: a stock ``AnimateDiffPipeline`` at a width a CPU can train.

The motion UNet is diffusers' ``UNetMotionModel``: a small SD 1.x ``UNet2DConditionModel`` (three levels
at 16x16, 8x8, 4x4 latents, cross-attention on the lower two) with a ``MotionAdapter``'s temporal
attention after every block, trained from scratch on moving-shape clips. The VAE and the text encoder
(frozen, random) are toy-sdxl's: its trained VAE (32x32 RGB <-> 4x16x16) and its first CLIP text encoder
and tokenizer, so the UNet's ``cross_attention_dim`` is that encoder's width. Sampling: DDIM with SD 1.5's
noise schedule.
"""

from __future__ import annotations

import torch

from diffalign.tiny import _SD_SCHEDULE
from diffalign.toy import TOY_GUIDANCE, TOY_NUM_STEPS, toy_sdxl_path
from diffalign.toy.data import IMAGE_SIZE
from diffalign.toy.model import LATENT_CHANNELS, VAE_DOWNSAMPLE  # toy-sdxl's VAE, reused

#: UNet widths per resolution level (16x16, 8x8, 4x4); the motion modules use the same widths.
UNET_CHANNELS = (32, 64, 64)
MOTION_HEADS = 4

#: Sampling defaults for ``diffalign toy eval --model toy-animatediff`` and the sample grid.
DEFAULT_NUM_STEPS = TOY_NUM_STEPS
DEFAULT_GUIDANCE = TOY_GUIDANCE


def toy_sdxl_components():
    """toy-sdxl's trained VAE and its first (frozen, random) text encoder and tokenizer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer


    root = toy_sdxl_path()
    vae = AutoencoderKL.from_pretrained(root / "vae").eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    return vae, text_encoder, tokenizer


def build_motion_unet(cross_attention_dim: int, block_out_channels=UNET_CHANNELS):
    """A randomly initialised ``UNetMotionModel`` (spatial UNet + motion adapter), as AnimateDiff assembles
    it."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // VAE_DOWNSAMPLE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        attention_head_dim=4,
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=16,
    )
    adapter = MotionAdapter(block_out_channels=tuple(block_out_channels), motion_layers_per_block=1,
                            motion_num_attention_heads=MOTION_HEADS, motion_norm_num_groups=16,
                            motion_max_seq_length=32, use_motion_mid_block=True)
    return UNetMotionModel.from_unet2d(unet, adapter)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)


def assemble_video_pipeline(unet, vae=None, text_encoder=None, tokenizer=None):
    """An ``AnimateDiffPipeline`` around a ``UNetMotionModel`` (toy-sdxl's VAE and text encoder unless given).

    The motion modules live in ``unet``; a ``MotionAdapter`` holding the same weights is registered too,
    because stock ``AnimateDiffPipeline`` requires one (it is only read when the UNet is a plain 2D one).
    """
    from diffusers import AnimateDiffPipeline, MotionAdapter

    if vae is None or text_encoder is None or tokenizer is None:
        vae, text_encoder, tokenizer = toy_sdxl_components()
    adapter = MotionAdapter(
        block_out_channels=tuple(unet.config.block_out_channels),
        motion_layers_per_block=1,
        motion_num_attention_heads=MOTION_HEADS,
        motion_norm_num_groups=16,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )
    _copy_motion_modules(unet, adapter)
    return AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                               motion_adapter=adapter, scheduler=build_scheduler())


def _copy_motion_modules(unet, adapter) -> None:
    # The adapter's parameter names are the UNet's motion-module names minus the UNet prefixes
    # (this mirrors UNetMotionModel.save_motion_modules, which writes them to a folder instead).
    motion = {k: v for k, v in unet.state_dict().items() if "motion_modules" in k}
    adapter.load_state_dict(motion)


def build_video_pipeline(seed: int = 0):
    """A ``toy-animatediff`` pipeline with a random motion UNet (toy-sdxl's VAE and text encoder)."""
    vae, text_encoder, tokenizer = toy_sdxl_components()
    torch.manual_seed(seed)
    unet = build_motion_unet(text_encoder.config.hidden_size)
    return assemble_video_pipeline(unet, vae, text_encoder, tokenizer)
