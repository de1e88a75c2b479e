"""Tiny random-weight pipelines of the real SD / SDXL / AnimateDiff / Wan / SD3 / FLUX architectures, built
offline.

Tests and examples cannot reach a model hub, so the package builds its own small models: the same
classes and wiring as the real pipelines (SDXL: two CLIP text encoders, ``text_time`` added conditioning;
SD3: CLIP-L + CLIP-G + T5 into an MMDiT; FLUX: CLIP-L pooled + T5, packed latents, guidance embedding), a
real CLIP BPE tokenizer made from the vocabulary that ``open-clip-torch`` ships, a small T5-style Unigram
tokenizer built in code, and small widths so that a forward pass costs milliseconds on a CPU. Same seed,
same weights.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from diffalign.files import apply_umask

TINY_KINDS = ("sd", "sdxl", "animatediff", "wan", "sd3", "flux")
#: Bump when the tiny architectures change, so cached builds are rebuilt.
TINY_VERSION = 2

# SD 1.x / SDXL noise schedule (the real pipelines' scheduler configs).
_SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)



#: FLUX.1-dev's scheduler config: the flow schedule shifted by the image's packed token count (mu).
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

def clip_bpe_path() -> Path:
    """The CLIP BPE merges file that open-clip-torch ships (the same merges as OpenAI CLIP)."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"open-clip-torch does not ship its BPE vocabulary at {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-unicode table of GPT-2 / CLIP BPE.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer_files(out_dir: str | os.PathLike) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of the 49408-token CLIP tokenizer into ``out_dir``.

    The vocabulary is derived exactly as CLIP derives it from its merges: 256 byte symbols, the same with
    the end-of-word marker, one token per merge, then the start/end-of-text tokens (ids 49406, 49407).
    """
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )


def build_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A ``transformers.CLIPTokenizer`` equal to OpenAI CLIP's, built offline.

    SD 1.x and SDXL's first tokenizer pad with ``<|endoftext|>``; SDXL's second pads with ``!`` (id 0).
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp)
        # from_pretrained reads vocab.json + merges.txt in every transformers version (4.x and 5.x).
        return CLIPTokenizer.from_pretrained(tmp, pad_token=pad_token, model_max_length=77)


def _text_encoder_config(hidden: int, layers: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def _tiny_vae(latent_channels: int = 4, **config):
    from diffusers import AutoencoderKL

    # Two resolution levels: latents are half the image side (the real VAE: one eighth).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        **config,
    )


def build_tiny_sd(seed: int = 0):
    """A tiny ``StableDiffusionPipeline`` (SD 1.x architecture) with random weights."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_encoder_config(hidden=32, layers=2, projection_dim=32))
    scheduler = PNDMScheduler(**_SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl(seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline`` with random weights: two text encoders, ``text_time``
    conditioning."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    hidden_1, hidden_2, projection_dim, time_embed_dim = 32, 32, 32, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        # SDXL: cross-attention sees both encoders' penultimate states concatenated; the pooled
        # projection of encoder 2 and six micro-conditioning ids enter as "text_time" added embeddings.
        cross_attention_dim=hidden_1 + hidden_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=projection_dim + 6 * time_embed_dim,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    vae.register_to_config(force_upcast=True)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_encoder_config(hidden_1, layers=2, projection_dim=projection_dim))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_encoder_config(hidden_2, layers=2, projection_dim=projection_dim)
    )
    return assemble_sdxl(vae, unet, text_encoder, text_encoder_2)


def assemble_sd3(transformer, vae, text_encoder, text_encoder_2, text_encoder_3, tokenizer_3):
    """An SD3 pipeline around these models: the real CLIP tokenizers and SD3's shifted flow schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def assemble_flux(transformer, vae, text_encoder, text_encoder_2, tokenizer_2):
    """A FLUX pipeline around these models: the real CLIP tokenizer, FLUX.1-dev's dynamic-shift schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def assemble_sdxl(vae, unet, text_encoder, text_encoder_2):
    """An SDXL pipeline around these models, with the real tokenizers and SDXL's Euler scheduler config."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(**_SD_SCHEDULE, interpolation_type="linear", use_karras_sigmas=False)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_animatediff(seed: int = 0):
    """A tiny ``AnimateDiffPipeline``: an SD 1.x UNet plus a ``MotionAdapter``, DDIM as AnimateDiff ships
    it."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    base = build_tiny_sd(seed)
    torch.manual_seed(seed + 10)
    adapter = MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="linspace",
    )
    return AnimateDiffPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        motion_adapter=adapter,
        scheduler=scheduler,
    )


# A small word-level vocabulary for the tiny Wan tokenizer (the real one is UMT5's 256k SentencePiece model,
# which cannot be downloaded here): T5's special ids, then words, then single characters as a fallback.
_TINY_T5_WORDS = (
    "a an the of on in and with to at is are photo video cat dog red green blue yellow white black purple "
    "orange circle square triangle star moving left right up down small large big two three one background "
    "shape animal person car tree sky water sun moon house"
).split()


def build_tiny_t5_tokenizer():
    """A T5-style Unigram tokenizer (``<pad>``=0, ``</s>``=1, ``<unk>``=2, appends ``</s>``), built
    offline."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in _TINY_T5_WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    pieces += [(f"▁{c}", -4.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = Tokenizer(Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def build_tiny_wan(seed: int = 0):
    """A tiny ``WanPipeline`` (Wan 2.1 text-to-video architecture: UMT5 encoder, causal 3D VAE, flow
    matching)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)


def _tiny_t5_encoder(vocab_size: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1 (gated GELU), as SD3's and FLUX's T5-XXL encoders are.
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_gated_act=True,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def build_tiny_sd3(seed: int = 0):
    """A tiny ``StableDiffusion3Pipeline`` (SD3.5-medium architecture): an MMDiT with one dual-attention layer
    and RMS-normed q/k, CLIP-L + CLIP-G (both with projection) + T5, a 16-channel VAE with SD3's scale and
    shift."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    clip_hidden, clip_projection, t5_dim = 32, 32, 64
    tokenizer_3 = build_tiny_t5_tokenizer()
    torch.manual_seed(seed)
    # The joint sequence is the CLIP states (L and G concatenated, zero-padded to T5's width) then T5's:
    # joint_attention_dim = T5's d_model; the pooled projection is the two CLIP projections concatenated.
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_dim,
        caption_projection_dim=32,
        pooled_projection_dim=2 * clip_projection,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(
        16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(
        _text_encoder_config(clip_hidden, layers=2, projection_dim=clip_projection)
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_encoder_config(clip_hidden, layers=2, projection_dim=clip_projection)
    )
    torch.manual_seed(seed + 4)
    text_encoder_3 = _tiny_t5_encoder(len(tokenizer_3), t5_dim)
    return assemble_sd3(transformer, vae, text_encoder, text_encoder_2, text_encoder_3, tokenizer_3)


def build_tiny_flux(seed: int = 0):
    """A tiny ``FluxPipeline`` shaped like FLUX.1-dev: double- and single-stream blocks, the guidance
    embedding (guidance-distilled: no CFG), CLIP-L pooled + T5 states, packed 2x2 latents of a 16-channel VAE,
    and the dynamically shifted Euler scheduler FLUX.1-dev ships."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    clip_hidden, t5_dim = 32, 64
    tokenizer_2 = build_tiny_t5_tokenizer()
    torch.manual_seed(seed)
    # in_channels = 4 x the VAE's 16 (latents are packed 2x2); the rope axes add up to the head dim.
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_dim,
        pooled_projection_dim=clip_hidden,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(
        16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_encoder_config(clip_hidden, layers=2, projection_dim=clip_hidden))
    torch.manual_seed(seed + 3)
    text_encoder_2 = _tiny_t5_encoder(len(tokenizer_2), t5_dim)
    return assemble_flux(transformer, vae, text_encoder, text_encoder_2, tokenizer_2)


_BUILDERS = {
    "sd": build_tiny_sd,
    "sdxl": build_tiny_sdxl,
    "animatediff": build_tiny_animatediff,
    "wan": build_tiny_wan,
    "sd3": build_tiny_sd3,
    "flux": build_tiny_flux,
}


def build_tiny(kind: str, seed: int = 0):
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {', '.join(TINY_KINDS)}")
    return _BUILDERS[kind](seed)


def save_pipeline(pipe, out_dir: str | os.PathLike, replace: bool = True) -> Path:
    """Write ``pipe`` as a diffusers folder (safetensors), atomically: a crash leaves the old folder or none.

    CLIP tokenizers are written as ``vocab.json`` + ``merges.txt``, as the real SD/SDXL repositories ship
    them: every transformers version loads those (transformers 4's slow ``CLIPTokenizer`` needs them; 5 writes
    only a ``tokenizer.json`` that 4 cannot use), and they are half the size.
    """

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, component in pipe.components.items():
            if type(component).__name__.startswith("CLIPTokenizer"):
                (tmp / name / "tokenizer.json").unlink(missing_ok=True)
                write_clip_tokenizer_files(tmp / name)

    return write_folder_atomically(out_dir, write, replace)


def write_folder_atomically(out_dir: str | os.PathLike, write, replace: bool = True) -> Path:
    """Call ``write(tmp)`` on a fresh sibling folder, then swap it into place: a crash leaves the old folder
    or none. With ``replace=False`` (a cache that processes started together may all fill) a non-empty folder
    another process put there first is kept and ours dropped, so nobody loading it sees it removed."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        apply_umask(tmp)
        if replace and out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)  # onto an empty folder it succeeds, onto a non-empty one it fails
        except OSError:  # not replacing: a non-empty folder is there, another process's identical build
            if replace or not out.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_tiny(kind: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny pipeline and write it as a diffusers folder."""
    return save_pipeline(build_tiny(kind, seed), out_dir)


def cache_dir() -> Path:
    """Where built-in models are built once and kept: ``$DIFFALIGN_CACHE`` or ``~/.cache/diffalign``."""
    root = os.environ.get("DIFFALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffalign"
    )
    return Path(root)


def cached_tiny(kind: str, seed: int = 0) -> Path:
    """Path of the tiny ``kind`` pipeline folder, built on first use."""
    path = cache_dir() / "tiny" / f"{kind}-seed{seed}-v{TINY_VERSION}"
    index = path / "model_index.json"
    if not index.exists():
        # builds land whole (renamed into place), so a folder without its index is a leftover to replace
        save_pipeline(build_tiny(kind, seed), path, replace=path.exists())
    return path
