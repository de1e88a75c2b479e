"""Real-size architectures with random weights, for GPU measurements that need no hub download.

    python benchmarks/real_size.py sdxl runs/real-sdxl [--dtype bf16] [--device cuda]
    python benchmarks/real_size.py animatediff runs/real-animatediff
    python benchmarks/real_size.py sd3 runs/real-sd3        # SD3.5-medium
    python benchmarks/real_size.py flux runs/real-flux      # FLUX.1-dev
    python benchmarks/real_size.py sdxl --count          # parameter counts only (meta device, instant)

Writes a diffusers pipeline folder that every benchmark takes as ``--model FOLDER``. The shapes are those
of the public checkpoints (``stabilityai/stable-diffusion-xl-base-1.0``; ``runwayml/stable-diffusion-v1-5``
with ``guoyww/animatediff-motion-adapter-v1-5-2``; ``stabilityai/stable-diffusion-3.5-medium``;
``black-forest-labs/FLUX.1-dev``), checked by parameter count: the numbers measure the architectures' cost
(time, memory, bytes), never image quality. CLIP tokenizers are the real CLIP BPE (``diffalign.tiny``); the
T5 tokenizer is the tiny word-level one (prompts are padded to the pipelines' fixed T5 lengths, so the cost
is the same); the schedulers are the ones those repositories ship.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.tiny import (
    _SD_SCHEDULE,
    assemble_flux,
    assemble_sd3,
    assemble_sdxl,
    build_clip_tokenizer,
    build_tiny_t5_tokenizer,
    save_pipeline,
)

#: Parameter counts of the public checkpoints (the built modules must match them exactly). The motion
#: adapter's count is not checked (None): its shape follows the v1-5-2 config, its count is not on record
#: here. SD3.5-medium's transformer holds 2,243,171,520 parameters plus a 384x384x1536 sin-cos position table
#: (226,492,416, a persistent buffer): 2,469,663,936 stored elements, the count its checkpoint reports
#: (checked as "transformer stored"). T5-XXL encoder 4,762,310,656 and CLIP-G 694,659,840 as in SD3-medium;
#: FLUX.1-dev's transformer 11,901,408,320 (its safetensors total).
EXPECTED_PARAMETERS = {
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
    "animatediff": {
        "spatial unet": 859_520_964,
        "motion_adapter": None,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
    },
    "sd3": {
        "transformer": 2_243_171_520,
        "transformer stored": 2_469_663_936,
        "vae": 83_819_683,
        "text_encoder": 123_650_304,
        "text_encoder_2": 694_659_840,
        "text_encoder_3": 4_762_310_656,
    },
    "flux": {
        "transformer": 11_901_408_320,
        "vae": 83_819_683,
        "text_encoder": 123_060_480,
        "text_encoder_2": 4_762_310_656,
    },
}


def _clip_text(hidden: int, layers: int, heads: int, act: str, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(sample_size: int, scaling_factor: float, force_upcast: bool, latent_channels: int = 4, **config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
        **config,
    )


def _flow_vae(scaling_factor: float, shift_factor: float):
    # SD3's and FLUX's 16-channel VAE: no quant convs, a shift as well as a scale.
    return _vae(1024, scaling_factor, force_upcast=True, latent_channels=16, shift_factor=shift_factor,
                use_quant_conv=False, use_post_quant_conv=False)


def _t5_xxl(vocab_size: int = 32128):
    from transformers import T5Config, T5EncoderModel

    # google/t5-v1_1-xxl's encoder, as SD3 and FLUX use it
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                   num_heads=64, feed_forward_proj="gated-gelu", is_gated_act=True,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def build_sdxl(device: str, done=lambda name: None):
    """``done(name)`` is called after each component is built (initialising 2.6 B weights on a CPU takes
    minutes)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):  # the models only: the scheduler keeps its tables on the CPU
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        done("unet")
        vae = _vae(1024, 0.13025, force_upcast=True)
        done("vae")
        text_encoder = _clip_text(768, 12, 12, "quick_gelu", with_projection=False)
        done("text_encoder")
        text_encoder_2 = _clip_text(1280, 32, 20, "gelu", with_projection=True)
        done("text_encoder_2")
    return assemble_sdxl(vae, unet, text_encoder, text_encoder_2)


def build_animatediff(device: str, done=lambda name: None):
    from diffusers import (
        AnimateDiffPipeline,
        DDIMScheduler,
        MotionAdapter,
        UNet2DConditionModel,
        UNetMotionModel,
    )

    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
        )
        done("unet")
        adapter = MotionAdapter(
            block_out_channels=(320, 640, 1280, 1280),
            motion_layers_per_block=2,
            motion_num_attention_heads=8,
            motion_norm_num_groups=32,
            motion_max_seq_length=32,
            use_motion_mid_block=True,
        )
        motion_unet = UNetMotionModel.from_unet2d(unet, adapter)
        done("motion_adapter")
        vae = _vae(512, 0.18215, force_upcast=True)
        done("vae")
        text_encoder = _clip_text(768, 12, 12, "quick_gelu", with_projection=False)
        done("text_encoder")
    scheduler = DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    return AnimateDiffPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=motion_unet,
        motion_adapter=adapter,
        scheduler=scheduler,
    )


def build_sd3(device: str, done=lambda name: None):
    """Stable Diffusion 3.5 medium: MMDiT-X (13 dual-attention layers, RMS q/k norm), CLIP-L/G + T5-XXL."""
    from diffusers import SD3Transformer2DModel

    with torch.device(device):
        transformer = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        )
        done("transformer")
        vae = _flow_vae(scaling_factor=1.5305, shift_factor=0.0609)
        done("vae")
        text_encoder = _clip_text(768, 12, 12, "quick_gelu", with_projection=True)
        done("text_encoder")
        text_encoder_2 = _clip_text(1280, 32, 20, "gelu", with_projection=True)
        done("text_encoder_2")
        text_encoder_3 = _t5_xxl()
        done("text_encoder_3")
    return assemble_sd3(transformer, vae, text_encoder, text_encoder_2, text_encoder_3,
                        build_tiny_t5_tokenizer())


def build_flux(device: str, done=lambda name: None):
    """FLUX.1 [dev]: 19 double- and 38 single-stream blocks, guidance embedding, CLIP-L pooled + T5-XXL."""
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
        done("transformer")
        vae = _flow_vae(scaling_factor=0.3611, shift_factor=0.1159)
        done("vae")
        text_encoder = _clip_text(768, 12, 12, "quick_gelu", with_projection=False)
        done("text_encoder")
        text_encoder_2 = _t5_xxl()
        done("text_encoder_2")
    return assemble_flux(transformer, vae, text_encoder, text_encoder_2, build_tiny_t5_tokenizer())


BUILDERS = {"sdxl": build_sdxl, "animatediff": build_animatediff, "sd3": build_sd3, "flux": build_flux}
#: Components each builder reports, then casting and saving.
STAGES = {"sdxl": 4, "animatediff": 4, "sd3": 5, "flux": 4}


def parameter_counts(pipe, kind: str) -> dict[str, int]:
    def count(module, skip: str = "") -> int:
        return sum(p.numel() for name, p in module.named_parameters() if not (skip and skip in name))

    counts = {name: count(getattr(pipe, name)) for name in EXPECTED_PARAMETERS[kind] if hasattr(pipe, name)}
    if kind == "animatediff":  # the UNetMotionModel holds the SD 1.5 UNet plus a copy of the motion modules
        counts["spatial unet"] = count(pipe.unet, skip="motion_modules")
    if kind == "sd3":  # what the checkpoint stores: parameters and persistent buffers (the position table)
        counts["transformer stored"] = sum(t.numel() for t in pipe.transformer.state_dict().values())
    expected = EXPECTED_PARAMETERS[kind]
    wrong = {k: (v, expected[k]) for k, v in counts.items() if expected[k] is not None and v != expected[k]}
    if wrong:
        raise AssertionError(f"{kind}: parameter counts (built, public checkpoint) differ: {wrong}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=list(BUILDERS))
    parser.add_argument("out", nargs="?", help="pipeline folder to write")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="stored weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random initialisation runs (a GPU makes it seconds)")
    parser.add_argument(
        "--count", action="store_true", help="only build on the meta device and count parameters"
    )
    args = parser.parse_args()
    if not args.count and not args.out:
        parser.error("give an output folder, or --count")

    torch.manual_seed(0)
    bar = tqdm(total=STAGES[args.kind] + (0 if args.count else 2), desc=f"real-size {args.kind}", unit="part",
               disable=args.count)

    def done(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update()

    pipe = BUILDERS[args.kind]("meta" if args.count else args.device, done)
    counts = parameter_counts(pipe, args.kind)
    if args.count:
        print(", ".join(f"{k} {v / 1e6:,.1f} M" for k, v in counts.items()))
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    pipe.to("cpu", dtype)
    done(f"cast to {args.dtype}")
    folder = save_pipeline(pipe, Path(args.out))
    done("saved")
    bar.close()
    print(", ".join(f"{k} {v / 1e6:,.1f} M" for k, v in counts.items()))
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
