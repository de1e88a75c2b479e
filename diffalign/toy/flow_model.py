"""The ``toy-sd3`` architecture: a stock ``StableDiffusion3Pipeline`` (MMDiT + flow matching) at toy width.

Only the transformer is new. The rest is ``toy-sdxl``'s, frozen: its trained VAE (32x32 RGB -> 4x16x16
latents, ``shift_factor`` 0 and toy-sdxl's ``scaling_factor``), its two CLIP text encoders as CLIP-L and
CLIP-G, and its CLIP tokenizers. SD3 reads the pooled output of both encoders, so the first one (a plain
``CLIPTextModel`` in toy-sdxl) becomes a ``CLIPTextModelWithProjection`` with the same weights and a frozen
random projection; its token states are unchanged. The captions are read from CLIP alone (toy-sdxl's UNet
reads them from the same token states): the T5 slot holds a minimal T5 encoder whose final RMS norm has zero
weight, so its token states are exactly zero, what diffusers appends when ``text_encoder_3`` is None. It is
there because stock ``DiffusionPipeline.from_pretrained`` refuses an SD3 folder without a T5 unless the
caller passes ``text_encoder_3=None, tokenizer_3=None``. ``joint_attention_dim`` is CLIP-L + CLIP-G width
(32), so the CLIP states need no padding.
"""

from __future__ import annotations

import torch

from diffalign.tiny import build_tiny_t5_tokenizer
from diffalign.toy import TOY_GUIDANCE, TOY_NUM_STEPS, toy_sdxl_path
from diffalign.toy.data import IMAGE_SIZE
from diffalign.toy.model import LATENT_CHANNELS, VAE_DOWNSAMPLE

#: MMDiT size: 1x1 patches of the 16x16 latents (256 image tokens; 2x2 patches, 64 tokens, drew every shape as
#: the same blob), width HEADS x HEAD_DIM.
PATCH_SIZE = 1
NUM_LAYERS = 4
NUM_HEADS = 6
HEAD_DIM = 16
#: CLIP tokens per caption (the tokenizers' ``model_max_length``, which the stock pipeline pads to). The
#: longest toy caption is 13 tokens and CLIP is causal, so 24 tokens give the caption states that 77 would;
#: the transformer then attends over 53 fewer padding states.
CLIP_TOKENS = 24
#: Flow schedule shift used for training and sampling (SD3 uses 3 at 1024 px; 64 tokens need less).
FLOW_SHIFT = 1.0

#: Sampling defaults that follow the captions well (see ``diffalign toy eval``).
DEFAULT_NUM_STEPS = TOY_NUM_STEPS
DEFAULT_GUIDANCE = TOY_GUIDANCE


def build_transformer(num_layers: int = NUM_LAYERS, num_heads: int = NUM_HEADS, head_dim: int = HEAD_DIM,
                      patch_size: int = PATCH_SIZE):
    from diffusers import SD3Transformer2DModel

    clip_width = 32  # toy-sdxl's two encoders, 16 wide each, concatenated (token states and pooled)
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // VAE_DOWNSAMPLE,
        patch_size=patch_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=clip_width,
        caption_projection_dim=num_heads * head_dim,
        pooled_projection_dim=clip_width,
        pos_embed_max_size=IMAGE_SIZE // VAE_DOWNSAMPLE // patch_size,
        qk_norm="rms_norm",
    )


def build_zero_t5(d_model: int = 32):
    """A one-layer T5 encoder (and its offline tokenizer) whose outputs are exactly zero (see the module
    docstring)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tiny_t5_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=d_model, num_layers=1,
                      num_heads=1, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    torch.manual_seed(0)
    encoder = T5EncoderModel(config)
    with torch.no_grad():
        encoder.encoder.final_layer_norm.weight.zero_()
    return encoder.eval().requires_grad_(False), tokenizer


def toy_sdxl_components(seed: int = 0, folder=None, clip_tokens: int = CLIP_TOKENS) -> dict:
    """toy-sdxl's VAE, text encoders and tokenizers (padding to ``clip_tokens``), ready for SD3 (see the
    module docstring)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = folder or toy_sdxl_path()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    vae.register_to_config(shift_factor=0.0)  # SD3 decodes latents / scaling_factor + shift_factor
    clip_l = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(clip_l.config)
    # transformers 5's CLIPTextModel is the text transformer itself; 4's wraps it as .text_model
    text_encoder.text_model.load_state_dict(getattr(clip_l, "text_model", clip_l).state_dict())
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=name, model_max_length=clip_tokens)
                  for name in ("tokenizer", "tokenizer_2")]
    return {
        "vae": vae.eval().requires_grad_(False),
        "text_encoder": text_encoder.eval().requires_grad_(False),
        "text_encoder_2": text_encoder_2.eval().requires_grad_(False),
        "tokenizer": tokenizers[0],
        "tokenizer_2": tokenizers[1],
    }


def build_flow_pipeline(seed: int = 0, transformer=None, num_layers: int = NUM_LAYERS,
                        num_heads: int = NUM_HEADS, toy_sdxl_folder=None, patch_size: int = PATCH_SIZE,
                        clip_tokens: int = CLIP_TOKENS):
    """A ``StableDiffusion3Pipeline`` of the toy architecture (random transformer unless given)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    parts = toy_sdxl_components(seed + 2, toy_sdxl_folder, clip_tokens)
    if transformer is None:
        torch.manual_seed(seed + 1)
        transformer = build_transformer(num_layers, num_heads, patch_size=patch_size)
    text_encoder_3, tokenizer_3 = build_zero_t5(transformer.config.joint_attention_dim)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, **parts)
