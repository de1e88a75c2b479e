"""Real-size architectures with random weights, for GPU measurements that need no hub download.

    python benchmarks/real_size.py sdxl runs/real-sdxl [--dtype bf16] [--device cuda]
    python benchmarks/real_size.py animatediff runs/real-animatediff
    python benchmarks/real_size.py sdxl --count          # parameter counts only (meta device, instant)

Writes a diffusers pipeline folder that every benchmark takes as ``--model FOLDER``. The shapes are those
of the public checkpoints (``stabilityai/stable-diffusion-xl-base-1.0``; ``runwayml/stable-diffusion-v1-5``
with ``guoyww/animatediff-motion-adapter-v1-5-2``), checked by parameter count: the numbers measure
the architectures' cost (time, memory, bytes), never image quality. Tokenizers are the real CLIP BPE
(``diffalign.tiny``); the schedulers are the ones those repositories ship.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.tiny import _SD_SCHEDULE, assemble_sdxl, build_clip_tokenizer, save_pipeline

#: Parameter counts of the public checkpoints (the built modules must match them exactly). The motion
#: adapter's count is not checked (None): its shape follows the v1-5-2 config, its count is not on record here.
EXPECTED_PARAMETERS = {
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "animatediff": {"spatial unet": 859_520_964, "motion_adapter": None, "vae": 83_653_863,
                    "text_encoder": 123_060_480},
}


def _clip_text(hidden: int, layers: int, heads: int, act: str, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden,
                            hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(sample_size: int, scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=sample_size,
                         scaling_factor=scaling_factor, force_upcast=force_upcast)


def build_sdxl(device: str, done=lambda name: None):
    """``done(name)`` is called after each component is built (initialising 2.6 B weights on a CPU takes minutes)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):  # the models only: the scheduler keeps its tables on the CPU
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
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
        adapter = MotionAdapter(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                                motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32,
                                use_motion_mid_block=True)
        motion_unet = UNetMotionModel.from_unet2d(unet, adapter)
        done("motion_adapter")
        vae = _vae(512, 0.18215, force_upcast=True)
        done("vae")
        text_encoder = _clip_text(768, 12, 12, "quick_gelu", with_projection=False)
        done("text_encoder")
    scheduler = DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    return AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=motion_unet,
                               motion_adapter=adapter, scheduler=scheduler)


BUILDERS = {"sdxl": build_sdxl, "animatediff": build_animatediff}
#: Components each builder reports, then casting and saving.
STAGES = {"sdxl": 4, "animatediff": 4}


def parameter_counts(pipe, kind: str) -> dict[str, int]:
    def count(module, skip: str = "") -> int:
        return sum(p.numel() for name, p in module.named_parameters() if not (skip and skip in name))

    counts = {name: count(getattr(pipe, name)) for name in EXPECTED_PARAMETERS[kind] if hasattr(pipe, name)}
    if kind == "animatediff":  # the UNetMotionModel holds the SD 1.5 UNet plus a copy of the motion modules
        counts["spatial unet"] = count(pipe.unet, skip="motion_modules")
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
    parser.add_argument("--count", action="store_true", help="only build on the meta device and count parameters")
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
